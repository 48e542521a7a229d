package sweep

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/zap"

	"github.com/outbox-streamer/outbox-streamer/internal/outboxstore"
	"github.com/outbox-streamer/outbox-streamer/internal/record"
)

// handOverReason is the last_error of backfill rows left to the sweep.
const handOverReason = "backfill: committed before the replication slot existed; ClickHouse failed the backfill, delivered by the sweep"

// handOverPage bounds the rows one hand-over statement marks.
const handOverPage = 10000

// StartBackfill imports a new replication slot's exported snapshot and
// returns the backfill, which delivers the rows the slot will never carry:
// those pending in the snapshot, committed before the slot existed. Call it
// before the stream starts (the export ends with the replication
// connection's next command); run the backfill beside the stream (its rows
// are not the stream's). Workers take the rows in pages of BatchSize,
// in id order, each in one transaction: the rows still pending are taken by
// their final update (outboxstore.TakePending), delivered through the
// engine — every row looked up in ClickHouse first, since an earlier slot or
// an interrupted backfill may have delivered it — and committed. So each
// delivered row is written once, where marking the backlog failed for the
// sweep wrote it twice and locked it once more.
//
// Nothing is lost or sent twice when the process dies part-way: an
// uncommitted page is rolled back to pending, and with the rest of the
// backlog it is stranded — pending although the slot has passed its commit —
// so the next sweeps rescue it (rescueStranded) and deliver it after looking
// in ClickHouse. A rescue or another sweeper running meanwhile cannot deliver
// a page twice either: a page's rows are locked by its update until its
// commit (the rescue skips locked rows), and the update takes only rows
// still pending (a row the rescue made failed is the sweep's).
//
// If ClickHouse fails a page (unavailable, or an error waiting cannot fix),
// the page is rolled back and it and the rest of the backlog are marked
// failed and due, for the sweep (Result.HandedOver): the start does not wait
// for ClickHouse, as when the backfill only marked rows.
func (s *Sweeper) StartBackfill(ctx context.Context, snapshot string) (backfill func(context.Context) (Result, error), err error) {
	backlog, err := s.store.OpenSlotBacklog(ctx, snapshot)
	if err != nil {
		return nil, err
	}
	return func(ctx context.Context) (Result, error) {
		defer backlog.Close()
		return s.backfill(ctx, backlog)
	}, nil
}

// Backfill is StartBackfill and the backfill, in one call.
func (s *Sweeper) Backfill(ctx context.Context, snapshot string) (Result, error) {
	backfill, err := s.StartBackfill(ctx, snapshot)
	if err != nil {
		return Result{}, err
	}
	return backfill(ctx)
}

func (s *Sweeper) backfill(ctx context.Context, backlog *outboxstore.SlotBacklog) (Result, error) {
	start := time.Now()
	res, err := s.deliverBacklog(ctx, backlog, start)
	if errors.Is(err, errHandedOver) && ctx.Err() == nil {
		// As when the backfill only marked rows, the start does not wait for
		// ClickHouse: the sweep tries again every period.
		s.log.Warn("clickhouse failed the backfill; the rest of the backlog is left to the sweep", zap.Error(err))
		err = s.handOver(ctx, backlog, &res)
	}
	res.Took = time.Since(start)
	if err == nil {
		err = ctx.Err()
	}
	s.logBackfill(ctx, res, err)
	return res, err
}

// deliverBacklog runs the backfill's pages on the workers.
func (s *Sweeper) deliverBacklog(ctx context.Context, backlog *outboxstore.SlotBacklog, start time.Time) (Result, error) {
	if err := s.engine.Sink().Ready(ctx); err != nil {
		return Result{}, fmt.Errorf("%w: %w", errHandedOver, err)
	}
	if err := s.holdForStandby(ctx); err != nil {
		return Result{}, err
	}
	// Workers' pages are disjoint, so one's ClickHouse insert overlaps
	// another's update and commit in PostgreSQL.
	return s.workers(ctx, start, "backfill progress", func(ctx context.Context, r *Result) (int, error) {
		ids, err := backlog.Next(ctx, s.cfg.BatchSize)
		if err != nil || len(ids) == 0 {
			return 0, err
		}
		return len(ids), s.backfillPage(ctx, ids, r)
	})
}

// logBackfill logs how a backfill ended; other errors are the caller's to log.
func (s *Sweeper) logBackfill(ctx context.Context, res Result, err error) {
	switch {
	case ctx.Err() != nil:
		s.log.Info("backfill interrupted: the rows not delivered stay pending, for the sweep's rescue of stranded rows",
			zap.Int64("delivered", res.Delivered+res.AlreadyPresent), zap.Duration("took", res.Took))
	case err == nil:
		s.log.Info("backfill finished", zap.Int64("rows", res.Backfilled), zap.Int64("delivered", res.Delivered),
			zap.Int64("already_present", res.AlreadyPresent), zap.Int64("failed", res.Failed), zap.Int64("dead", res.Dead),
			zap.Int64("handed_to_sweep", res.HandedOver), zap.Duration("took", res.Took))
	}
}

// errHandedOver means ClickHouse failed a page (unavailable, or an error
// waiting cannot fix, such as a table refusing every row) and the page was
// left to the sweep; the backfill leaves the rest to it too.
var errHandedOver = errors.New("backfill page left to the sweep")

// backfillPage takes the rows of ids still pending, delivers them and commits
// their status (see Backfill).
func (s *Sweeper) backfillPage(ctx context.Context, ids []int64, res *Result) error {
	tx, err := s.store.Begin(ctx)
	if err != nil {
		return fmt.Errorf("backfill: %w", err)
	}
	defer tx.Rollback(context.Background()) //nolint:errcheck // after Commit this is a no-op
	store := s.store.WithTx(tx)
	taken, err := store.TakePending(ctx, ids, s.cfg.TimeZone)
	if err != nil {
		return fmt.Errorf("backfill: %w", err)
	}
	if len(taken) == 0 {
		return nil // the rescue (or a hand) had moved them all on
	}
	events, attempts := eventsOf(taken)
	out, err := s.engine.Deliver(ctx, events, func(*record.Event) bool { return true })
	if err == nil && len(out.Deferred) > 0 {
		err = s.unavailable(out.OutageErr)
	}
	if err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("backfill: %w", err) // rolled back: pending, for the rescue
		}
		return s.handOverPage(ctx, tx, ids, res, err)
	}
	if err := store.FailTaken(ctx, out.Failed); err != nil {
		return fmt.Errorf("backfill: %w", err)
	}
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("backfill: commit: %w", err)
	}
	s.count(res, out, attempts)
	res.Backfilled += int64(len(taken))
	return nil
}

// handOverPage rolls back a page ClickHouse failed and marks its rows for the
// sweep, which looks in ClickHouse first for those the failed delivery may
// have inserted. The rollback comes first: in tx the rows read processed,
// which MarkForSweep leaves alone.
func (s *Sweeper) handOverPage(ctx context.Context, tx pgx.Tx, ids []int64, res *Result, cause error) error {
	if err := tx.Rollback(ctx); err != nil {
		return fmt.Errorf("backfill: roll back: %w", err)
	}
	n, err := s.store.MarkForSweep(ctx, ids, handOverReason)
	res.HandedOver += n
	res.Backfilled += n
	if err != nil {
		return fmt.Errorf("backfill: %w", err)
	}
	return fmt.Errorf("%w: %w", errHandedOver, cause)
}

// handOver marks the backlog's rows not yet taken failed and due, for the
// sweep: the start must not wait for ClickHouse.
func (s *Sweeper) handOver(ctx context.Context, backlog *outboxstore.SlotBacklog, res *Result) error {
	for {
		ids, err := backlog.Next(ctx, handOverPage)
		if err != nil || len(ids) == 0 {
			return err
		}
		n, err := s.store.MarkForSweep(ctx, ids, handOverReason)
		res.HandedOver += n
		res.Backfilled += n
		if err != nil {
			return fmt.Errorf("backfill: %w", err)
		}
	}
}
