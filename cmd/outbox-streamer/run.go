package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"time"

	"github.com/jackc/pgerrcode"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/zap"

	"github.com/outbox-streamer/outbox-streamer/internal/config"
	"github.com/outbox-streamer/outbox-streamer/internal/fault"
	"github.com/outbox-streamer/outbox-streamer/internal/leader"
	"github.com/outbox-streamer/outbox-streamer/internal/metrics"
	"github.com/outbox-streamer/outbox-streamer/internal/outboxstore"
	"github.com/outbox-streamer/outbox-streamer/internal/pipeline"
	"github.com/outbox-streamer/outbox-streamer/internal/retry"
	"github.com/outbox-streamer/outbox-streamer/internal/sweep"
	"github.com/outbox-streamer/outbox-streamer/replication"
	"github.com/outbox-streamer/outbox-streamer/sink"
)

func cmdRun(args []string, stdout, stderr io.Writer) error {
	var once bool
	cfg, _, err := loadConfig("run", args, stderr, func(fs *flag.FlagSet) {
		fs.BoolVar(&once, "sweep", false, "run one fallback sweep over due failed rows, print a summary and exit")
	})
	if err != nil {
		return err
	}
	log := newLogger(cfg)
	defer log.Sync() //nolint:errcheck // nothing useful to do on a failed flush of stderr
	drain, abandon, stop := signalContext(log)
	defer stop()
	if once {
		return runSweepOnce(drain, cfg, log, stdout)
	}
	log, obs, err := setupObservability(drain, cfg, log)
	defer obs.close()
	if err != nil {
		return err
	}
	log.Info("starting outbox-streamer", zap.String("version", version),
		zap.String("postgres", config.RedactDSN(cfg.PostgresDSN)),
		zap.String("clickhouse", cfg.ClickHouse.Addr), zap.String("clickhouse_database", cfg.ClickHouse.Database),
		zap.String("table", cfg.ClickHouse.Table), zap.String("slot", cfg.Slot),
		zap.Int("batch_size", cfg.BatchSize), zap.Duration("batch_timeout", cfg.BatchTimeout))
	return supervise(drain, abandon, cfg, log, obs)
}

// supervise leads the slot (or waits as standby) and keeps the pipeline running:
// after a transient failure — PostgreSQL restarted, a connection dropped — it waits
// with capped backoff and resumes from the acknowledged position. Configuration
// problems end the process with one clear line. Before the first successful start any
// failure is final, so a wrong setting is reported instead of retried forever.
// drain ending stops it after the pipeline drained; abandon ending stops it at once.
func supervise(drain, abandon context.Context, cfg *config.Config, log *zap.Logger, obs *observability) error {
	// Abandoning implies stopping: with ctx ending whenever abandon does, the
	// loop below watches ctx alone.
	ctx, cancel := context.WithCancel(drain)
	defer cancel()
	defer context.AfterFunc(abandon, cancel)()
	m := obs.metrics
	policy := retry.Policy{Initial: 500 * time.Millisecond, Max: cfg.RetryMaxWait}
	streamed := false
	var busySince time.Time
	for attempt := 1; ; attempt++ {
		lock, err := leader.Acquire(ctx, leader.Config{DSN: cfg.PostgresDSN, Slot: cfg.Slot}, log, func() {
			m.SetLeader(false)
			obs.set(stateStandby)
		})
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			m.AddError(metrics.StageLeader)
			if !streamed {
				return err
			}
		} else {
			m.SetLeader(true)
			err = streamAsLeader(ctx, abandon, cfg, log, lock, m, func() {
				streamed, attempt = true, 0
				obs.set(stateStreaming)
				m.SetUp(true)
			})
			lock.Release()
			m.SetLeader(false)
			if err == nil {
				return nil
			}
			if ctx.Err() != nil {
				// Stopped by a signal. A failure that is only the cancellation (a
				// signal during start-up) is an orderly stop: exit 0.
				if errors.Is(err, context.Canceled) {
					return nil
				}
				return err
			}
		}
		obs.set(stateRetrying)
		m.SetUp(false)
		m.AddError(metrics.StageReplication)
		if !transient(err) || (!streamed && !slotBusy(err)) {
			return err
		}
		if slotBusy(err) && !streamed {
			// A new leader may find the old leader's walsender still holding the slot
			// for a moment; a slot held for long is someone else's: say so.
			if busySince.IsZero() {
				busySince = time.Now()
			} else if time.Since(busySince) > cfg.SlotBusyTimeout {
				return err
			}
		}
		wait := policy.Delay(attempt)
		log.Warn("streaming interrupted; resuming from the acknowledged position", zap.Error(err), zap.Duration("retry_in", wait))
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(wait):
		}
	}
}

// streamAsLeader runs the pipeline while the leader lock holds. Losing the lock's
// session abandons the stream at once, without draining: another instance may
// already lead, and a drain would race its writes.
func streamAsLeader(drain, abandon context.Context, cfg *config.Config, log *zap.Logger, lock *leader.Lock, m *metrics.Metrics, onStreaming func()) error {
	// The loss is recorded as the cause of runAbandon, read after Stream returns:
	// the context synchronises the watcher's write with that read (a plain bool
	// written by the watcher was a data race).
	runAbandon, cancelAbandon := context.WithCancelCause(abandon)
	defer cancelAbandon(nil)
	runDrain, cancelDrain := context.WithCancel(drain)
	defer cancelDrain()
	defer context.AfterFunc(runAbandon, cancelDrain)()
	go func() {
		select {
		case <-lock.Lost():
			cancelAbandon(errLeaderLost)
		case <-runAbandon.Done():
		}
	}()
	pcfg := pipelineConfig(cfg)
	pcfg.Run.OnStreaming = onStreaming
	pcfg.Metrics = m
	err := pipeline.Stream(runDrain, runAbandon, pcfg, log)
	if errors.Is(context.Cause(runAbandon), errLeaderLost) && drain.Err() == nil {
		return errLeaderLost
	}
	return err
}

var errLeaderLost = errors.New("lost the leader lock's session")

// transient reports whether err may pass by itself (a restart, a dropped
// connection, a busy slot), as opposed to a configuration or data problem.
func transient(err error) bool {
	if errors.Is(err, errLeaderLost) || errors.Is(err, replication.ErrWriterStopped) || slotBusy(err) {
		return true
	}
	if errors.Is(err, replication.ErrMalformed) {
		return false
	}
	var pre *replication.PreconditionError
	if errors.As(err, &pre) {
		return false
	}
	return fault.Retryable(err)
}

// slotBusy reports the slot being used by another connection: after a takeover the
// old leader's walsender may hold it for a moment longer.
func slotBusy(err error) bool {
	var pre *replication.PreconditionError
	if errors.As(err, &pre) && pre.SlotInUse {
		return true
	}
	return fault.IsPostgres(err, pgerrcode.ObjectInUse)
}

// runSweepOnce is `run --sweep`: one sweep over due failed rows, then a summary.
func runSweepOnce(ctx context.Context, cfg *config.Config, log *zap.Logger, stdout io.Writer) error {
	ch, err := sink.Open(ctx, cfg.ClickHouse, log)
	if err != nil {
		return err
	}
	defer ch.Close()
	pool, err := pgxpool.New(ctx, cfg.PostgresDSN)
	if err != nil {
		return fmt.Errorf("DATABASE_URL: %w", err)
	}
	defer pool.Close()
	store := outboxstore.New(pool, retryConfig(cfg))
	s := sweep.New(sweep.Config{BatchSize: cfg.BatchSize, TimeZone: cfg.TimeZone, Slot: cfg.Slot}, pool, ch, store, log)
	res, err := s.Run(ctx)
	// Stranded pending rows are rescued once the slot has passed the mark this
	// sweep took; a streaming instance confirms within a status interval or two.
	if err == nil {
		var passed bool
		if passed, err = s.AwaitStream(ctx, 2*cfg.StatusInterval+5*time.Second); passed && err == nil {
			var more sweep.Result
			more, err = s.Run(ctx)
			res = res.Add(more)
		} else if err == nil {
			log.Info("the slot did not confirm past this sweep's start in time: stranded pending rows (if any) wait for the streaming instance's sweep")
		}
	}
	var left struct{ failed, dead int64 }
	if qerr := pool.QueryRow(context.Background(), `SELECT count(*) FILTER (WHERE status = 'failed'), count(*) FILTER (WHERE status = 'dead')
		FROM event_outbox WHERE status <> 'processed'`).Scan(&left.failed, &left.dead); qerr != nil && err == nil {
		err = fmt.Errorf("count remaining rows: %w", qerr)
	}
	fmt.Fprintf(stdout, "sweep: %d delivered, %d already in ClickHouse, %d failed again, %d became dead letters, %d stranded pending rows rescued in %s; now %d failed, %d dead\n",
		res.Delivered, res.AlreadyPresent, res.Failed, res.Dead, res.Rescued, res.Took.Round(time.Millisecond), left.failed, left.dead)
	return err
}

func retryConfig(cfg *config.Config) outboxstore.RetryConfig {
	return outboxstore.RetryConfig{MaxAttempts: cfg.MaxAttempts, BaseDelay: cfg.RetryBaseDelay, MaxDelay: cfg.RetryMaxDelay}
}

func pipelineConfig(cfg *config.Config) pipeline.Config {
	return pipeline.Config{
		Replication: replication.Config{
			DSN:            cfg.PostgresDSN,
			Slot:           cfg.Slot,
			Publication:    cfg.Publication,
			StatusInterval: cfg.StatusInterval,
			TimeZone:       cfg.TimeZone,
		},
		Run: replication.RunConfig{
			BatchSize:       cfg.BatchSize,
			BatchTimeout:    cfg.BatchTimeout,
			ShutdownTimeout: cfg.ShutdownTimeout,
		},
		Sink: cfg.ClickHouse,
		Writer: pipeline.WriterConfig{
			MaxInsertRows:   cfg.ClickHouseBatchSize,
			Retry:           retry.Policy{Max: cfg.RetryMaxWait},
			OutageFailAfter: cfg.OutageFailAfter,
		},
		Retry:         retryConfig(cfg),
		SweepInterval: cfg.SweepInterval,
		Retention:     cfg.Retention,

		PartitionInterval: cfg.PartitionInterval,
	}
}
