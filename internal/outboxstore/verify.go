package outboxstore

// The outbox side of `outbox-streamer verify` (internal/verify): per-bucket
// checksums of created_at ranges, the ids behind a bucket, look-ups by id, and
// the one statement verify writes, RequeueMissing.
//
// No index serves created_at or event_date_time (the primary key and the
// partial index over undelivered rows are the only ones), so every read walks
// the primary key: in statements of at most VerifyScan.ChunkRows rows, each its
// own short snapshot, over an id window narrowed to the time range first
// (IDWindow). A sequential scan of the whole table never happens.

import (
	"context"
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

// The checksum of a set of ids, identical in PostgreSQL and both ClickHouse
// schemas (sink/verify.go computes the same): the count, the sum of the ids
// and the sum of mix(id) = ((id mod 2^32) * 1597334677 + id div 2^32) mod
// 4294967291, both sums modulo 2^64 (ClickHouse's UInt64 sum wraps;
// PostgreSQL sums exactly in numeric and reduces). Every operand stays below
// 2^63, so neither bigint nor UInt64 arithmetic overflows for ids >= 0.
const (
	verifySumSQL = `(sum(id) % 18446744073709551616)::text`
	verifyMixSQL = `(sum(((id % 4294967296) * 1597334677 + id / 4294967296) % 4294967291) % 18446744073709551616)::text`
)

// VerifySlack bounds how long after its transaction began an outbox row takes
// its id: created_at is the inserting transaction's start (now()), the id is
// taken at the INSERT, later. IDWindow relies on it to narrow a time range to
// an id window: a row inserted more than this into a transaction that began
// before the range's end can fall outside a window whose end is in the past
// (verify notices it when ClickHouse holds the row). Each side of the window
// widens the rows read by this much time.
const VerifySlack = 10 * time.Minute

// VerifyScan is one walk over the outbox rows whose created_at, read as wall
// clock time in Loc the way the streamer reads it, falls in [From, Until).
type VerifyScan struct {
	// Table is the outbox table (OUTBOX_TABLE; zero: event_outbox).
	Table Name
	// From and Until are instants (whole microseconds).
	From, Until time.Time
	// Width is the bucket width: a row's bucket is (instant - From) / Width.
	Width time.Duration
	// Loc is EVENT_TIME_ZONE (nil: UTC).
	Loc *time.Location
	// LoID and HiID bound the ids walked, LoID <= id <= HiID (IDWindow);
	// HiID 0 walks to the end.
	LoID, HiID int64
	// ChunkRows bounds the rows one statement reads (default 20,000).
	ChunkRows int

	end int64 // HiID + 1, or the end of the ids
}

// VerifyGroup is the rows of one bucket and status found by VerifyAggregate.
type VerifyGroup struct {
	Bucket int64
	Status string
	Count  int64
	// Sum and Mix are the checksum's sums (see above).
	Sum, Mix uint64
	// MinEventTime and MaxEventTime are the span of event_date_time, as the
	// wall clock values the table holds (UTC-located).
	MinEventTime, MaxEventTime time.Time
}

// VerifyRow is one outbox row as verify sees it.
type VerifyRow struct {
	ID     int64
	Status string
	// CreatedAt and EventTime are instants, converted from the table's wall
	// clock values as the streamer converts them.
	CreatedAt, EventTime time.Time
}

// ScanStats counts what a walk read.
type ScanStats struct {
	Statements int
	Rows       int64
}

func (v *VerifyScan) defaults() {
	if v.ChunkRows <= 0 {
		v.ChunkRows = 20000
	}
	if v.Loc == nil {
		v.Loc = time.UTC
	}
	v.Table = v.Table.orDefault()
	v.end = math.MaxInt64
	if v.HiID > 0 && v.HiID < math.MaxInt64 {
		v.end = v.HiID + 1
	}
}

// placedSQL reads the rows of one id chunk ($1 <= id < $2) by primary key and
// places each on the time line: t is created_at as an instant in
// microseconds, computed by the rule Go's time.Date applies (and so the
// streamer, which converts with it): with u the wall clock read as UTC and
// L(x) the zone's UTC offset at instant x, t = u - L(u - L(u)). PostgreSQL's
// own AT TIME ZONE differs from it for wall times in a DST gap, and in some
// zones for the repeated hour, which would put rows in another bucket than
// the one ClickHouse has them in.
//
// The created_at bounds ($3, $4) are a day wider than the range on each side
// (no UTC offset exceeds 14 hours): they let a partitioned outbox skip
// partitions; the exact bounds are applied to t. Subqueries, not CTEs: each
// is read once, so PostgreSQL streams the index scan into the aggregate
// without materializing the chunk.
func placedSQL(zone string) string {
	return `(SELECT id, status, event_date_time, u - ` + offsetCase("c", zone) + ` AS t FROM (
		SELECT id, status, event_date_time, u, u - ` + offsetCase("u", zone) + ` AS c FROM (
			SELECT id, status, event_date_time, (EXTRACT(EPOCH FROM created_at) * 1000000)::bigint AS u
			FROM {outbox}
			WHERE id >= $1 AND id < $2 AND created_at >= $3 AND created_at < $4) walled) guessed) placed`
}

// offsetCase is the SQL of L(x): zone is a number for a single offset, or
// the CASE built by zoneCase with %s standing for x.
func offsetCase(x, zone string) string {
	if !strings.Contains(zone, "%s") {
		return zone
	}
	return strings.ReplaceAll(zone, "%s", x)
}

// zoneCase returns the SQL of L(x), the UTC offset in microseconds in effect
// in loc at instant x (microseconds), for x between lo and hi: a number when
// loc keeps one offset there, else a CASE over its transitions, with %s
// standing for x. It is built from numbers only.
func zoneCase(loc *time.Location, lo, hi time.Time) string {
	type seg struct{ until, offset int64 }
	var segs []seg
	t := lo.In(loc)
	for {
		_, off := t.Zone()
		_, end := t.ZoneBounds()
		offset := int64(off) * 1e6
		if n := len(segs); n > 0 && segs[n-1].offset == offset {
			segs = segs[:n-1] // the same offset goes on
		}
		if end.IsZero() || !end.Before(hi) {
			segs = append(segs, seg{until: math.MaxInt64, offset: offset})
			break
		}
		segs = append(segs, seg{until: end.UnixMicro(), offset: offset})
		t = end
	}
	if len(segs) == 1 {
		return strconv.FormatInt(segs[0].offset, 10) + "::bigint"
	}
	var b strings.Builder
	b.WriteString("(CASE")
	for _, s := range segs[:len(segs)-1] {
		fmt.Fprintf(&b, " WHEN %%s < %d THEN %d", s.until, s.offset)
	}
	fmt.Fprintf(&b, " ELSE %d END)::bigint", segs[len(segs)-1].offset)
	return b.String()
}

// args are the placedSQL parameters $1..$4 of the chunk from id lo.
func (v *VerifyScan) args(lo int64) []any {
	day := 24 * time.Hour
	hi := lo + int64(v.ChunkRows)
	if hi < lo || hi > v.end { // overflow, or past the window
		hi = v.end
	}
	return []any{lo, hi, v.From.UTC().Add(-day), v.Until.UTC().Add(day)}
}

func (v *VerifyScan) zone() string {
	// Offsets are looked up a few days around the range: rows outside it are
	// filtered out, and a row just inside may need the offset a day away.
	return zoneCase(v.Loc, v.From.Add(-3*24*time.Hour), v.Until.Add(3*24*time.Hour))
}

// VerifyAggregateSQL is the statement VerifyAggregate runs per chunk (for
// EXPLAIN and docs/verify.md). Parameters: $1 and $2 the chunk's ids
// ($1 <= id < $2), $3 and $4 created_at bounds a day wider than the range, $5
// From and $7 Until in Unix microseconds, $6 the bucket width in
// microseconds. Rows of the chunk outside the range come back as one group
// per status with a NULL bucket: they count what was read.
func (v VerifyScan) VerifyAggregateSQL() string {
	v.defaults()
	return v.Table.sql(`SELECT CASE WHEN t >= $5 AND t < $7 THEN (t - $5) / $6 END AS bucket, status, count(*),
		` + verifySumSQL + `, ` + verifyMixSQL + `, min(event_date_time), max(event_date_time)
	FROM ` + placedSQL(v.zone()) + `
	GROUP BY 1, 2`)
}

// VerifyAggregate walks the scan's id window and calls fn for each bucket
// and status of each chunk (a bucket's groups of several chunks are the
// caller's to add up).
func VerifyAggregate(ctx context.Context, db Reader, scan VerifyScan, fn func(VerifyGroup)) (ScanStats, error) {
	scan.defaults()
	q := scan.VerifyAggregateSQL()
	width := scan.Width.Microseconds()
	if width <= 0 {
		return ScanStats{}, errors.New("verify: bucket width must be positive")
	}
	var rowsRead int64
	st, err := scan.walk(ctx, db, func(lo int64) error {
		rows, err := db.Query(ctx, q, append(scan.args(lo), scan.From.UnixMicro(), width, scan.Until.UnixMicro())...)
		if err != nil {
			return err
		}
		defer rows.Close()
		for rows.Next() {
			var (
				bucket       *int64
				g            VerifyGroup
				sum, mix     string
				minAt, maxAt time.Time
			)
			if err := rows.Scan(&bucket, &g.Status, &g.Count, &sum, &mix, &minAt, &maxAt); err != nil {
				return err
			}
			rowsRead += g.Count
			if bucket == nil {
				continue // outside the range
			}
			g.Bucket, g.MinEventTime, g.MaxEventTime = *bucket, minAt, maxAt
			if g.Sum, err = strconv.ParseUint(sum, 10, 64); err != nil {
				return fmt.Errorf("parse id sum %q: %w", sum, err)
			}
			if g.Mix, err = strconv.ParseUint(mix, 10, 64); err != nil {
				return fmt.Errorf("parse id mix %q: %w", mix, err)
			}
			fn(g)
		}
		return rows.Err()
	})
	st.Rows = rowsRead
	return st, err
}

// VerifyRows walks the scan's id window and calls fn, in id order, for each
// row in the range: the ids behind one bucket.
func VerifyRows(ctx context.Context, db Reader, scan VerifyScan, fn func(VerifyRow)) (ScanStats, error) {
	scan.defaults()
	q := scan.Table.sql(`SELECT id, status, t, event_date_time FROM ` + placedSQL(scan.zone()) + ` WHERE t >= $5 AND t < $6 ORDER BY id`)
	loc := scan.Loc
	var n int64
	st, err := scan.walk(ctx, db, func(lo int64) error {
		rows, err := db.Query(ctx, q, append(scan.args(lo), scan.From.UnixMicro(), scan.Until.UnixMicro())...)
		if err != nil {
			return err
		}
		defer rows.Close()
		for rows.Next() {
			var r VerifyRow
			var t int64
			var at time.Time
			if err := rows.Scan(&r.ID, &r.Status, &t, &at); err != nil {
				return err
			}
			r.Status = internStatus(r.Status) // a bucket's rows are held: one string per status
			r.CreatedAt, r.EventTime = time.UnixMicro(t).UTC(), inZone(at, loc)
			n++
			fn(r)
		}
		return rows.Err()
	})
	st.Rows = n // rows returned: those of the range
	return st, err
}

func internStatus(s string) string {
	for _, c := range []string{StatusProcessed, StatusPending, StatusFailed, StatusDead} {
		if s == c {
			return c
		}
	}
	return s
}

// walk runs chunk for each id chunk of the window: each starts at the first
// id at or after the previous chunk's end (a probe of the primary key, so
// that gaps in the ids cost one probe, not a statement per empty chunk) and
// spans ChunkRows ids, so no statement reads more rows than that.
func (v *VerifyScan) walk(ctx context.Context, db Reader, chunk func(lo int64) error) (ScanStats, error) {
	var st ScanStats
	next := v.LoID
	for next < v.end {
		var first *int64
		// With the chunk's created_at bounds: a partitioned outbox probes
		// only the partitions of the range.
		a := v.args(next)
		if err := db.QueryRow(ctx, v.Table.sql(`SELECT min(id) FROM {outbox} WHERE id >= $1 AND id < $2 AND created_at >= $3 AND created_at < $4`),
			next, v.end, a[2], a[3]).Scan(&first); err != nil {
			return st, fmt.Errorf("verify: find outbox rows from id %d: %w", next, err)
		}
		st.Statements++
		if first == nil {
			break
		}
		if err := chunk(*first); err != nil {
			return st, fmt.Errorf("verify: read outbox rows from id %d: %w", *first, err)
		}
		st.Statements++
		if *first > math.MaxInt64-int64(v.ChunkRows) {
			break
		}
		next = *first + int64(v.ChunkRows)
		if err := ctx.Err(); err != nil {
			return st, err
		}
	}
	return st, nil
}

// VerifyBounds are the ends of the outbox by id.
type VerifyBounds struct {
	Empty        bool
	MinID, MaxID int64
	// OldestCreatedAt is the created_at of the lowest id, as the table holds
	// it (wall clock, UTC-located).
	OldestCreatedAt time.Time
}

// ReadVerifyBounds reads the lowest and highest id and the lowest id's
// created_at: three probes of the primary key.
func ReadVerifyBounds(ctx context.Context, db Reader, table Name) (VerifyBounds, error) {
	var b VerifyBounds
	var lo, hi *int64
	var at *time.Time
	err := db.QueryRow(ctx, table.sql(`SELECT (SELECT id FROM {outbox} ORDER BY id LIMIT 1),
		(SELECT id FROM {outbox} ORDER BY id DESC LIMIT 1),
		(SELECT created_at FROM {outbox} ORDER BY id LIMIT 1)`)).Scan(&lo, &hi, &at)
	if err != nil {
		return b, fmt.Errorf("verify: read the outbox's id range%s: %w", schemaHint(err), err)
	}
	if lo == nil || hi == nil || at == nil {
		b.Empty = true
		return b, nil
	}
	b.MinID, b.MaxID, b.OldestCreatedAt = *lo, *hi, *at
	return b, nil
}

// OldestProcessedID is the lowest id of a processed row, or 0 when none is
// left (a walk of the primary key from the start that skips the rows not
// processed, like ReadAges).
func OldestProcessedID(ctx context.Context, db Reader, table Name) (int64, error) {
	var id *int64
	if err := db.QueryRow(ctx, table.sql(`SELECT (SELECT id FROM {outbox} WHERE status = 'processed' ORDER BY id LIMIT 1)`)).Scan(&id); err != nil {
		return 0, fmt.Errorf("verify: read the oldest processed row: %w", err)
	}
	if id == nil {
		return 0, nil
	}
	return *id, nil
}

// IDWindow narrows the ids to walk for rows whose created_at wall clock
// values lie in [lowWall, highWall) (UTC-located), by binary search over the
// primary key (a few dozen probes of one index page). It returns lo, hi with
// every such row between them, provided no row took its id more than
// VerifySlack after its created_at: ids are taken in time order, and
// created_at is the transaction's start, at most that much earlier. hi is 0
// when the window runs to the end of the table.
func IDWindow(ctx context.Context, db Reader, table Name, b VerifyBounds, lowWall, highWall time.Time) (lo, hi int64, probes int, err error) {
	// probe returns the first row at or after id and the median created_at
	// of the probeRows rows from it: the median of several rows, because a
	// single one may come from a long transaction (an old created_at on an
	// id taken late) and would say nothing about when its id was taken.
	probe := func(id int64) (first int64, at, median time.Time, ok bool, err error) {
		probes++
		var f *int64
		var a, m *time.Time
		err = db.QueryRow(ctx, table.sql(`SELECT min(id), (array_agg(created_at ORDER BY id))[1],
			percentile_disc(0.5) WITHIN GROUP (ORDER BY created_at)
			FROM (SELECT id, created_at FROM {outbox} WHERE id >= $1 ORDER BY id LIMIT $2) s`), id, probeRows).Scan(&f, &a, &m)
		if err != nil {
			return 0, time.Time{}, time.Time{}, false, fmt.Errorf("verify: probe the outbox at id %d: %w", id, err)
		}
		if f == nil {
			return 0, time.Time{}, time.Time{}, false, nil
		}
		return *f, *a, *m, true, nil
	}
	below := lowWall.Add(-VerifySlack)
	above := highWall.Add(VerifySlack)

	// Lower end: when rows taken just after the first row at or after mid
	// were created before lowWall - slack (their median), that row's id was
	// taken before lowWall, and so was every lower id: none of them belongs
	// to the range. The highest such row found wins.
	lo = b.MinID
	for a, z := b.MinID, b.MaxID; a <= z; {
		mid := a + (z-a)/2
		id, _, median, ok, err := probe(mid)
		if err != nil {
			return 0, 0, probes, err
		}
		if !ok || id > z {
			z = mid - 1
			continue
		}
		if median.Before(below) {
			lo = id
			a = id + 1
		} else {
			z = mid - 1
		}
	}
	// Upper end: a row created at or after highWall + slack took its id
	// then or later, so every higher id was taken later still, and its row
	// created after highWall. The lowest such row found wins.
	for a, z := lo, b.MaxID; a <= z; {
		mid := a + (z-a)/2
		id, at, _, ok, err := probe(mid)
		if err != nil {
			return 0, 0, probes, err
		}
		if !ok || id > z {
			z = mid - 1
			continue
		}
		if !at.Before(above) {
			hi = id
			z = mid - 1
		} else {
			a = id + 1
		}
	}
	return lo, hi, probes, nil
}

// probeRows is how many rows an IDWindow probe reads.
const probeRows = 101

// LookupVerifyRows reads the rows of ids, any created_at (primary key look-ups,
// 10,000 ids per statement). loc is EVENT_TIME_ZONE.
func LookupVerifyRows(ctx context.Context, db Reader, table Name, ids []int64, loc *time.Location) ([]VerifyRow, error) {
	var out []VerifyRow
	for start := 0; start < len(ids); start += lookupChunk {
		part := ids[start:min(start+lookupChunk, len(ids))]
		rows, err := db.Query(ctx, table.sql(`SELECT id, status, created_at, event_date_time FROM {outbox} WHERE id = ANY($1) ORDER BY id`), part)
		if err != nil {
			return nil, fmt.Errorf("verify: look up %d outbox rows: %w", len(part), err)
		}
		for rows.Next() {
			var r VerifyRow
			var created, at time.Time
			if err := rows.Scan(&r.ID, &r.Status, &created, &at); err != nil {
				rows.Close()
				return nil, fmt.Errorf("verify: look up outbox rows: %w", err)
			}
			r.CreatedAt, r.EventTime = inZone(created, loc), inZone(at, loc)
			out = append(out, r)
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return nil, fmt.Errorf("verify: look up outbox rows: %w", err)
		}
	}
	return out, nil
}

const lookupChunk = 10000

// MissingReason is the last_error RequeueMissing leaves on a row.
const MissingReason = "verify: missing in ClickHouse"

// RequeueMissing hands processed rows that ClickHouse does not hold back to
// the sweep: failed, due now, attempts reset. The sweep looks every row up in
// ClickHouse before inserting it, so a row that is there after all is only
// marked processed again, never inserted twice. Only rows still processed
// change, all in one transaction; it returns the ids it changed.
func RequeueMissing(ctx context.Context, db interface {
	Begin(context.Context) (pgx.Tx, error)
}, table Name, zone string, ids []int64) ([]int64, error) {
	if len(ids) == 0 {
		return nil, nil
	}
	tx, err := db.Begin(ctx)
	if err != nil {
		return nil, fmt.Errorf("verify: requeue missing rows: begin: %w", err)
	}
	defer tx.Rollback(context.Background()) //nolint:errcheck // after Commit this is a no-op
	var done []int64
	for start := 0; start < len(ids); start += lookupChunk {
		part := ids[start:min(start+lookupChunk, len(ids))]
		rows, err := tx.Query(ctx, table.sql(`UPDATE {outbox}
			SET status = 'failed', attempts = 0, next_attempt_at = now(), last_error = $2,
			    updated_at = `+NowIn(zone)+`
			WHERE id = ANY($1) AND status = 'processed'
			RETURNING id`), part, MissingReason)
		if err != nil {
			return nil, fmt.Errorf("verify: requeue %d missing rows: %w", len(part), err)
		}
		got, err := pgx.CollectRows(rows, pgx.RowTo[int64])
		if err != nil {
			return nil, fmt.Errorf("verify: requeue %d missing rows: %w", len(part), err)
		}
		done = append(done, got...)
	}
	if err := tx.Commit(ctx); err != nil {
		return nil, fmt.Errorf("verify: requeue missing rows: commit: %w", err)
	}
	return done, nil
}
