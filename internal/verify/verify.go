// Package verify answers an audit's question: does ClickHouse hold every event
// the outbox committed, once? It compares the rows the outbox still holds with
// the event table, bucket by bucket of created_at, first by an
// order-independent checksum of the ids that both databases compute alike,
// then, for the buckets whose checksums differ, id by id: which rows are
// missing in ClickHouse, which it holds more than once, and which it holds
// although the outbox does not (telling rows pruned by retention, which are
// out of scope, from discrepancies). Repair hands the missing rows to the
// sweep, which checks ClickHouse before it inserts anything.
//
// Buckets are cut by created_at, not event_date_time: the outbox has no index
// on either, but created_at grows with the id (it is the inserting
// transaction's start), so a time range narrows to a range of the primary key
// and the outbox side reads only the rows of the range, in short statements
// (outboxstore). Retention and partitions go by created_at too, which makes
// the rule for pruned rows exact. ClickHouse's checksums are read by
// created_at alone, so that no event the outbox lacks can hide; its ids,
// where a bucket differs, first within the event_date_time span of the
// outbox's rows (which its partitions and sort key serve), then without it.
//
// The outbox is read before ClickHouse, range by range: a row is processed
// only after ClickHouse accepted it, so a row the outbox shows processed is
// in ClickHouse by the time ClickHouse is read, and a row delivered in
// between shows as in flight, never as missing.
package verify

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-streamer/outbox-streamer/internal/outboxstore"
	"github.com/outbox-streamer/outbox-streamer/sink"
)

// ClickHouse is the event table's side (implemented by *sink.Writer).
type ClickHouse interface {
	VerifySums(ctx context.Context, r sink.VerifyRange) ([]sink.BucketSum, sink.ReadStats, error)
	VerifyIDs(ctx context.Context, r sink.VerifyRange, fn func(sink.Held) error) (sink.ReadStats, error)
	VerifyLookup(ctx context.Context, ids []int64, r sink.VerifyRange) ([]sink.Held, sink.ReadStats, error)
	Table() string
}

// Config is one verification.
type Config struct {
	// Table is the outbox table (OUTBOX_TABLE; zero: event_outbox).
	Table outboxstore.Name
	// From and Until bound created_at (instants). Zero From starts at the
	// outbox's oldest row, zero Until is now.
	From, Until time.Time
	// Bucket is the bucket width (default 1h; whole seconds).
	Bucket time.Duration
	// TimeZone is EVENT_TIME_ZONE (default UTC).
	TimeZone *time.Location
	// Retention is OUTBOX_RETENTION (0: keep everything), for PruneRule.
	Retention time.Duration
	// MaxIDs bounds the ids listed per bucket and kind (default 1000).
	MaxIDs int
	// ChunkRows bounds the outbox rows one statement reads (default 20,000).
	ChunkRows int
	// Now is the clock (default time.Now).
	Now func() time.Time
}

func (c *Config) defaults() {
	if c.Bucket <= 0 {
		c.Bucket = time.Hour
	}
	if c.TimeZone == nil {
		c.TimeZone = time.UTC
	}
	if c.MaxIDs <= 0 {
		c.MaxIDs = 1000
	}
	if c.Now == nil {
		c.Now = time.Now
	}
}

const day = 24 * time.Hour

// MaxIDRows bounds the rows of a bucket whose ids are compared: the outbox's
// are held in memory (about 64 bytes each), ClickHouse's stream.
const MaxIDRows = 5000000

// run is one verification in progress.
type run struct {
	cfg    Config
	db     outboxstore.Reader
	ch     ClickHouse
	rep    *Report
	rng    Range
	bounds outboxstore.VerifyBounds
	now    time.Time
	// span is the event_date_time span of the outbox's rows in the range.
	spanFrom, spanUntil time.Time
	// lo and hi are the range's id window.
	lo, hi int64
	moved  map[int64]bool // reported as CreatedAtDiffers already
}

// work is one bucket's id-level comparison before classification.
type work struct {
	b     *Bucket
	m     Merge
	cheap bool // bucket before the retention horizon: only the outbox's ids looked up
}

// Run compares the outbox with ClickHouse over cfg's range. db should be a
// pool or a connection (not a transaction: every statement is meant to take
// its own short snapshot).
func Run(ctx context.Context, cfg Config, db outboxstore.Reader, ch ClickHouse) (*Report, error) {
	cfg.defaults()
	began := time.Now()
	v := &run{cfg: cfg, db: db, ch: ch, now: cfg.Now(), moved: map[int64]bool{}}
	v.rep = &Report{OutboxTable: cfg.Table.String(), Column: "created_at", TimeZone: cfg.TimeZone.String(), Table: ch.Table(), Match: true, Buckets: []Bucket{}}
	err := v.run(ctx)
	v.rep.Cost.Seconds = time.Since(began).Seconds()
	if err != nil {
		return nil, err
	}
	return v.rep, nil
}

func (v *run) run(ctx context.Context) error {
	loc := v.cfg.TimeZone
	var err error
	if v.bounds, err = outboxstore.ReadVerifyBounds(ctx, v.db, v.cfg.Table); err != nil {
		return err
	}
	from, until := v.cfg.From, v.cfg.Until
	if until.IsZero() {
		until = v.now
	}
	if from.IsZero() {
		from = until.Add(-v.cfg.Bucket)
		if !v.bounds.Empty {
			// Rows slightly older than the lowest id's may follow it.
			from = fromWall(v.bounds.OldestCreatedAt, loc).Add(-outboxstore.VerifySlack)
		}
	}
	if v.rng, err = Align(from, until, v.cfg.Bucket); err != nil {
		return err
	}
	v.rep.From, v.rep.Until, v.rep.BucketSeconds = v.rng.From, v.rng.Until, int64(v.rng.Bucket/time.Second)
	if v.cfg.Retention > 0 {
		h := v.now.Add(-v.cfg.Retention).UTC()
		v.rep.RetentionHorizon = &h
	}
	if v.bounds.Empty {
		v.note("the outbox holds no rows: nothing to compare (ClickHouse was not read)")
		return nil
	}

	agg, err := v.outboxSums(ctx)
	if err != nil {
		return err
	}
	chSums, err := v.clickhouseSums(ctx)
	if err != nil {
		return err
	}
	if len(agg) == 0 && len(chSums) == 0 {
		v.note("neither the outbox nor ClickHouse holds rows created in the range: nothing to compare")
		return nil
	}

	var idx []int64
	for i := range agg {
		idx = append(idx, i)
	}
	for i := range chSums {
		if _, ok := agg[i]; !ok {
			idx = append(idx, i)
		}
	}
	slices.Sort(idx)
	v.rep.Buckets = make([]Bucket, 0, len(idx))
	for _, i := range idx {
		b := Bucket{Start: v.rng.Start(i), End: v.rng.Start(i + 1), Status: StatusMatch}
		ob := agg[i]
		if ob == nil {
			ob = &OutboxBucket{}
		}
		b.Outbox, b.OutboxChecksum = ob.Processed.Count, ob.Processed
		b.Pending, b.Failed, b.Dead = ob.Pending, ob.Failed, ob.Dead
		if s, ok := chSums[i]; ok {
			b.ClickHouse, b.ClickHouseChecksum = s.Count, Checksum{Count: s.Count, Sum: s.Sum, Mix: s.Mix}
		}
		v.rep.Buckets = append(v.rep.Buckets, b)
	}

	// Id by id where the checksums differ, then classify with the oldest
	// processed id read after every id read (a prune in between only
	// lowers what the outbox holds).
	var works []*work
	for i := range v.rep.Buckets {
		b := &v.rep.Buckets[i]
		if b.OutboxChecksum == b.ClickHouseChecksum {
			continue
		}
		w, err := v.compareIDs(ctx, b, agg[v.indexOf(b.Start)])
		if err != nil {
			return err
		}
		if w != nil {
			works = append(works, w)
		}
	}
	if len(works) > 0 {
		oldest, err := outboxstore.OldestProcessedID(ctx, v.db, v.cfg.Table)
		if err != nil {
			return err
		}
		v.rep.OldestProcessedID = oldest
		rule := NewPruneRule(v.now, v.cfg.Retention, loc, oldest, v.bounds.MaxID)
		for _, w := range works {
			if err := v.classify(ctx, w, rule); err != nil {
				return err
			}
		}
	}
	v.total()
	return nil
}

func (v *run) indexOf(start time.Time) int64 { return int64(start.Sub(v.rng.From) / v.rng.Bucket) }

func (v *run) note(s string) { v.rep.Notes = append(v.rep.Notes, s) }

// fromWall reads a TIMESTAMP's wall clock (UTC-located) in loc, as the
// streamer does.
func fromWall(t time.Time, loc *time.Location) time.Time {
	return time.Date(t.Year(), t.Month(), t.Day(), t.Hour(), t.Minute(), t.Second(), t.Nanosecond(), loc).UTC()
}

// window narrows the outbox's ids for rows created in [from, until).
func (v *run) window(ctx context.Context, from, until time.Time) (lo, hi int64, err error) {
	loc := v.cfg.TimeZone
	// Wall clock order can trail instant order by the zone's offset changes.
	spread := offsetSpread(loc, from.Add(-2*day), until.Add(2*day))
	lo, hi, probes, err := outboxstore.IDWindow(ctx, v.db, v.cfg.Table, v.bounds, wallUTC(from, loc).Add(-spread), wallUTC(until, loc).Add(spread))
	v.rep.Cost.OutboxProbes += probes
	return lo, hi, err
}

func (v *run) scan(from, until time.Time, lo, hi int64) outboxstore.VerifyScan {
	return outboxstore.VerifyScan{Table: v.cfg.Table, From: from, Until: until, Width: v.rng.Bucket, Loc: v.cfg.TimeZone, LoID: lo, HiID: hi, ChunkRows: v.cfg.ChunkRows}
}

// outboxSums reads the outbox's checksums by bucket and status.
func (v *run) outboxSums(ctx context.Context) (map[int64]*OutboxBucket, error) {
	var err error
	if v.lo, v.hi, err = v.window(ctx, v.rng.From, v.rng.Until); err != nil {
		return nil, err
	}
	agg := map[int64]*OutboxBucket{}
	st, err := outboxstore.VerifyAggregate(ctx, v.db, v.scan(v.rng.From, v.rng.Until, v.lo, v.hi), func(g outboxstore.VerifyGroup) {
		b := agg[g.Bucket]
		if b == nil {
			b = &OutboxBucket{}
			agg[g.Bucket] = b
		}
		b.Add(g)
		if v.spanFrom.IsZero() || g.MinEventTime.Before(v.spanFrom) {
			v.spanFrom = g.MinEventTime
		}
		if g.MaxEventTime.After(v.spanUntil) {
			v.spanUntil = g.MaxEventTime
		}
	})
	v.rep.Cost.OutboxStatements += st.Statements
	v.rep.Cost.OutboxRows += st.Rows
	return agg, err
}

// chRange is ClickHouse's range for created_at in [from, until) and
// event_date_time in the wall clock span [spanFrom, spanUntil] (as the
// outbox holds it), turned into instants with the zone's offsets there; a
// zero span bounds created_at only.
func (v *run) chRange(from, until, spanFrom, spanUntil time.Time) sink.VerifyRange {
	if spanFrom.IsZero() {
		return sink.VerifyRange{From: from, Until: until, Width: v.rng.Bucket}
	}
	lo, hi := offsetRange(v.cfg.TimeZone, spanFrom.Add(-2*day), spanUntil.Add(2*day))
	return sink.VerifyRange{From: from, Until: until, Width: v.rng.Bucket, EventFrom: spanFrom.Add(-hi), EventUntil: spanUntil.Add(-lo)}
}

func (v *run) addCH(st sink.ReadStats) {
	v.rep.Cost.ClickHouseQuery += st.Queries
	v.rep.Cost.ClickHouseRows += st.Rows
	v.rep.Cost.ClickHouseBytes += st.Bytes
}

// clickhouseSums reads ClickHouse's checksums by bucket, by created_at alone:
// an event the outbox never held (a phantom after a failover, a row written
// by another writer) can carry any event_date_time, and bounding this read
// by the outbox rows' span would hide it.
func (v *run) clickhouseSums(ctx context.Context) (map[int64]sink.BucketSum, error) {
	sums, st, err := v.ch.VerifySums(ctx, v.chRange(v.rng.From, v.rng.Until, time.Time{}, time.Time{}))
	v.addCH(st)
	if err != nil {
		return nil, err
	}
	out := make(map[int64]sink.BucketSum, len(sums))
	for _, s := range sums {
		if s.Bucket >= 0 && s.Bucket < v.rng.Buckets() {
			out[s.Bucket] = s
		}
	}
	return out, nil
}

// outboxRows reads the outbox rows of one bucket, in id order, through the
// bucket's own id window; when that finds fewer rows than the range's
// aggregate counted (rows created out of id order), through the range's.
func (v *run) outboxRows(ctx context.Context, from, until time.Time, counted int64) ([]outboxstore.VerifyRow, error) {
	lo, hi, err := v.window(ctx, from, until)
	if err != nil {
		return nil, err
	}
	read := func(lo, hi int64) ([]outboxstore.VerifyRow, error) {
		var rows []outboxstore.VerifyRow
		st, err := outboxstore.VerifyRows(ctx, v.db, v.scan(from, until, lo, hi), func(r outboxstore.VerifyRow) { rows = append(rows, r) })
		v.rep.Cost.OutboxStatements += st.Statements
		v.rep.Cost.OutboxRows += st.Rows
		return rows, err
	}
	rows, err := read(lo, hi)
	if err == nil && int64(len(rows)) < counted && (lo != v.lo || hi != v.hi) {
		rows, err = read(v.lo, v.hi)
	}
	return rows, err
}

// horizon is the instant before which every row counts as pruned by retention
// (zero without retention): the cutoff, less the zone's offset changes
// around it, so that wall clock comparison agrees.
func (v *run) horizon() time.Time {
	if v.cfg.Retention <= 0 {
		return time.Time{}
	}
	h := v.now.Add(-v.cfg.Retention)
	return h.Add(-offsetSpread(v.cfg.TimeZone, h.Add(-2*day), h.Add(2*day)))
}

// compareIDs merges one differing bucket's ids.
func (v *run) compareIDs(ctx context.Context, b *Bucket, ob *OutboxBucket) (*work, error) {
	var counted int64
	if ob != nil {
		counted = int64(ob.Processed.Count) + ob.Pending + ob.Failed + ob.Dead
	}
	if counted > MaxIDRows || b.ClickHouse > MaxIDRows {
		// The outbox side of the id comparison is held in memory.
		b.Status = StatusDiffers
		b.TooLarge = true
		v.note(fmt.Sprintf("bucket %s differs but holds over %d rows: ids not compared (verify it again with a narrower --bucket)", b.Start.Format(time.RFC3339), MaxIDRows))
		return nil, nil
	}
	b.IDsCompared = true
	rows, err := v.outboxRows(ctx, b.Start, b.End, counted)
	if err != nil {
		return nil, err
	}
	w := &work{b: b}
	// The bucket's own event_date_time span when it has outbox rows.
	spanFrom, spanUntil := v.spanFrom, v.spanUntil
	if ob != nil && !ob.MinEvent.IsZero() {
		spanFrom, spanUntil = ob.MinEvent, ob.MaxEvent
	}
	if h := v.horizon(); !h.IsZero() && !b.End.After(h) {
		// Every ClickHouse row of the bucket is older than the retention:
		// only the rows the outbox still holds are compared, by id.
		w.cheap = true
		ids := make([]int64, len(rows))
		for i, r := range rows {
			ids[i] = r.ID
		}
		held, st, err := v.ch.VerifyLookup(ctx, ids, v.chRange(b.Start, b.End, spanFrom, spanUntil))
		v.addCH(st)
		if err != nil {
			return nil, err
		}
		g := NewMerger(rows)
		for _, h := range held {
			if err := g.Add(h); err != nil {
				return nil, err
			}
		}
		w.m = g.Finish()
		return w, nil
	}
	merge := func(spanFrom, spanUntil time.Time) error {
		g := NewMerger(rows)
		st, err := v.ch.VerifyIDs(ctx, v.chRange(b.Start, b.End, spanFrom, spanUntil), g.Add)
		v.addCH(st)
		w.m = g.Finish()
		return err
	}
	if err := merge(spanFrom, spanUntil); err != nil {
		return nil, err
	}
	if w.m.CHRows < b.ClickHouse && !(spanFrom.Equal(v.spanFrom) && spanUntil.Equal(v.spanUntil)) {
		// ClickHouse rows of the bucket outside its outbox rows' event time
		// span: read the range's whole span.
		if err := merge(v.spanFrom, v.spanUntil); err != nil {
			return nil, err
		}
	}
	if w.m.CHRows < b.ClickHouse && !spanFrom.IsZero() {
		// Still fewer than counted: rows outside every outbox row's span.
		if err := merge(time.Time{}, time.Time{}); err != nil {
			return nil, err
		}
	}
	return w, nil
}

// classify settles a bucket's ClickHouse-only rows and missing candidates by
// id, and sets its status.
func (v *run) classify(ctx context.Context, w *work, rule PruneRule) error {
	b, m, max := w.b, &w.m, v.cfg.MaxIDs
	var notInOutbox, missing IDList
	var moved MovedList
	if w.cheap && b.ClickHouse > m.CHRows {
		b.PrunedRows += b.ClickHouse - m.CHRows
	}

	// ClickHouse-only: pruned by rule, else looked up in the outbox by id.
	var ask []int64
	chOnly := map[int64]sink.Held{}
	for _, h := range m.CHOnly {
		if rule.Explains(h.ID, h.CreatedAt) {
			b.PrunedRows += h.Copies
			continue
		}
		ask = append(ask, h.ID)
		chOnly[h.ID] = h
	}
	if len(ask) > 0 {
		found, err := outboxstore.LookupVerifyRows(ctx, v.db, v.cfg.Table, ask, v.cfg.TimeZone)
		if err != nil {
			return err
		}
		byID := map[int64]outboxstore.VerifyRow{}
		for _, r := range found {
			byID[r.ID] = r
		}
		for _, id := range ask {
			h := chOnly[id]
			r, ok := byID[id]
			switch {
			case !ok:
				notInOutbox.add(id, max)
				if h.Copies > 1 {
					m.Duplicates = append(m.Duplicates, Duplicate{ID: id, Copies: h.Copies})
				}
			case !r.CreatedAt.Before(b.Start) && r.CreatedAt.Before(b.End):
				// In this bucket after all: committed after the outbox was
				// read (a new id), or outside the scanned id window.
				if id <= v.bounds.MaxID {
					b.OutsideWindow++
				}
				m.both(r, h)
			default:
				v.addMoved(&moved, Moved{ID: id, OutboxCreatedAt: r.CreatedAt, ClickHouseCreatedAt: h.CreatedAt}, max)
				if h.Copies > 1 {
					m.Duplicates = append(m.Duplicates, Duplicate{ID: id, Copies: h.Copies, Status: r.Status})
				}
			}
		}
	}

	// Missing candidates: held under another created_at, or missing.
	if len(m.Missing) > 0 {
		ids := make([]int64, len(m.Missing))
		lo, hi := m.Missing[0].EventTime, m.Missing[0].EventTime
		for i, r := range m.Missing {
			ids[i] = r.ID
			if r.EventTime.Before(lo) {
				lo = r.EventTime
			}
			if r.EventTime.After(hi) {
				hi = r.EventTime
			}
		}
		// Event times are instants already: the exact span.
		held, st, err := v.ch.VerifyLookup(ctx, ids, sink.VerifyRange{EventFrom: lo, EventUntil: hi})
		v.addCH(st)
		if err != nil {
			return err
		}
		elsewhere := map[int64]sink.Held{}
		for _, h := range held {
			elsewhere[h.ID] = h
		}
		for _, r := range m.Missing {
			h, ok := elsewhere[r.ID]
			if !ok {
				missing.add(r.ID, max)
				v.rep.missing = append(v.rep.missing, r.ID)
				continue
			}
			v.addMoved(&moved, Moved{ID: r.ID, OutboxCreatedAt: r.CreatedAt, ClickHouseCreatedAt: h.CreatedAt}, max)
			if h.Copies > 1 {
				m.Duplicates = append(m.Duplicates, Duplicate{ID: r.ID, Copies: h.Copies, Status: r.Status})
			}
		}
	}

	var dups DuplicateList
	slices.SortFunc(m.Duplicates, func(a, c Duplicate) int { return cmp.Compare(a.ID, c.ID) })
	for _, d := range m.Duplicates {
		dups.add(d, max)
	}
	b.InFlight = m.InFlight
	if missing.Count > 0 {
		b.Missing = &missing
	}
	if dups.Count > 0 {
		b.Duplicates = &dups
	}
	if notInOutbox.Count > 0 {
		b.NotInOutbox = &notInOutbox
	}
	if moved.Count > 0 {
		b.CreatedAtDiffers = &moved
	}
	b.Status = StatusExplained
	if missing.Count+dups.Count+notInOutbox.Count+moved.Count > 0 {
		b.Status = StatusDiffers
	}
	return nil
}

// addMoved reports a row once, in the first bucket that meets it (it shows
// in the outbox's bucket as missing and in ClickHouse's as extra).
func (v *run) addMoved(l *MovedList, m Moved, max int) {
	if v.moved[m.ID] {
		return
	}
	v.moved[m.ID] = true
	l.add(m, max)
}

// total adds up the buckets.
func (v *run) total() {
	t := &v.rep.Totals
	t.Buckets = len(v.rep.Buckets)
	for i := range v.rep.Buckets {
		b := &v.rep.Buckets[i]
		t.Outbox += b.Outbox
		t.ClickHouse += b.ClickHouse
		t.Pending += b.Pending
		t.Failed += b.Failed
		t.Dead += b.Dead
		t.InFlight += b.InFlight
		t.PrunedRows += b.PrunedRows
		t.OutsideWindow += b.OutsideWindow
		if b.Missing != nil {
			t.Missing += b.Missing.Count
		}
		if b.Duplicates != nil {
			t.Duplicates += b.Duplicates.Count
		}
		if b.NotInOutbox != nil {
			t.NotInOutbox += b.NotInOutbox.Count
		}
		if b.CreatedAtDiffers != nil {
			t.CreatedAtDiffers += b.CreatedAtDiffers.Count
		}
		if b.Status == StatusDiffers {
			t.Differing++
		}
	}
	v.rep.Match = t.Differing == 0
	if t.OutsideWindow > 0 {
		v.note(fmt.Sprintf("%d rows were found by id outside the id window the scan assumed (a transaction inserted them over %s after it began): a row like them that ClickHouse does not hold either cannot be seen; verify without --since/--from reads the whole outbox", t.OutsideWindow, outboxstore.VerifySlack))
	}
}

// Repair hands the rows the report found missing in ClickHouse to the sweep
// (outboxstore.RequeueMissing: failed and due now, in one transaction, only
// rows still processed). Duplicates are reported, never touched.
func Repair(ctx context.Context, db interface {
	Begin(context.Context) (pgx.Tx, error)
}, table outboxstore.Name, rep *Report, maxIDs int) error {
	if rep == nil {
		return errors.New("verify: repair without a report")
	}
	if maxIDs <= 0 {
		maxIDs = 1000
	}
	res := &RepairResult{Requeued: IDList{IDs: []int64{}}, Skipped: IDList{IDs: []int64{}}, DuplicatesLeft: rep.Totals.Duplicates}
	done, err := outboxstore.RequeueMissing(ctx, db, table, rep.TimeZone, rep.missing)
	if err != nil {
		return err
	}
	got := map[int64]bool{}
	for _, id := range done {
		got[id] = true
		res.Requeued.add(id, maxIDs)
	}
	for _, id := range rep.missing {
		if !got[id] {
			res.Skipped.add(id, maxIDs)
		}
	}
	rep.Repair = res
	return nil
}
