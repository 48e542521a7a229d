// Package pipeline connects the stages of streaming: the replication stream's
// batches go to the writer, which records them in flight, hands them to the
// delivery engine (internal/delivery), sets the outbox rows' status and only
// then resolves them for acknowledgement; beside it run the sweep and the
// outbox's maintenance. It owns the order of those steps, not their SQL.
package pipeline

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel/trace"
	"go.uber.org/zap"

	"github.com/outbox-streamer/outbox-streamer/internal/batch"
	"github.com/outbox-streamer/outbox-streamer/internal/delivery"
	"github.com/outbox-streamer/outbox-streamer/internal/fault"
	"github.com/outbox-streamer/outbox-streamer/internal/metrics"
	"github.com/outbox-streamer/outbox-streamer/internal/outboxstore"
	"github.com/outbox-streamer/outbox-streamer/internal/record"
	"github.com/outbox-streamer/outbox-streamer/internal/retry"
	"github.com/outbox-streamer/outbox-streamer/internal/telemetry"
)

// Sink is where events go (implemented by *sink.Client).
type Sink = delivery.Sink

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
	// MaxInsertBytes caps the bytes (record.Event.Size) of a merged insert
	// (CLICKHOUSE_BATCH_MAX_BYTES); zero: no cap. A batch over it alone is
	// still sent whole: the stream bounds batches by bytes too.
	MaxInsertBytes int
	// FullBatch is the stream's batch size (EVENT_BATCH_SIZE) and Linger its
	// timeout (EVENT_BATCH_TIMEOUT). A batch that arrives full was cut by size,
	// so rows are arriving faster than one batch per Linger: merge then waits
	// up to Linger for more batches to fill the insert. Zero: no waiting.
	FullBatch int
	Linger    time.Duration
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
	// Hold, when set (STANDBY_HOLD), is waited on before a batch's rows
	// reach the event table, for the end of its highest commit.
	Hold Hold
}

// Hold waits until a standby has flushed the WAL up to an LSN, or past
// every commit so far when it is zero (implemented by *standby.Hold).
type Hold interface {
	Wait(ctx context.Context, lsn uint64) error
}

// Writer is the stream's consuming stage: it merges queued batches into
// inserts, records the in-flight LSN, delivers the rows through the delivery
// engine (to ClickHouse through the Sink), settles their status in the outbox
// and resolves them in the tracker, which is what lets the stream acknowledge
// them. Staged transactions (stager) and the in-doubt bound (ceiling) hang
// off it.
type Writer struct {
	cfg      WriterConfig
	engine   *delivery.Engine
	outbox   Outbox
	inflight InflightRecorder
	resolver Resolver
	log      *zap.Logger
	recorded uint64
	next     *batch.Batch // taken from the queue by merge, for the next insert
	// spare is the events slice of an earlier merged insert, cleared, for
	// the next merge to grow into instead of allocating.
	spare  []record.Event
	stager *stager // nil: streamed transactions are not staged
	// stale, when this session does not stage, is where earlier sessions
	// staged: cleared at the start all the same (see clearStale).
	stale   *stager
	ceiling *ceiling // nil: the in-flight record alone bounds the replay
}

// ErrTableRejectsRows means ClickHouse refused every row of a batch with the
// same error: the table, not the events, is wrong. The writer stops.
var ErrTableRejectsRows = delivery.ErrTableRejectsRows

// NewWriter returns a writer.
func NewWriter(cfg WriterConfig, s Sink, o Outbox, inflight InflightRecorder, res Resolver, log *zap.Logger) *Writer {
	log = log.Named("writer")
	engine := delivery.New(delivery.Config{Retry: cfg.Retry, OutageFailAfter: cfg.OutageFailAfter, Metrics: cfg.Metrics}, s, log)
	return &Writer{cfg: cfg, engine: engine, outbox: o, inflight: inflight, resolver: res, log: log, recorded: cfg.InDoubtUntil}
}

// Run writes batches from in until it is closed, then returns nil. It returns early
// only on an error it cannot retry; ctx should end only when the process must stop
// without draining.
//
// Two stages overlap: while the status of batch N is written to PostgreSQL, batch N+1
// goes to ClickHouse; and settleWorkers status updates run at once, because the
// UPDATE of a merged insert's rows takes longer than its insert (a 1,000,000-row
// transaction was paced by one PostgreSQL backend). Acknowledgement order is
// unaffected: the Tracker only moves over contiguous resolved rows, whatever order
// they are resolved in, and each batch's in-flight record is written before its
// insert, so a crash between the stages is reconciled like any other.
func (w *Writer) Run(ctx context.Context, in <-chan *batch.Batch) error {
	w.raiseInDoubt(ctx)
	switch {
	case w.stager != nil:
		w.stager.clearAtStart(ctx)
	case w.stale != nil:
		w.clearStale(ctx)
	}
	outcomes := make(chan *outcome, 1)
	var settled sync.WaitGroup
	var settleMu sync.Mutex
	var settleErr error
	var settleFailed atomic.Bool
	for range settleWorkers {
		settled.Add(1)
		go func() {
			defer settled.Done()
			for o := range outcomes {
				if settleFailed.Load() {
					o.end(errSettleStopped) // after a failure, drain without touching the outbox
					continue
				}
				if err := w.settle(ctx, o); err != nil {
					settleMu.Lock()
					if settleErr == nil {
						settleErr = err
					}
					settleMu.Unlock()
					settleFailed.Store(true)
				}
			}
		}()
	}
	var err error
	for {
		b := w.next
		w.next = nil
		if b == nil {
			var ok bool
			if b, ok = <-in; !ok {
				break
			}
		}
		if settleFailed.Load() {
			break // unacknowledged: replayed on the next start
		}
		b = w.merge(b, in)
		if !b.Tracked() {
			w.stager.handle(ctx, b)
			continue
		}
		var o *outcome
		if o, err = w.deliver(ctx, b); err != nil {
			break
		}
		w.release(b)
		outcomes <- o
	}
	close(outcomes)
	settled.Wait()
	if err == nil {
		err = settleErr
	}
	return err
}

// settleWorkers is how many batches' status updates may run at once.
const settleWorkers = 2

// errSettleStopped ends the spans of outcomes left after a failed status update.
var errSettleStopped = errors.New("not settled: an earlier status update failed")

// merge appends batches already queued behind b, up to MaxInsertRows, so a writer that
// fell behind catches up with fewer, larger inserts. Queued batches are contiguous.
//
// When b is an ordinary batch that arrived full (see WriterConfig.FullBatch),
// merge also waits up to Linger for batches still to come: ClickHouse's CPU
// per INSERT is nearly fixed, so a flow that would otherwise go out in
// inserts of a few batches each costs it several times more per row. A batch
// cut by the timeout means the flow is slow, and it goes out at once.
//
// A queued batch that would take the insert past MaxInsertBytes, or that
// does not belong in b's insert (sameInsert), stays queued for the next
// insert: it is peeked at through w.next, never dropped.
func (w *Writer) merge(b *batch.Batch, in <-chan *batch.Batch) *batch.Batch {
	var deadline <-chan time.Time
	if w.cfg.Linger > 0 && w.cfg.FullBatch > 0 && b.Streamed == nil && b.Len() >= w.cfg.FullBatch {
		t := time.NewTimer(w.cfg.Linger)
		defer t.Stop()
		deadline = t.C
	}
	for b.Len() < w.cfg.MaxInsertRows {
		var next *batch.Batch
		var ok bool
		select {
		case next, ok = <-in:
		default:
			if deadline == nil {
				return b
			}
			select {
			case next, ok = <-in:
			case <-deadline:
				return b
			}
		}
		if !ok {
			return b
		}
		if !sameInsert(b, next) || (w.cfg.MaxInsertBytes > 0 && b.Bytes+next.Bytes > w.cfg.MaxInsertBytes) {
			w.next = next
			return b
		}
		w.appendBatch(b, next, len(in))
		if next.Streamed == nil {
			w.recycle(next.Events) // copied into b
		}
	}
	return b
}

// sameInsert reports whether next may join b's insert: both ordinary
// batches, both batches of one committed streamed transaction (they share
// its batch.Streamed), or both staging batches of one transaction (the
// stream cuts them at EVENT_BATCH_SIZE to bound what waits in the queue). An
// abort (OpDrop) joins nothing.
func sameInsert(b, next *batch.Batch) bool {
	if b.Streamed == nil || b.Streamed.Op != batch.OpStage {
		return b.Streamed == next.Streamed && (b.Streamed == nil || b.Streamed.Op == batch.OpCommit)
	}
	return next.Streamed != nil && next.Streamed.Op == batch.OpStage && next.Streamed.Xid == b.Streamed.Xid
}

// appendBatch appends next's rows to b, with their subtransactions for a
// staging batch.
func (w *Writer) appendBatch(b, next *batch.Batch, queued int) {
	if b.Streamed != nil && b.Streamed.Op == batch.OpStage {
		if need := len(b.Streamed.SubXids) + len(next.Streamed.SubXids); need > cap(b.Streamed.SubXids) {
			grown := make([]uint32, len(b.Streamed.SubXids), max(need, w.cfg.MaxInsertRows))
			copy(grown, b.Streamed.SubXids)
			b.Streamed.SubXids = grown
		}
		b.Streamed.SubXids = append(b.Streamed.SubXids, next.Streamed.SubXids...)
	}
	w.appendEvents(b, next, queued)
	b.MaxCommitLSN = max(b.MaxCommitLSN, next.MaxCommitLSN)
	// next's rows are the later ones: its commit end, or none, covers both.
	b.CommitEnd = next.CommitEnd
}

// appendEvents appends next's rows to b. It grows b once for everything
// queued now (up to the cap), not by doubling: a merged insert of 10,000
// rows was copied four times, a quarter of the streamer's allocations in
// profiles. When nothing is queued (merge waiting for batches one by one)
// it doubles, or growing by one batch at a time would copy the insert once
// per batch.
func (w *Writer) appendEvents(b, next *batch.Batch, queued int) {
	if need := b.Len() + next.Len(); need > cap(b.Events) {
		want := min(max(need, b.Len()+next.Len()*(1+queued), 2*b.Len()), w.cfg.MaxInsertRows+next.Len())
		var grown []record.Event
		if cap(w.spare) >= max(want, need) {
			grown, w.spare = w.spare[:b.Len()], nil
		} else {
			grown = make([]record.Event, b.Len(), max(want, need))
		}
		copy(grown, b.Events)
		if b.Streamed == nil {
			w.recycle(b.Events)
		}
		b.Events = grown
	}
	b.Events = append(b.Events, next.Events...)
	b.Bytes += next.Bytes
}

// recycle hands a batch's events back to the stream's batches once they
// were copied into a merged insert; only slices of the stream's batch size,
// so the queue's batches do not grow.
func (w *Writer) recycle(events []record.Event) {
	if w.cfg.FullBatch > 0 && cap(events) <= w.cfg.FullBatch {
		batch.Recycle(events)
	}
}

// release recycles an ordinary batch's events after its insert (its outcome
// keeps ids, not events): a merged insert's slice becomes the next merge's
// spare, a batch's own goes back to the stream.
func (w *Writer) release(b *batch.Batch) {
	if b.Streamed != nil {
		return // the stager may still read it
	}
	if cap(b.Events) > w.cfg.FullBatch {
		if cap(b.Events) > cap(w.spare) {
			clear(b.Events)
			w.spare = b.Events[:0]
		}
	} else {
		w.recycle(b.Events)
	}
	b.Events = nil
}

// outcome is a batch that went through ClickHouse and whose outbox rows still need
// their new status.
type outcome struct {
	// The batch's rows by sequence number; not its events, which the
	// insert is done with (holding them through settle kept a third merged
	// insert's worth of rows alive).
	firstSeq, endSeq uint64
	rows             int
	span             trace.Span
	start            time.Time
	processed        []outboxstore.Ref     // in ClickHouse: inserted now or found there
	failed           []outboxstore.Failure // invalid, or rejected by the server
	deferred         []outboxstore.Ref     // ClickHouse unavailable past the outage bound
	vanished         int                   // gone from the outbox when their status was set
	outageErr        error
	inserted         int
	present          int
}

// promoted records that events are in ClickHouse, copied from staging.
func (o *outcome) promoted(events []record.Event) {
	o.processed = make([]outboxstore.Ref, len(events))
	for i := range events {
		o.processed[i] = outboxstore.Ref{ID: events[i].ID, Xid: events[i].Xid}
	}
	o.inserted = len(events)
}

func (o *outcome) end(err error) {
	telemetry.EndBatchSpan(o.span, o.inserted, o.present, len(o.failed)+len(o.deferred), err)
}

// deliver is the first stage: the in-flight record is written, replayed rows
// the sweep owns now are dropped, and the delivery engine takes the rest to
// ClickHouse (validation, reconciliation of in-doubt rows, one insert, bad
// rows isolated, the outage bound).
func (w *Writer) deliver(ctx context.Context, b *batch.Batch) (_ *outcome, err error) {
	m := w.cfg.Metrics
	var firstLSN uint64
	if b.Len() > 0 {
		firstLSN = b.Events[0].CommitLSN
	}
	o := &outcome{firstSeq: b.FirstSeq, endSeq: b.EndSeq(), rows: b.Len(), start: time.Now()}
	ctx, o.span = telemetry.StartBatchSpan(ctx, b.Len(), firstLSN, b.MaxCommitLSN)
	defer func() {
		if err != nil {
			o.end(err)
		}
	}()

	w.raiseInDoubt(ctx)
	// Record the in-flight position before anything can reach ClickHouse, so that a
	// crash after the insert leaves a trace that these rows must be checked.
	if b.MaxCommitLSN > w.recorded {
		if err := w.retry(ctx, "record in-flight batch", func(ctx context.Context) error {
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
	// Nothing reaches the event table (an insert, or the copy of a staged
	// transaction) before the standby has the commit: after a failover to
	// it, ClickHouse would hold events of transactions that never happened.
	if w.cfg.Hold != nil {
		if err := w.cfg.Hold.Wait(ctx, b.CommitEnd); err != nil {
			return nil, fmt.Errorf("wait for the standby (STANDBY_HOLD): %w", err)
		}
	}
	if b.Streamed != nil {
		defer w.stager.settled(b)
		if w.stager.promoted(ctx, b, w.cfg.InDoubtUntil) {
			o.promoted(b.Events)
			m.ObserveDelivered(time.Now(), b.Events)
			return o, nil
		}
	}
	events, err := w.dropOwned(ctx, b.Events)
	if err != nil {
		return nil, err
	}
	res, err := w.engine.Deliver(ctx, events, w.inDoubt)
	if err != nil {
		return nil, err
	}
	if len(res.Inserted) > 0 {
		m.ObserveBatch(len(res.Inserted), res.InsertTook)
		m.ObserveDelivered(time.Now(), res.Inserted)
	}
	o.processed, o.failed, o.deferred, o.outageErr = res.Processed(), res.Failed, res.DeferredRefs(), res.OutageErr
	o.inserted, o.present = len(res.Inserted), len(res.Present)
	return o, nil
}

// inDoubt reports whether ev may have reached ClickHouse already: before the
// last stop (its transaction committed at or below the recorded in-flight
// LSN), or by a copy from staging whose outcome is unknown.
func (w *Writer) inDoubt(ev *record.Event) bool {
	if w.ceiling != nil && !w.ceiling.known {
		return true // what ClickHouse holds is not known yet
	}
	return ev.CommitLSN != 0 && ev.CommitLSN <= w.cfg.InDoubtUntil || w.stager.uncertain(ev.Xid)
}

// dropOwned drops the in-doubt rows that are no longer pending: after a crash
// such replayed rows belong to the sweep (marked failed) or are done, and the
// stream must not deliver them again.
func (w *Writer) dropOwned(ctx context.Context, events []record.Event) ([]record.Event, error) {
	var ids []int64
	for i := range events {
		if w.inDoubt(&events[i]) {
			ids = append(ids, events[i].ID)
		}
	}
	if len(ids) == 0 {
		return events, nil
	}
	var owned map[int64]struct{}
	if err := w.retry(ctx, "read status of in-doubt rows", func(ctx context.Context) error {
		var err error
		owned, err = w.outbox.NotPending(ctx, ids)
		return err
	}); err != nil {
		return nil, err
	}
	if len(owned) == 0 {
		return events, nil
	}
	kept := make([]record.Event, 0, len(events)-len(owned))
	for i := range events {
		if _, ok := owned[events[i].ID]; !ok {
			kept = append(kept, events[i])
		}
	}
	return kept, nil
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
	if err := w.resolver.Resolve(o.firstSeq, o.endSeq); err != nil {
		return fmt.Errorf("resolve batch: %w", err)
	}
	m.AddAlreadyPresent(o.present)
	if o.vanished > 0 {
		// Deleted in their own transaction, or while in flight: nothing to wait for.
		m.AddVanished(o.vanished)
		w.log.Info("rows gone from the outbox before their status was set: settled", zap.Int("rows", o.vanished))
	}
	m.AddFailed(len(o.failed) + len(o.deferred))
	w.log.Debug("batch delivered", zap.Int("rows", o.rows), zap.Int("inserted", o.inserted),
		zap.Int("already_present", o.present), zap.Int("failed", len(o.failed)+len(o.deferred)),
		zap.Duration("took", time.Since(o.start)))
	return nil
}

// statusUpdate runs one outbox status change with retries, timing it for the
// metrics and the batch's span.
func (w *Writer) statusUpdate(ctx context.Context, span trace.Span, what string, rows int, op func(context.Context) error) error {
	t0 := time.Now()
	err := w.retry(ctx, what, func(ctx context.Context) error {
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

// retry runs a PostgreSQL operation until it succeeds or fails for good.
func (w *Writer) retry(ctx context.Context, what string, op func(context.Context) error) error {
	err := retry.Do(ctx, w.cfg.Retry, fault.Retryable, func(attempt int, wait time.Duration, err error) {
		w.log.Warn(what+" failed, retrying", zap.Int("attempt", attempt), zap.Duration("wait", wait), zap.Error(err))
	}, op)
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	return nil
}
