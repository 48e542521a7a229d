// Package sweep is the polling fallback: it delivers outbox rows the replication
// stream did not (rows marked failed, rows older than the slot that a backfill
// marked, stranded pending rows it rescues). Each round claims due rows in one
// transaction (SELECT ... FOR UPDATE SKIP LOCKED, so several sweepers never take
// the same row), delivers them through the delivery engine and commits their
// status in the same transaction.
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

// Sink is where the sweep delivers (implemented by *sink.Writer).
type Sink = delivery.Sink

// Config tunes a sweep.
type Config struct {
	// BatchSize is the rows locked and delivered per round: the most rows of
	// one ClickHouse insert (CLICKHOUSE_BATCH_SIZE). A round's cost is mostly
	// fixed (a lookup, an insert, a commit), so a backfill goes at the pace of
	// its rounds.
	BatchSize int
	// TimeZone is the zone of the outbox's TIMESTAMP values (default UTC).
	TimeZone *time.Location
	// Workers is how many rounds run at once (default 2), each in its own
	// transaction over rows the others skip.
	Workers int
	// ProgressEvery is how often a long sweep logs its progress (default 10 s).
	ProgressEvery time.Duration
	// Slot is the replication slot the stream reads. When set, each sweep
	// also rescues stranded pending rows (see rescueStranded); empty
	// disables that.
	Slot string
}

// Result summarises a sweep.
type Result struct {
	Delivered      int64 // inserted into ClickHouse and marked processed
	AlreadyPresent int64 // found in ClickHouse (an earlier attempt got there) and marked processed
	Failed         int64 // still failed, to be retried later
	Dead           int64 // became dead letters in this sweep
	Rescued        int64 // pending rows the stream had passed, handed to this sweep
	Rounds         int
	Took           time.Duration
}

// Add returns the sum of two results.
func (r Result) Add(o Result) Result {
	return Result{Delivered: r.Delivered + o.Delivered, AlreadyPresent: r.AlreadyPresent + o.AlreadyPresent,
		Failed: r.Failed + o.Failed, Dead: r.Dead + o.Dead, Rescued: r.Rescued + o.Rescued,
		Rounds: r.Rounds + o.Rounds, Took: r.Took + o.Took}
}

// Sweeper delivers due failed rows.
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
	// Workers take disjoint rows (SKIP LOCKED), so one's ClickHouse insert
	// overlaps another's status commit: a backfill is paced by its rounds.
	var mu sync.Mutex
	var firstErr error
	lastLog := start
	var wg sync.WaitGroup
	for range s.cfg.Workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				var r Result
				n, err := s.round(ctx, &r)
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
					s.log.Info("sweep progress", zap.Int64("delivered", done), zap.Int64("failed", res.Failed),
						zap.Int64("dead", res.Dead), zap.Float64("rows_per_second", float64(done)/time.Since(start).Seconds()))
					lastLog = time.Now()
				}
				mu.Unlock()
				if stop {
					return
				}
			}
		}()
	}
	wg.Wait()
	if firstErr != nil {
		res.Took = time.Since(start)
		return res, firstErr
	}
	res.Took = time.Since(start)
	if res.Rounds > 0 {
		s.log.Info("sweep finished", zap.Int64("delivered", res.Delivered), zap.Int64("already_present", res.AlreadyPresent),
			zap.Int64("failed", res.Failed), zap.Int64("dead", res.Dead), zap.Duration("took", res.Took))
	}
	return res, ctx.Err()
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
	events := make([]record.Event, len(claimed))
	attempts := make(map[int64]int, len(claimed))
	for i, c := range claimed {
		events[i], attempts[c.Event.ID] = c.Event, c.Attempts
	}
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
	res.Delivered += int64(len(out.Inserted))
	res.AlreadyPresent += int64(len(out.Present))
	max := s.store.Retry().MaxAttempts
	for _, f := range out.Failed {
		if attempts[f.ID]+1 >= max {
			res.Dead++
		} else {
			res.Failed++
		}
		s.log.Warn("event not delivered", zap.Int64("event_id", f.ID), zap.String("reason", f.Reason))
	}
	if len(out.Deferred) > 0 {
		return 0, s.unavailable(out.OutageErr)
	}
	return len(claimed), nil
}

func (s *Sweeper) unavailable(err error) error {
	if fault.Retryable(err) {
		return fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	return fmt.Errorf("sweep: %w", err)
}

// Backfill marks the pending rows committed before the replication slot was
// created (visible in its exported snapshot) failed and due now, so the
// sweep delivers them: the slot will never carry them.
func Backfill(ctx context.Context, snapshot string, store *outboxstore.Store, log *zap.Logger) (int64, error) {
	return store.Backfill(ctx, snapshot, func(rows int64) {
		log.Info("backfill progress", zap.Int64("rows", rows))
	})
}
