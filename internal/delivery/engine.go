// Package delivery is the one delivery engine of the streamer: it takes outbox
// rows, from the replication stream's writer or from the sweep, into ClickHouse.
// It validates them, reconciles the rows that may be there already, inserts the
// rest in one insert, isolates the rows ClickHouse refuses by bisection, and
// applies the outage bound. Its result is an Outcome: which rows are delivered,
// failed or deferred. What happens to the outbox rows afterwards (their status,
// acknowledgement, the sweep's row locks) is the caller's.
package delivery

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.opentelemetry.io/otel/trace"
	"go.uber.org/zap"

	"github.com/outbox-streamer/outbox-streamer/internal/fault"
	"github.com/outbox-streamer/outbox-streamer/internal/metrics"
	"github.com/outbox-streamer/outbox-streamer/internal/outboxstore"
	"github.com/outbox-streamer/outbox-streamer/internal/record"
	"github.com/outbox-streamer/outbox-streamer/internal/retry"
	"github.com/outbox-streamer/outbox-streamer/internal/telemetry"
	"github.com/outbox-streamer/outbox-streamer/sink"
)

// Sink is where events go (implemented by *sink.Writer).
type Sink interface {
	// Ready connects (learns the server's version) unless done already;
	// Validate needs it.
	Ready(ctx context.Context) error
	Validate(ev *record.Event) error
	Insert(ctx context.Context, events []record.Event) error
	ExistingIDs(ctx context.Context, events []record.Event) (map[int64]struct{}, error)
}

// Config tunes the engine.
type Config struct {
	// Retry is the backoff for transient ClickHouse errors.
	Retry retry.Policy
	// OutageFailAfter bounds how long transient ClickHouse errors are retried
	// (CLICKHOUSE_OUTAGE_FAIL_AFTER), counted from the start of a delivery:
	// after it the rows not delivered come back as Deferred. Zero retries for
	// ever; a negative bound does not retry at all (the sweep: its rows wait
	// for its next period).
	OutageFailAfter time.Duration
	// Metrics receives error counts (nil: none).
	Metrics *metrics.Metrics
}

// Engine delivers rows. It keeps no state between deliveries, so it is safe
// for concurrent use (the sweep's workers share one; the writer has its own).
type Engine struct {
	cfg  Config
	sink Sink
	log  *zap.Logger
}

// New returns an engine over s.
func New(cfg Config, s Sink, log *zap.Logger) *Engine {
	return &Engine{cfg: cfg, sink: s, log: log}
}

// Sink returns the engine's sink.
func (e *Engine) Sink() Sink { return e.sink }

// Outcome is what a delivery did with its rows. Every row is in exactly one
// of Inserted, Present, Failed and Deferred.
type Outcome struct {
	// Inserted are the rows this delivery wrote (or found in ClickHouse after
	// an insert whose outcome was unknown).
	Inserted []record.Event
	// Present are the rows found in ClickHouse before inserting: an earlier
	// attempt had delivered them.
	Present []record.Event
	// Failed are the rows that cannot be delivered as they are: invalid, or
	// refused by ClickHouse. Their reason says which.
	Failed []outboxstore.Failure
	// Deferred are the rows not delivered because ClickHouse stayed
	// unavailable past the outage bound; OutageErr is the last error.
	Deferred  []record.Event
	OutageErr error
	// InsertTook is how long the insert stage took.
	InsertTook time.Duration
}

// Processed returns the rows that are in ClickHouse now, inserted or found.
func (o *Outcome) Processed() []outboxstore.Ref {
	refs := make([]outboxstore.Ref, 0, len(o.Inserted)+len(o.Present))
	for i := range o.Inserted {
		refs = append(refs, RefOf(&o.Inserted[i]))
	}
	for i := range o.Present {
		refs = append(refs, RefOf(&o.Present[i]))
	}
	return refs
}

// DeferredRefs returns the deferred rows' refs.
func (o *Outcome) DeferredRefs() []outboxstore.Ref {
	refs := make([]outboxstore.Ref, len(o.Deferred))
	for i := range o.Deferred {
		refs[i] = RefOf(&o.Deferred[i])
	}
	return refs
}

// RefOf names ev's outbox row.
func RefOf(ev *record.Event) outboxstore.Ref { return outboxstore.Ref{ID: ev.ID, Xid: ev.Xid} }

// invalid is the failure of a row the sink's own validation refused. The
// validation reads only the row and the table's column types (known once
// connected), so another attempt meets the same refusal: the row is final,
// dead at once, rather than retried EVENT_MAX_ATTEMPTS times over hours.
// A refusal by ClickHouse itself is not final: the server may have refused
// for a reason of its own (a setting, a bug, a version) that changes.
func invalid(ev *record.Event, err error) outboxstore.Failure {
	return outboxstore.Failure{ID: ev.ID, Xid: ev.Xid, Reason: "invalid event: " + err.Error(),
		Final: !errors.Is(err, sink.ErrNotConnected)}
}

// ErrTableRejectsRows means ClickHouse refused every row of a delivery with
// the same error: the table, not the events, is wrong. No row is marked.
var ErrTableRejectsRows = errors.New("clickhouse rejects every row")

// tableErrorMinRows is the smallest delivery whose rows, all refused the same
// way, count as a table error rather than as that many bad rows.
const tableErrorMinRows = 10

// Deliver takes events to ClickHouse. Rows for which mayExist reports true
// may be there already (an attempt before a crash, or the sweep's rows that
// failed after an insert of unknown outcome): they are looked up first and
// only the missing ones are inserted. The error is one that waiting cannot
// fix (or ctx's end); an outage past the bound is not an error but Deferred
// rows.
func (e *Engine) Deliver(ctx context.Context, events []record.Event, mayExist func(*record.Event) bool) (*Outcome, error) {
	d := &run{Engine: e, start: time.Now(), rejectCodes: map[int32]int{}}
	o := &Outcome{}
	// The outage bound runs from here: connecting, the lookup and the insert
	// all count against it, so a streamer started (or restarted) while
	// ClickHouse is down hands the rows to the sweep after the bound instead
	// of waiting, or exiting, while the slot retains WAL.
	if err := d.retry(ctx, "connect to clickhouse", d.withinOutage(false), e.sink.Ready); err != nil {
		if !d.outage(ctx, err) {
			return nil, err
		}
		o.Deferred, o.OutageErr = events, err
		return o, nil
	}
	valid := events // copied only when a row is left out
	for i := range events {
		ev := &events[i]
		if err := e.sink.Validate(ev); err != nil {
			if len(o.Failed) == 0 { // the first: from here on valid is a copy
				valid = append(make([]record.Event, 0, len(events)-1), events[:i]...)
			}
			o.Failed = append(o.Failed, invalid(ev, err))
			continue
		}
		if len(o.Failed) > 0 {
			valid = append(valid, *ev)
		}
	}
	if mayExist != nil {
		rest, present, err := d.reconcile(ctx, valid, mayExist)
		if err != nil {
			if !d.outage(ctx, err) {
				return nil, err
			}
			// Nothing was inserted: every valid row waits, and whoever
			// delivers it later looks in ClickHouse first.
			o.Deferred, o.OutageErr = valid, err
			return o, nil
		}
		valid, o.Present = rest, present
	}

	t0 := time.Now()
	inserted, rejected, err := d.insert(ctx, valid, false)
	o.InsertTook = time.Since(t0)
	if err == nil && len(valid) >= tableErrorMinRows && len(rejected) == len(valid) && len(d.rejectCodes) == 1 {
		// Not bad rows but a table that takes none of them (a column the
		// streamer does not fill whose default fails, a changed type):
		// marking every event dead would empty the outbox into the dead letters.
		return nil, fmt.Errorf("%w: all %d rows of a batch refused the same way (%s): check the event table's schema against `outbox-streamer migrate up`; no row was marked failed",
			ErrTableRejectsRows, len(valid), rejected[0].Reason)
	}
	o.Inserted = inserted
	o.Failed = append(o.Failed, rejected...)
	if err != nil {
		if !d.outage(ctx, err) {
			return nil, err
		}
		// The bound passed: the rows still undelivered wait for the sweep.
		done := make(map[int64]struct{}, len(inserted)+len(rejected))
		for i := range inserted {
			done[inserted[i].ID] = struct{}{}
		}
		for _, f := range rejected {
			done[f.ID] = struct{}{}
		}
		for i := range valid {
			if _, ok := done[valid[i].ID]; !ok {
				o.Deferred = append(o.Deferred, valid[i])
			}
		}
		o.OutageErr = err
	}
	return o, nil
}

// run is the state of one Deliver call.
type run struct {
	*Engine
	start time.Time
	// rejectCodes counts the error codes of rows the server refused, to tell
	// a table error from bad rows.
	rejectCodes map[int32]int
}

// reconcile looks up the rows mayExist names and splits events into the rows
// to insert and those ClickHouse holds already.
func (d *run) reconcile(ctx context.Context, events []record.Event, mayExist func(*record.Event) bool) (rest, present []record.Event, err error) {
	var doubtful []record.Event
	for i := range events {
		if mayExist(&events[i]) {
			doubtful = append(doubtful, events[i])
		}
	}
	if len(doubtful) == 0 {
		return events, nil, nil
	}
	var found map[int64]struct{}
	if err := d.retry(ctx, "look up rows in clickhouse", d.withinOutage(false), func(ctx context.Context) error {
		var err error
		found, err = d.sink.ExistingIDs(ctx, doubtful)
		if err != nil {
			d.cfg.Metrics.AddError(metrics.StageInsert)
		}
		return err
	}); err != nil {
		return nil, nil, err
	}
	if len(found) == 0 {
		return events, nil, nil
	}
	rest = events[:0:0]
	for i := range events {
		if _, ok := found[events[i].ID]; ok {
			present = append(present, events[i])
			continue
		}
		rest = append(rest, events[i])
	}
	d.log.Info("rows found in clickhouse are not sent again", zap.Int("already_in_clickhouse", len(present)), zap.Int("to_insert", len(rest)))
	return rest, present, nil
}

// insert writes events, retrying transient errors under the outage bound.
// When the server refuses the insert for its content (a value it cannot store)
// or its size or spread (too many parts, memory), it splits the rows in halves
// until the cause is isolated: one bad row never blocks the others. A single
// row refused for a value is rejected; a single row refused for size is the
// server's trouble (retried under the outage bound, then deferred) for the
// writer, and rejected for the sweep, which does not wait.
//
// uncertain says ClickHouse may hold some of events already (the halves of an
// insert that failed for its size may have been partly written).
func (d *run) insert(ctx context.Context, events []record.Event, uncertain bool) (inserted []record.Event, rejected []outboxstore.Failure, err error) {
	if len(events) == 0 {
		return nil, nil, nil
	}
	// After a failure whose outcome is unknown (a timeout, a reset, a lost
	// answer, UNKNOWN_STATUS_OF_INSERT, an insert over several partitions of
	// which some were committed) ClickHouse may hold some or all of the rows.
	// Sending them again blindly would duplicate them: we look up what it
	// holds (the sink first waits for inserts still running there) and send
	// only the rest; on modern servers the copy also carries the same
	// deduplication token, so the server drops what it had committed anyway.
	ctx = sink.WithInsertAttempt(ctx, sink.NewAttempt())
	toSend, present := events, []record.Event(nil)
	err = d.retry(ctx, "insert into clickhouse", d.withinOutage(len(events) > 1), func(ctx context.Context) error {
		if uncertain {
			found, err := d.sink.ExistingIDs(ctx, toSend)
			if err != nil {
				d.cfg.Metrics.AddError(metrics.StageInsert)
				return err
			}
			if len(found) > 0 {
				rest := toSend[:0:0]
				for i := range toSend {
					if _, ok := found[toSend[i].ID]; ok {
						present = append(present, toSend[i])
					} else {
						rest = append(rest, toSend[i])
					}
				}
				d.log.Info("insert with unknown outcome: rows found in clickhouse are not sent again",
					zap.Int("found", len(found)), zap.Int("to_send", len(rest)))
				toSend = rest
			}
			uncertain = false
			if len(toSend) == 0 {
				return nil
			}
		}
		t0 := time.Now()
		err := d.sink.Insert(ctx, toSend)
		telemetry.RecordInsert(trace.SpanFromContext(ctx), len(toSend), time.Since(t0), err)
		if err != nil {
			d.cfg.Metrics.AddError(metrics.StageInsert)
			uncertain = fault.Retryable(err)
		}
		return err
	})
	if err == nil {
		if len(present) == 0 {
			return toSend, nil, nil
		}
		return append(present, toSend...), nil, nil
	}
	// Rows found in ClickHouse are delivered; the rest goes on below.
	inserted, events = present, toSend
	kind := fault.Of(err)
	switch {
	case kind == fault.Rejected && len(events) == 1:
		d.rejectCodes[fault.ClickHouseCode(err)]++
		return inserted, []outboxstore.Failure{{ID: events[0].ID, Xid: events[0].Xid, Reason: "clickhouse rejected the event: " + err.Error()}}, nil
	case kind == fault.TooBig && len(events) == 1 && d.cfg.OutageFailAfter < 0:
		// Refused for size even alone, by a caller that does not wait (the
		// sweep): it counts an attempt like a bad row, so such a row ends as a
		// dead letter instead of stopping every sweep at its turn. Not a
		// table error: it says nothing about the other rows.
		return inserted, []outboxstore.Failure{{ID: events[0].ID, Xid: events[0].Xid, Reason: "clickhouse refused the event even alone: " + err.Error()}}, nil
	case (kind == fault.Rejected || kind == fault.TooBig) && len(events) > 1:
		mid := len(events) / 2
		tooBig := kind == fault.TooBig
		okA, badA, err := d.insert(ctx, events[:mid], tooBig)
		inserted = append(inserted, okA...)
		if err != nil {
			return inserted, badA, err
		}
		okB, badB, err := d.insert(ctx, events[mid:], tooBig)
		return append(inserted, okB...), append(badA, badB...), err
	}
	return inserted, nil, err
}

// withinOutage is the retry rule under the outage bound: transient ClickHouse
// errors are retried until OutageFailAfter has passed since the delivery
// began. With split, an insert refused for its size is not retried but split.
func (d *run) withinOutage(split bool) func(error) bool {
	return func(err error) bool {
		if split && fault.Of(err) == fault.TooBig {
			return false
		}
		bound := d.cfg.OutageFailAfter
		return fault.Retryable(err) && bound >= 0 && (bound == 0 || time.Since(d.start) < bound)
	}
}

// outage reports whether err ended a bounded retry because ClickHouse stayed
// unavailable (rather than a shutdown or an error waiting cannot fix).
func (d *run) outage(ctx context.Context, err error) bool {
	return err != nil && fault.Retryable(err) && ctx.Err() == nil
}

func (d *run) retry(ctx context.Context, what string, retryable func(error) bool, op func(context.Context) error) error {
	err := retry.Do(ctx, d.cfg.Retry, retryable, func(attempt int, wait time.Duration, err error) {
		d.log.Warn(what+" failed, retrying", zap.Int("attempt", attempt), zap.Duration("wait", wait), zap.Error(err))
	}, op)
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	return nil
}
