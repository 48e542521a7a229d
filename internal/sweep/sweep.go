// Package sweep delivers the outbox rows the replication stream does not
// carry. The sweep is the polling fallback for rows marked failed (and the
// stranded pending rows it rescues): each round claims due rows in one
// transaction (SELECT ... FOR UPDATE SKIP LOCKED, so several sweepers never
// take the same row), delivers them through the delivery engine and commits
// their status in the same transaction. The backfill (Sweeper.Backfill)
// delivers the rows older than a new slot the same way, page by page, but
// claims pending rows by their final status update instead (one write per
// row), and leaves to the sweep only what it cannot deliver.
package sweep

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/zap"

	"github.com/outbox-streamer/outbox-streamer/internal/delivery"
	"github.com/outbox-streamer/outbox-streamer/internal/fault"
	"github.com/outbox-streamer/outbox-streamer/internal/outboxstore"
	"github.com/outbox-streamer/outbox-streamer/internal/record"
)

// Sink is where the sweep delivers (implemented by *sink.Client).
type Sink = delivery.Sink

// Config tunes a sweep.
type Config struct {
	// BatchSize is the rows locked and delivered per round (and per backfill
	// page): the most rows of one ClickHouse insert (CLICKHOUSE_BATCH_SIZE). A
	// round's cost is mostly fixed (a lookup, an insert, a commit), so a long
	// sweep or a backfill goes at the pace of its rounds.
	BatchSize int
	// TimeZone is the zone of the outbox's TIMESTAMP values (default UTC).
	TimeZone *time.Location
	// Workers is how many rounds (or backfill pages) run at once (default
	// 2), each in its own transaction over rows the others do not take.
	Workers int
	// ProgressEvery is how often a long sweep logs its progress (default 10 s).
	ProgressEvery time.Duration
	// Slot is the replication slot the stream reads. When set, each sweep
	// also rescues stranded pending rows (see rescueStranded); empty
	// disables that.
	Slot string
	// Hold, when set (STANDBY_HOLD), is waited on at the start of each
	// sweep and backfill for every commit so far (see holdForStandby).
	Hold Hold
}

// Hold waits until a standby has flushed the WAL past every commit so far
// when given zero (implemented by *standby.Hold).
type Hold interface {
	Wait(ctx context.Context, lsn uint64) error
}

// Result summarises a sweep.
type Result struct {
	Delivered      int64 // inserted into ClickHouse and marked processed
	AlreadyPresent int64 // found in ClickHouse (an earlier attempt got there) and marked processed
	Failed         int64 // still failed, to be retried later
	Dead           int64 // became dead letters in this sweep
	Rescued        int64 // pending rows the stream had passed, handed to this sweep
	// Backfilled are the rows of a new slot's snapshot a Backfill took:
	// Delivered + AlreadyPresent + Failed + Dead + HandedOver.
	Backfilled int64
	// HandedOver are backfill rows marked failed and due for the sweep
	// because ClickHouse failed the backfill.
	HandedOver int64
	Rounds     int
	Took       time.Duration
}

// Add returns the sum of two results.
func (r Result) Add(o Result) Result {
	return Result{Delivered: r.Delivered + o.Delivered, AlreadyPresent: r.AlreadyPresent + o.AlreadyPresent,
		Failed: r.Failed + o.Failed, Dead: r.Dead + o.Dead, Rescued: r.Rescued + o.Rescued,
		Backfilled: r.Backfilled + o.Backfilled, HandedOver: r.HandedOver + o.HandedOver,
		Rounds: r.Rounds + o.Rounds, Took: r.Took + o.Took}
}

// Sweeper delivers due failed rows, and a new slot's backlog (Backfill).
type Sweeper struct {
	cfg    Config
	pool   *pgxpool.Pool
	engine *delivery.Engine
	store  *outboxstore.Store
	log    *zap.Logger
	mark   *outboxstore.Mark // taken by the last sweep, for the next one's rescue
}

// New returns a sweeper.
func New(cfg Config, pool *pgxpool.Pool, s Sink, store *outboxstore.Store, log *zap.Logger) *Sweeper {
	if cfg.BatchSize <= 0 {
		cfg.BatchSize = 1000
	}
	if cfg.TimeZone == nil {
		cfg.TimeZone = time.UTC
	}
	if cfg.Workers <= 0 {
		cfg.Workers = 2
	}
	if cfg.ProgressEvery <= 0 {
		cfg.ProgressEvery = 10 * time.Second
	}
	log = log.Named("sweep")
	// No retries: the rows are failed already and wait for the next period
	// when ClickHouse is unavailable.
	engine := delivery.New(delivery.Config{OutageFailAfter: -1}, s, log)
	return &Sweeper{cfg: cfg, pool: pool, engine: engine, store: store, log: log}
}

// ErrUnavailable is returned when ClickHouse is unavailable: the sweep stops, the rows
// it held stay failed and untouched, and the next sweep tries again.
var ErrUnavailable = errors.New("clickhouse unavailable")

// Run sweeps until no due failed row is left (or ctx ends).
func (s *Sweeper) Run(ctx context.Context) (Result, error) {
	var res Result
	start := time.Now()
	if err := s.rescueStranded(ctx, &res); err != nil {
		// Only the safety net is late; due failed rows still go.
		s.log.Warn("rescue of stranded pending rows failed; next sweep tries again", zap.Error(err))
	}
	if err := s.engine.Sink().Ready(ctx); err != nil {
		res.Took = time.Since(start)
		return res, s.unavailable(err)
	}
	if err := s.holdForStandby(ctx); err != nil {
		res.Took = time.Since(start)
		return res, err
	}
	// Workers take disjoint rows (SKIP LOCKED), so one's ClickHouse insert
	// overlaps another's status commit: a sweep is paced by its rounds.
	more, err := s.workers(ctx, start, "sweep progress", s.round)
	res = res.Add(more)
	res.Took = time.Since(start)
	if err != nil {
		return res, err
	}
	if res.Rounds > 0 {
		s.log.Info("sweep finished", zap.Int64("delivered", res.Delivered), zap.Int64("already_present", res.AlreadyPresent),
			zap.Int64("failed", res.Failed), zap.Int64("dead", res.Dead), zap.Duration("took", res.Took))
	}
	return res, ctx.Err()
}

// holdForStandby waits, with STANDBY_HOLD, until the standby has every
// commit made so far. Once per sweep is enough: the rows a sweep claims
// were committed before it started — failed rows were tried by the stream
// after its own hold, or marked by a rescue or a backfill before this point,
// or requeued by hand long after their commit — and the backfill's rows
// committed before the slot was created.
func (s *Sweeper) holdForStandby(ctx context.Context) error {
	if s.cfg.Hold == nil {
		return nil
	}
	if err := s.cfg.Hold.Wait(ctx, 0); err != nil {
		return fmt.Errorf("sweep: wait for the standby (STANDBY_HOLD): %w", err)
	}
	return nil
}

// workers runs round on Config.Workers goroutines until a round finds no rows
// (returns 0), one fails, or ctx ends, and logs progress every ProgressEvery
// as msg. It returns the rounds' results added up and the first error.
func (s *Sweeper) workers(ctx context.Context, start time.Time, msg string, round func(context.Context, *Result) (int, error)) (Result, error) {
	var (
		mu       sync.Mutex
		res      Result
		firstErr error
		wg       sync.WaitGroup
	)
	lastLog := start
	for range s.cfg.Workers {
		wg.Go(func() {
			for ctx.Err() == nil {
				var r Result
				n, err := round(ctx, &r)
				mu.Lock()
				res = res.Add(r)
				if err != nil && firstErr == nil {
					firstErr = err
				}
				stop := err != nil || n == 0 || firstErr != nil
				if n > 0 {
					res.Rounds++
				}
				if !stop && time.Since(lastLog) >= s.cfg.ProgressEvery {
					done := res.Delivered + res.AlreadyPresent
					s.log.Info(msg, zap.Int64("delivered", done), zap.Int64("failed", res.Failed),
						zap.Int64("dead", res.Dead), zap.Float64("rows_per_second", float64(done)/time.Since(start).Seconds()))
					lastLog = time.Now()
				}
				mu.Unlock()
				if stop {
					return
				}
			}
		})
	}
	wg.Wait()
	return res, firstErr
}

// round locks one batch of due rows, delivers them and commits their new status. A
// crash after the ClickHouse insert but before the commit leaves the rows failed; the
// next round finds them in ClickHouse and only marks them processed.
func (s *Sweeper) round(ctx context.Context, res *Result) (int, error) {
	tx, err := s.store.Begin(ctx)
	if err != nil {
		return 0, fmt.Errorf("sweep: %w", err)
	}
	defer tx.Rollback(context.Background()) //nolint:errcheck // after Commit this is a no-op
	store := s.store.WithTx(tx)

	claimed, err := store.ClaimDue(ctx, s.cfg.BatchSize, s.cfg.TimeZone)
	if err != nil {
		return 0, fmt.Errorf("sweep: %w", err)
	}
	if len(claimed) == 0 {
		return 0, nil
	}
	events, attempts := eventsOf(claimed)
	// Every row may be in ClickHouse already: an earlier delivery may have
	// inserted it and failed before its status was committed.
	out, err := s.engine.Deliver(ctx, events, func(*record.Event) bool { return true })
	if err != nil {
		return 0, fmt.Errorf("sweep: %w", err)
	}
	// The rows are locked by this transaction: none can vanish. Deferred rows
	// stay as they are (failed, with their reason) for the next sweep.
	if _, err := store.MarkProcessed(ctx, out.Processed()); err != nil {
		return 0, err
	}
	if _, err := store.MarkFailed(ctx, out.Failed); err != nil {
		return 0, err
	}
	if err := tx.Commit(ctx); err != nil {
		return 0, fmt.Errorf("sweep: commit: %w", err)
	}
	s.count(res, out, attempts)
	if len(out.Deferred) > 0 {
		return 0, s.unavailable(out.OutageErr)
	}
	return len(claimed), nil
}

// eventsOf returns the claimed rows' events and their failed deliveries so far.
func eventsOf(claimed []outboxstore.Claimed) ([]record.Event, map[int64]int) {
	events := make([]record.Event, len(claimed))
	attempts := make(map[int64]int, len(claimed))
	for i, c := range claimed {
		events[i], attempts[c.Event.ID] = c.Event, c.Attempts
	}
	return events, attempts
}

// count adds a committed delivery's outcome to res; attempts are the rows'
// failed deliveries before this one.
func (s *Sweeper) count(res *Result, out *delivery.Outcome, attempts map[int64]int) {
	res.Delivered += int64(len(out.Inserted))
	res.AlreadyPresent += int64(len(out.Present))
	max := s.store.Retry().MaxAttempts
	for _, f := range out.Failed {
		if f.Final || attempts[f.ID]+1 >= max {
			res.Dead++
		} else {
			res.Failed++
		}
		s.log.Warn("event not delivered", zap.Int64("event_id", f.ID), zap.String("reason", f.Reason))
	}
}

func (s *Sweeper) unavailable(err error) error {
	if fault.Retryable(err) {
		return fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	return fmt.Errorf("sweep: %w", err)
}
