package verify

import (
	"fmt"
	"math"
	"time"

	"github.com/outbox-streamer/outbox-streamer/internal/outboxstore"
	"github.com/outbox-streamer/outbox-streamer/sink"
)

// Checksum is the order-independent fingerprint of a multiset of event ids
// that PostgreSQL and ClickHouse (both schemas) compute alike: the count, the
// sum of the ids and the sum of Mix(id), both modulo 2^64. A duplicate adds
// its id again, so it changes all three.
type Checksum struct {
	Count uint64 `json:"count"`
	Sum   uint64 `json:"sum"`
	Mix   uint64 `json:"mix"`
}

// Mix spreads an id over 32 bits: ((id mod 2^32) * 1597334677 + id div 2^32)
// mod 4294967291. The product stays below 2^63, so bigint (PostgreSQL) and
// UInt64 (ClickHouse) arithmetic give the same result without overflow.
func Mix(id int64) uint64 {
	u := uint64(id)
	return ((u&math.MaxUint32)*1597334677 + u>>32) % 4294967291
}

// Add adds one occurrence of id.
func (c *Checksum) Add(id int64) {
	c.Count++
	c.Sum += uint64(id)
	c.Mix += Mix(id)
}

// Range is the created_at range verify compares, cut into buckets of equal
// width aligned to the Unix epoch: 1h buckets are UTC hours, 24h buckets UTC
// days, whatever EVENT_TIME_ZONE is (the outbox's values are converted to
// instants first, as the streamer converts them).
type Range struct {
	From, Until time.Time
	Bucket      time.Duration
}

// MaxBuckets bounds the buckets of one run (memory and output).
const MaxBuckets = 100000

// Align returns the range of whole buckets covering [from, until).
func Align(from, until time.Time, bucket time.Duration) (Range, error) {
	if bucket < time.Second || bucket%time.Second != 0 {
		return Range{}, fmt.Errorf("bucket width %s: want whole seconds, at least 1s", bucket)
	}
	if !from.Before(until) {
		return Range{}, fmt.Errorf("empty range: %s is not before %s", from.UTC().Format(time.RFC3339), until.UTC().Format(time.RFC3339))
	}
	w := int64(bucket / time.Second)
	lo := floorDiv(from.Unix(), w) * w
	hi := floorDiv(until.Unix(), w) * w
	if !time.Unix(hi, 0).Equal(until) {
		hi += w
	}
	r := Range{From: time.Unix(lo, 0).UTC(), Until: time.Unix(hi, 0).UTC(), Bucket: bucket}
	if n := r.Buckets(); n > MaxBuckets {
		return Range{}, fmt.Errorf("%d buckets of %s between %s and %s: at most %d (choose a wider --bucket or a shorter range)",
			n, bucket, r.From.Format(time.RFC3339), r.Until.Format(time.RFC3339), MaxBuckets)
	}
	return r, nil
}

func floorDiv(a, b int64) int64 {
	q := a / b
	if a%b != 0 && (a < 0) != (b < 0) {
		q--
	}
	return q
}

// Buckets is the number of buckets.
func (r Range) Buckets() int64 { return int64(r.Until.Sub(r.From) / r.Bucket) }

// Start is the start of bucket i.
func (r Range) Start(i int64) time.Time { return r.From.Add(time.Duration(i) * r.Bucket) }

// OutboxBucket is what the outbox holds in one bucket.
type OutboxBucket struct {
	// Processed is the checksum of the processed rows: the ones ClickHouse
	// must hold.
	Processed Checksum
	// Rows not processed yet by status: not yet delivered, not a discrepancy.
	Pending, Failed, Dead int64
	// MinEvent and MaxEvent span event_date_time (wall clock values).
	MinEvent, MaxEvent time.Time
}

// Add adds one group of the outbox's aggregate.
func (b *OutboxBucket) Add(g outboxstore.VerifyGroup) {
	if b.MinEvent.IsZero() || g.MinEventTime.Before(b.MinEvent) {
		b.MinEvent = g.MinEventTime
	}
	if g.MaxEventTime.After(b.MaxEvent) {
		b.MaxEvent = g.MaxEventTime
	}
	switch g.Status {
	case outboxstore.StatusProcessed:
		b.Processed.Count += uint64(g.Count)
		b.Processed.Sum += g.Sum
		b.Processed.Mix += g.Mix
	case outboxstore.StatusPending:
		b.Pending += g.Count
	case outboxstore.StatusFailed:
		b.Failed += g.Count
	default:
		b.Dead += g.Count
	}
}

// Duplicate is an event ClickHouse holds more than once.
type Duplicate struct {
	ID     int64  `json:"id"`
	Copies uint64 `json:"copies"`
	// Status is the outbox row's status ("" when the outbox does not hold it).
	Status string `json:"outbox_status,omitempty"`
}

// Merge is the id-level comparison of one bucket's outbox rows and
// ClickHouse rows.
type Merge struct {
	// Matched rows are processed in the outbox and in ClickHouse once.
	Matched int64
	// InFlight rows are in ClickHouse while the outbox row is not processed
	// yet (delivered, status update to come; or an earlier attempt's insert
	// the sweep will find): not a discrepancy.
	InFlight int64
	// Missing rows are processed in the outbox and not among this bucket's
	// ClickHouse rows (to be confirmed by id: see Run).
	Missing []outboxstore.VerifyRow
	// Duplicates are the outbox's rows ClickHouse holds more than once.
	Duplicates []Duplicate
	// CHOnly are the ClickHouse rows of ids the outbox's bucket does not
	// hold (pruned, deleted from the outbox, or elsewhere: see Run).
	CHOnly []sink.Held
	// CHRows counts the ClickHouse rows seen (duplicates included).
	CHRows uint64
}

// Merger merges one bucket's outbox rows (in id order) with its ClickHouse
// rows as they stream in (in id order), holding only the outbox side.
type Merger struct {
	outbox []outboxstore.VerifyRow
	i      int
	last   int64
	m      Merge
}

// NewMerger starts a merge over the outbox rows of a bucket, sorted by id.
func NewMerger(outbox []outboxstore.VerifyRow) *Merger {
	return &Merger{outbox: outbox, last: math.MinInt64}
}

// Add takes the next ClickHouse id; ids must come in increasing order.
func (g *Merger) Add(h sink.Held) error {
	if h.ID <= g.last {
		return fmt.Errorf("verify: clickhouse ids out of order (%d after %d)", h.ID, g.last)
	}
	g.last = h.ID
	g.m.CHRows += h.Copies
	for g.i < len(g.outbox) && g.outbox[g.i].ID < h.ID {
		g.outboxOnly(g.outbox[g.i])
		g.i++
	}
	if g.i < len(g.outbox) && g.outbox[g.i].ID == h.ID {
		g.m.both(g.outbox[g.i], h)
		g.i++
		return nil
	}
	g.m.CHOnly = append(g.m.CHOnly, h)
	return nil
}

// both records an id found on both sides (also for rows found later by a
// look-up).
func (m *Merge) both(r outboxstore.VerifyRow, h sink.Held) {
	if h.Copies > 1 {
		m.Duplicates = append(m.Duplicates, Duplicate{ID: h.ID, Copies: h.Copies, Status: r.Status})
	}
	if r.Status == outboxstore.StatusProcessed {
		if h.Copies == 1 {
			m.Matched++
		}
		return
	}
	m.InFlight++
}

func (g *Merger) outboxOnly(r outboxstore.VerifyRow) {
	if r.Status == outboxstore.StatusProcessed {
		g.m.Missing = append(g.m.Missing, r)
	}
	// Others are not delivered yet: counted by the aggregate, not missing.
}

// Finish settles the outbox rows ClickHouse did not return and returns the
// merge.
func (g *Merger) Finish() Merge {
	for ; g.i < len(g.outbox); g.i++ {
		g.outboxOnly(g.outbox[g.i])
	}
	return g.m
}

// PruneRule tells a ClickHouse row whose id the outbox no longer holds and
// that retention removed from the outbox (out of scope) from a discrepancy.
// Such a row is pruned when
//
//   - its created_at is before the retention horizon, now - OUTBOX_RETENTION,
//     compared as wall clock time in EVENT_TIME_ZONE exactly as the pruner
//     compares (every processed row older than that may have been removed);
//     or
//   - its id is below the oldest processed row the outbox still holds: the
//     pruner walks the table from the lowest id and removes processed rows
//     only, so every processed row below the oldest one left has been through
//     a prune pass (by retention, `prune --older-than` or a dropped
//     partition). When no processed row is left at all, every id up to the
//     outbox's highest is.
//
// Anything else in ClickHouse and not in the outbox is a discrepancy: a row
// deleted from the outbox by hand, or an event written to ClickHouse by
// something else.
type PruneRule struct {
	// Cutoff is the wall clock time of now - OUTBOX_RETENTION in Loc
	// (UTC-located); zero when retention keeps everything.
	Cutoff time.Time
	Loc    *time.Location
	// OldestProcessed is the lowest processed id in the outbox, 0 if none.
	OldestProcessed int64
	// MaxID is the outbox's highest id.
	MaxID int64
}

// NewPruneRule returns the rule at now for the given retention.
func NewPruneRule(now time.Time, retention time.Duration, loc *time.Location, oldestProcessed, maxID int64) PruneRule {
	r := PruneRule{Loc: loc, OldestProcessed: oldestProcessed, MaxID: maxID}
	if retention > 0 {
		r.Cutoff = wallUTC(now.Add(-retention), loc)
	}
	return r
}

// Explains reports whether the ClickHouse row of id, created at createdAt
// (an instant), is one the outbox pruned.
func (p PruneRule) Explains(id int64, createdAt time.Time) bool {
	if !p.Cutoff.IsZero() && wallUTC(createdAt, p.Loc).Before(p.Cutoff) {
		return true
	}
	if p.OldestProcessed > 0 {
		return id < p.OldestProcessed
	}
	return id <= p.MaxID
}

// wallUTC is t's wall clock in loc as a UTC-located value, the way the
// outbox's TIMESTAMP columns hold it.
func wallUTC(t time.Time, loc *time.Location) time.Time {
	if loc == nil {
		loc = time.UTC
	}
	t = t.In(loc)
	return time.Date(t.Year(), t.Month(), t.Day(), t.Hour(), t.Minute(), t.Second(), t.Nanosecond(), time.UTC)
}

// offsetRange is the smallest and the largest UTC offset loc uses between a
// and b.
func offsetRange(loc *time.Location, a, b time.Time) (lo, hi time.Duration) {
	_, off := a.In(loc).Zone()
	min_, max_ := off, off
	for t := a; ; {
		_, end := t.In(loc).ZoneBounds()
		if end.IsZero() || !end.Before(b) {
			break
		}
		t = end
		_, off := t.In(loc).Zone()
		min_, max_ = min(min_, off), max(max_, off)
	}
	return time.Duration(min_) * time.Second, time.Duration(max_) * time.Second
}

// offsetSpread is the largest minus the smallest UTC offset loc uses between
// a and b: how far apart wall clock and instant order can drift there.
func offsetSpread(loc *time.Location, a, b time.Time) time.Duration {
	lo, hi := offsetRange(loc, a, b)
	return hi - lo
}
