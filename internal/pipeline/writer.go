// Package pipeline connects the stages: the replication stream's batches go through
// the writer, which validates, reconciles in-doubt rows, inserts into ClickHouse,
// updates the outbox rows' status and only then resolves them for acknowledgement.
package pipeline

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"go.opentelemetry.io/otel/trace"
	"go.uber.org/zap"

	"github.com/outbox-streamer/outbox-streamer/internal/batch"
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

// Outbox updates the status of outbox rows (implemented by *outboxstore.Store).
type Outbox interface {
	MarkProcessed(ctx context.Context, refs []outboxstore.Ref) (vanished []int64, err error)
	MarkFailed(ctx context.Context, failures []outboxstore.Failure) (vanished []int64, err error)
	MarkDeferred(ctx context.Context, refs []outboxstore.Ref, reason string) (vanished []int64, err error)
	NotPending(ctx context.Context, ids []int64) (map[int64]struct{}, error)
}

// InflightRecorder keeps the durable in-flight record (implemented by
// *checkpoint.Store).
type InflightRecorder interface {
	RecordInflight(ctx context.Context, lsn uint64) error
}

// Resolver is told which rows are durable (implemented by *checkpoint.Tracker).
type Resolver interface {
	Resolve(from, to uint64) error
}

// WriterConfig tunes the writer.
type WriterConfig struct {
	// MaxInsertRows caps the rows of one ClickHouse insert (CLICKHOUSE_BATCH_SIZE).
	// When the writer falls behind, queued batches are merged up to this size.
	MaxInsertRows int
	// Retry is the backoff for transient ClickHouse and PostgreSQL errors.
	Retry retry.Policy
	// InDoubtUntil is the in-flight LSN recorded before the last stop: replayed rows
	// whose commit LSN is at or below it may already be in ClickHouse and are checked.
	InDoubtUntil uint64
	// OutageFailAfter bounds how long a batch is retried while ClickHouse is
	// unavailable (CLICKHOUSE_OUTAGE_FAIL_AFTER). After it the rows are marked failed
	// with a next-attempt time and acknowledged, so the slot does not retain WAL while
	// ClickHouse is away; the sweep delivers them later. Zero retries forever.
	OutageFailAfter time.Duration
	// Metrics receives the writer's counters and timings (nil: none).
	Metrics *metrics.Metrics
}

// Writer is the consuming stage.
type Writer struct {
	cfg      WriterConfig
	sink     Sink
	outbox   Outbox
	inflight InflightRecorder
	resolver Resolver
	log      *zap.Logger
	recorded uint64
	// rejectCodes counts the error codes of rows the server refused in the
	// current insert (insertBounded), to tell a table error from bad rows.
	rejectCodes map[int32]int
}

// ErrTableRejectsRows means ClickHouse refused every row of a batch with the
// same error: the table, not the events, is wrong. The writer stops.
var ErrTableRejectsRows = errors.New("clickhouse rejects every row")

// tableErrorMinRows is the smallest batch whose rows, all refused the same
// way, count as a table error rather than as that many bad rows.
const tableErrorMinRows = 10

// NewWriter returns a writer.
func NewWriter(cfg WriterConfig, s Sink, o Outbox, inflight InflightRecorder, res Resolver, log *zap.Logger) *Writer {
	return &Writer{cfg: cfg, sink: s, outbox: o, inflight: inflight, resolver: res, log: log.Named("writer"), recorded: cfg.InDoubtUntil}
}

// Run writes batches from in until it is closed, then returns nil. It returns early
// only on an error it cannot retry; ctx should end only when the process must stop
// without draining.
//
// Two stages overlap: while the status of batch N is written to PostgreSQL, batch N+1
// goes to ClickHouse. Acknowledgement order is unaffected: the Tracker only moves
// over contiguous resolved rows, and each batch's in-flight record is written before
// its insert, so a crash between the two stages is reconciled like any other.
func (w *Writer) Run(ctx context.Context, in <-chan *batch.Batch) error {
	outcomes := make(chan *outcome, 1)
	settled := make(chan struct{})
	var settleErr error
	var settleFailed atomic.Bool
	go func() {
		defer close(settled)
		for o := range outcomes {
			if settleErr != nil {
				o.end(settleErr) // after a failure, drain without touching the outbox
				continue
			}
			if settleErr = w.settle(ctx, o); settleErr != nil {
				settleFailed.Store(true)
			}
		}
	}()
	var err error
	for b := range in {
		if settleFailed.Load() {
			break
		}
		b = w.merge(b, in)
		var o *outcome
		if o, err = w.deliver(ctx, b); err != nil {
			break
		}
		outcomes <- o
	}
	close(outcomes)
	<-settled
	if err == nil {
		err = settleErr
	}
	return err
}

// merge appends batches already queued behind b, up to MaxInsertRows, so a writer that
// fell behind catches up with fewer, larger inserts. Queued batches are contiguous.
func (w *Writer) merge(b *batch.Batch, in <-chan *batch.Batch) *batch.Batch {
	for b.Len() < w.cfg.MaxInsertRows {
		select {
		case next, ok := <-in:
			if !ok {
				return b
			}
			b.Events = append(b.Events, next.Events...)
			if next.MaxCommitLSN > b.MaxCommitLSN {
				b.MaxCommitLSN = next.MaxCommitLSN
			}
		default:
			return b
		}
	}
	return b
}

// outcome is a batch that went through ClickHouse and whose outbox rows still need
// their new status.
type outcome struct {
	b         *batch.Batch
	span      trace.Span
	start     time.Time
	processed []outboxstore.Ref     // in ClickHouse: inserted now or found there
	failed    []outboxstore.Failure // invalid, or rejected by the server
	deferred  []outboxstore.Ref     // ClickHouse unavailable past the outage bound
	vanished  int                   // gone from the outbox when their status was set
	outageErr error
	inserted  int
	present   int
}

func (o *outcome) end(err error) {
	telemetry.EndBatchSpan(o.span, o.inserted, o.present, len(o.failed)+len(o.deferred), err)
}

// Write delivers one batch and settles it (both stages, one after the other).
func (w *Writer) Write(ctx context.Context, b *batch.Batch) error {
	o, err := w.deliver(ctx, b)
	if err != nil {
		return err
	}
	return w.settle(ctx, o)
}

// deliver is the first stage: invalid rows are set aside as failed, the in-flight
// record is written, in-doubt rows are reconciled, and the rest go to ClickHouse in
// one insert (split only to isolate rows the server rejects).
func (w *Writer) deliver(ctx context.Context, b *batch.Batch) (_ *outcome, err error) {
	m := w.cfg.Metrics
	var firstLSN uint64
	if b.Len() > 0 {
		firstLSN = b.Events[0].CommitLSN
	}
	o := &outcome{b: b, start: time.Now()}
	ctx, o.span = telemetry.StartBatchSpan(ctx, b.Len(), firstLSN, b.MaxCommitLSN)
	defer func() {
		if err != nil {
			o.end(err)
		}
	}()
	// The outage bound runs from here: connecting, the in-doubt lookup and
	// the insert all count against it, so a streamer started (or restarted)
	// while ClickHouse is down hands the rows to the sweep after the bound
	// instead of waiting, or exiting, while the slot retains WAL.
	outageStart := time.Now()
	if err := w.retry(ctx, "connect to clickhouse", w.withinOutage(outageStart), w.sink.Ready); err != nil {
		if !w.outage(ctx, err) {
			return nil, err
		}
		w.deferAll(o, b.Events, err)
		return o, nil
	}
	valid := make([]record.Event, 0, b.Len())
	for i := range b.Events {
		ev := &b.Events[i]
		if err := w.sink.Validate(ev); err != nil {
			o.failed = append(o.failed, outboxstore.Failure{ID: ev.ID, Xid: ev.Xid, Reason: "invalid event: " + err.Error()})
			continue
		}
		valid = append(valid, *ev)
	}

	// Record the in-flight position before anything can reach ClickHouse, so that a
	// crash after the insert leaves a trace that these rows must be checked.
	if b.MaxCommitLSN > w.recorded {
		if err := w.retry(ctx, "record in-flight batch", fault.Retryable, func(ctx context.Context) error {
			err := w.inflight.RecordInflight(ctx, b.MaxCommitLSN)
			if err != nil {
				m.AddError(metrics.StageCheckpoint)
			}
			return err
		}); err != nil {
			return nil, err
		}
		w.recorded = b.MaxCommitLSN
	}

	var present []outboxstore.Ref
	if w.cfg.InDoubtUntil > 0 {
		var rest []record.Event
		if rest, present, err = w.reconcile(ctx, valid, w.withinOutage(outageStart)); err != nil {
			if !w.outage(ctx, err) {
				return nil, err
			}
			// The sweep looks in ClickHouse before it inserts: deferring
			// in-doubt rows cannot duplicate them.
			w.deferAll(o, valid, err)
			return o, nil
		}
		valid = rest
	}

	insertStart := time.Now()
	inserted, rejected, deferred, outageErr, err := w.insertBounded(ctx, valid, outageStart)
	if err != nil {
		return nil, err
	}
	if len(inserted) > 0 {
		accepted := time.Now()
		m.ObserveBatch(len(inserted), accepted.Sub(insertStart))
		m.ObserveDelivered(accepted, inserted)
	}
	o.failed = append(o.failed, rejected...)
	o.processed = make([]outboxstore.Ref, 0, len(inserted)+len(present))
	for i := range inserted {
		o.processed = append(o.processed, refOf(&inserted[i]))
	}
	o.processed = append(o.processed, present...)
	for i := range deferred {
		o.deferred = append(o.deferred, refOf(&deferred[i]))
	}
	o.outageErr = outageErr
	o.inserted, o.present = len(inserted), len(present)
	return o, nil
}

// settle is the second stage: the outbox rows get their new status in PostgreSQL,
// and only then is the batch resolved for acknowledgement.
func (w *Writer) settle(ctx context.Context, o *outcome) (err error) {
	defer func() { o.end(err) }()
	m := w.cfg.Metrics
	ctx = trace.ContextWithSpan(ctx, o.span)
	if len(o.deferred) > 0 {
		reason := fmt.Sprintf("clickhouse unavailable for over %s: %v", w.cfg.OutageFailAfter, o.outageErr)
		w.log.Error("clickhouse unavailable: batch marked failed for the sweep to deliver later",
			zap.Int("rows", len(o.deferred)), zap.Error(o.outageErr))
		if err := w.statusUpdate(ctx, o.span, "mark rows failed after outage", len(o.deferred), func(ctx context.Context) error {
			gone, err := w.outbox.MarkDeferred(ctx, o.deferred, reason)
			o.vanished += len(gone)
			return err
		}); err != nil {
			return err
		}
	}
	if err := w.statusUpdate(ctx, o.span, "mark rows processed", len(o.processed), func(ctx context.Context) error {
		gone, err := w.outbox.MarkProcessed(ctx, o.processed)
		o.vanished += len(gone)
		return err
	}); err != nil {
		return err
	}
	if len(o.failed) > 0 {
		for _, f := range o.failed {
			w.log.Warn("event not delivered", zap.Int64("event_id", f.ID), zap.String("reason", f.Reason))
		}
		if err := w.statusUpdate(ctx, o.span, "mark rows failed", len(o.failed), func(ctx context.Context) error {
			gone, err := w.outbox.MarkFailed(ctx, o.failed)
			o.vanished += len(gone)
			return err
		}); err != nil {
			return err
		}
	}
	if err := w.resolver.Resolve(o.b.FirstSeq, o.b.EndSeq()); err != nil {
		return fmt.Errorf("resolve batch: %w", err)
	}
	m.AddAlreadyPresent(o.present)
	if o.vanished > 0 {
		// Deleted in their own transaction, or while in flight: nothing to wait for.
		m.AddVanished(o.vanished)
		w.log.Info("rows gone from the outbox before their status was set: settled", zap.Int("rows", o.vanished))
	}
	m.AddFailed(len(o.failed) + len(o.deferred))
	w.log.Debug("batch delivered", zap.Int("rows", o.b.Len()), zap.Int("inserted", o.inserted),
		zap.Int("already_present", o.present), zap.Int("failed", len(o.failed)+len(o.deferred)),
		zap.Duration("took", time.Since(o.start)))
	return nil
}

// reconcile handles the rows of an in-doubt batch (one that may have reached
// ClickHouse, or been marked failed, before a crash but was not acknowledged). Rows
// that are no longer pending belong to the sweep or are done: they are dropped. Rows
// ClickHouse already holds are dropped from the insert and returned separately so
// they are still marked processed.
func (w *Writer) reconcile(ctx context.Context, events []record.Event, retryable func(error) bool) (rest []record.Event, present []outboxstore.Ref, err error) {
	var doubtIDs []int64
	for i := range events {
		if events[i].CommitLSN != 0 && events[i].CommitLSN <= w.cfg.InDoubtUntil {
			doubtIDs = append(doubtIDs, events[i].ID)
		}
	}
	if len(doubtIDs) == 0 {
		return events, nil, nil
	}
	var owned map[int64]struct{}
	if err := w.retry(ctx, "read status of in-doubt rows", fault.Retryable, func(ctx context.Context) error {
		var err error
		owned, err = w.outbox.NotPending(ctx, doubtIDs)
		return err
	}); err != nil {
		return nil, nil, err
	}
	var doubtful []record.Event
	kept := events[:0:0]
	for i := range events {
		if _, ok := owned[events[i].ID]; ok {
			continue
		}
		kept = append(kept, events[i])
		if events[i].CommitLSN != 0 && events[i].CommitLSN <= w.cfg.InDoubtUntil {
			doubtful = append(doubtful, events[i])
		}
	}
	events = kept
	if len(doubtful) == 0 {
		return events, nil, nil
	}
	var found map[int64]struct{}
	if err := w.retry(ctx, "look up in-doubt rows", retryable, func(ctx context.Context) error {
		var err error
		found, err = w.sink.ExistingIDs(ctx, doubtful)
		if err != nil {
			w.cfg.Metrics.AddError(metrics.StageInsert)
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
			present = append(present, refOf(&events[i]))
			continue
		}
		rest = append(rest, events[i])
	}
	w.log.Info("reconciled in-doubt rows", zap.Int("already_in_clickhouse", len(present)), zap.Int("to_insert", len(rest)))
	return rest, present, nil
}

// insertBounded is insert with the outage bound: when ClickHouse stays unavailable
// longer than OutageFailAfter, the events come back as deferred with the last error.
func (w *Writer) insertBounded(ctx context.Context, events []record.Event, start time.Time) (inserted []record.Event, rejected []outboxstore.Failure, deferred []record.Event, outageErr, err error) {
	w.rejectCodes = map[int32]int{}
	inserted, rejected, err = w.insert(ctx, events, w.withinOutage(start))
	if err == nil && len(events) >= tableErrorMinRows && len(rejected) == len(events) && len(w.rejectCodes) == 1 {
		// Not bad rows but a table that takes none of them (a column the
		// streamer does not fill whose default fails, a changed type): marking
		// every event dead would empty the outbox into the dead letters.
		return nil, nil, nil, nil, fmt.Errorf("%w: all %d rows of a batch refused the same way (%s): check the event table's schema against `outbox-streamer migrate up`; no row was marked failed",
			ErrTableRejectsRows, len(events), rejected[0].Reason)
	}
	if w.outage(ctx, err) {
		// The bound passed: hand the rows still undelivered to the sweep.
		done := make(map[int64]struct{}, len(inserted)+len(rejected))
		for i := range inserted {
			done[inserted[i].ID] = struct{}{}
		}
		for _, f := range rejected {
			done[f.ID] = struct{}{}
		}
		for i := range events {
			if _, ok := done[events[i].ID]; !ok {
				deferred = append(deferred, events[i])
			}
		}
		return inserted, rejected, deferred, err, nil
	}
	return inserted, rejected, nil, nil, err
}

// insert writes events, retrying transient errors. When the server rejects the data
// itself, it splits the batch in halves until the offending rows are isolated, so
// one bad row never blocks the others.
func (w *Writer) insert(ctx context.Context, events []record.Event, retryable func(error) bool) (inserted []record.Event, rejected []outboxstore.Failure, err error) {
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
	uncertain := false
	err = w.retry(ctx, "insert into clickhouse", retryable, func(ctx context.Context) error {
		if uncertain {
			found, err := w.sink.ExistingIDs(ctx, toSend)
			if err != nil {
				w.cfg.Metrics.AddError(metrics.StageInsert)
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
				w.log.Info("insert with unknown outcome: rows found in clickhouse are not sent again",
					zap.Int("found", len(found)), zap.Int("to_send", len(rest)))
				toSend = rest
			}
			uncertain = false
			if len(toSend) == 0 {
				return nil
			}
		}
		t0 := time.Now()
		err := w.sink.Insert(ctx, toSend)
		telemetry.RecordInsert(trace.SpanFromContext(ctx), len(toSend), time.Since(t0), err)
		if err != nil {
			w.cfg.Metrics.AddError(metrics.StageInsert)
			uncertain = fault.Retryable(err)
		}
		return err
	})
	if err == nil {
		return append(present, toSend...), nil, nil
	}
	// Rows found in ClickHouse are delivered; the rest goes on below.
	inserted, events = present, toSend
	if fault.Of(err) != fault.Rejected {
		return inserted, nil, err
	}
	if len(events) == 1 {
		var ex *clickhouse.Exception
		if errors.As(err, &ex) {
			w.rejectCodes[ex.Code]++
		}
		return inserted, []outboxstore.Failure{{ID: events[0].ID, Xid: events[0].Xid, Reason: "clickhouse rejected the event: " + err.Error()}}, nil
	}
	mid := len(events) / 2
	okA, badA, err := w.insert(ctx, events[:mid], retryable)
	inserted = append(inserted, okA...)
	if err != nil {
		return inserted, badA, err
	}
	okB, badB, err := w.insert(ctx, events[mid:], retryable)
	return append(inserted, okB...), append(badA, badB...), err
}

// withinOutage is the retry rule under the outage bound counted from start:
// transient ClickHouse errors are retried until OutageFailAfter has passed.
func (w *Writer) withinOutage(start time.Time) func(error) bool {
	return func(err error) bool {
		return fault.Retryable(err) && (w.cfg.OutageFailAfter <= 0 || time.Since(start) < w.cfg.OutageFailAfter)
	}
}

// outage reports whether err ended a bounded retry because ClickHouse stayed
// unavailable (rather than a shutdown or an error waiting cannot fix).
func (w *Writer) outage(ctx context.Context, err error) bool {
	return err != nil && fault.Retryable(err) && ctx.Err() == nil
}

// deferAll hands every event of a batch to the sweep after an outage.
func (w *Writer) deferAll(o *outcome, events []record.Event, err error) {
	for i := range events {
		o.deferred = append(o.deferred, refOf(&events[i]))
	}
	o.outageErr = err
}

func refOf(ev *record.Event) outboxstore.Ref { return outboxstore.Ref{ID: ev.ID, Xid: ev.Xid} }

// statusUpdate runs one outbox status change with retries, timing it for the
// metrics and the batch's span.
func (w *Writer) statusUpdate(ctx context.Context, span trace.Span, what string, rows int, op func(context.Context) error) error {
	t0 := time.Now()
	err := w.retry(ctx, what, fault.Retryable, func(ctx context.Context) error {
		err := op(ctx)
		if err != nil {
			w.cfg.Metrics.AddError(metrics.StageStatusUpdate)
		}
		return err
	})
	d := time.Since(t0)
	w.cfg.Metrics.ObserveStatusUpdate(d)
	telemetry.RecordStatusUpdate(span, rows, d, err)
	return err
}

func (w *Writer) retry(ctx context.Context, what string, retryable func(error) bool, op func(context.Context) error) error {
	err := retry.Do(ctx, w.cfg.Retry, retryable, func(attempt int, wait time.Duration, err error) {
		w.log.Warn(what+" failed, retrying", zap.Int("attempt", attempt), zap.Duration("wait", wait), zap.Error(err))
	}, op)
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	return nil
}
