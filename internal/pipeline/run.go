package pipeline

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/zap"

	"github.com/outbox-streamer/outbox-streamer/checkpoint"
	"github.com/outbox-streamer/outbox-streamer/internal/batch"
	"github.com/outbox-streamer/outbox-streamer/internal/metrics"
	"github.com/outbox-streamer/outbox-streamer/internal/outboxstore"
	"github.com/outbox-streamer/outbox-streamer/internal/sweep"
	"github.com/outbox-streamer/outbox-streamer/replication"
	"github.com/outbox-streamer/outbox-streamer/sink"
)

// Config is everything the streaming pipeline needs.
type Config struct {
	// Replication names the slot, the publication and the outbox table
	// (Schema, Table: OUTBOX_TABLE); the store, the sweep and retention work
	// on that same table (see Outbox).
	Replication replication.Config
	Run         replication.RunConfig
	Sink        sink.Config
	Writer      WriterConfig
	Retry       outboxstore.RetryConfig
	// WrapSink, when set, decorates the ClickHouse writer (instrumentation, tests).
	WrapSink func(Sink) Sink
	// Metrics receives counters, timings and the acknowledged LSN (nil: none).
	Metrics *metrics.Metrics
	// SweepInterval is the period of the fallback sweep run beside the stream
	// (EVENT_PROCESSING_INTERVAL); it also runs once at start. Zero disables it.
	SweepInterval time.Duration
	// Retention removes processed rows older than it after each sweep
	// (OUTBOX_RETENTION); zero keeps everything.
	Retention time.Duration
	// PartitionInterval is OUTBOX_PARTITION_INTERVAL: on a partitioned outbox
	// the leader creates partitions of this width ahead after each sweep.
	PartitionInterval time.Duration
	// VerifyInterval is VERIFY_INTERVAL: how often the leader compares the
	// last VerifyWindow of the outbox with ClickHouse (0: never).
	VerifyInterval, VerifyWindow time.Duration
}

// eventTableCheckWait bounds the start's look at the event table's columns.
const eventTableCheckWait = 3 * time.Second

// checkEventTable refuses, before a replication slot is created, an event
// table whose columns the streamer cannot write (an earlier service's
// event_log): nothing is inserted into it. It asks ClickHouse only once
// PostgreSQL answered, and an unreachable ClickHouse is no reason not to
// start (the outbox buffers until it is back): that is only logged.
func checkEventTable(ctx context.Context, ch *sink.Writer, pool *pgxpool.Pool, log *zap.Logger) error {
	if err := pool.Ping(ctx); err != nil {
		return fmt.Errorf("connect to postgres: %w", err)
	}
	cctx, cancel := context.WithTimeout(ctx, eventTableCheckWait)
	defer cancel()
	err := ch.CheckTable(cctx)
	var mismatch *sink.SchemaMismatch
	if errors.As(err, &mismatch) {
		return err
	}
	if err != nil && ctx.Err() == nil {
		log.Warn("could not check the event table's columns at start; going on", zap.Error(err))
	}
	return nil
}

// Outbox is the outbox table the pipeline streams, as the store names it:
// Replication's Schema and Table, unqualified when no schema is given (found
// through the search_path, as always).
func (c Config) Outbox() outboxstore.Name {
	return outboxstore.Name{Schema: c.Replication.Schema, Table: c.Replication.Table}
}

// Stream runs the streaming pipeline until ctx, the drain context, ends (then it
// stops reading, flushes the open batch, lets the writer finish and returns nil) or
// an error stops it. When abandon ends it stops without draining: the writer gives
// up, and what it had not acknowledged is replayed on the next start.
func Stream(ctx, abandon context.Context, cfg Config, log *zap.Logger) error {
	// Lazily: ClickHouse may be down at start; the writer's outage bound and
	// the sweep deal with that, while the slot is read (the outbox buffers).
	ch, err := sink.OpenLazy(cfg.Sink, log)
	if err != nil {
		return err
	}
	defer ch.Close()

	pool, err := pgxpool.New(ctx, cfg.Replication.DSN)
	if err != nil {
		return fmt.Errorf("DATABASE_URL: %w", err)
	}
	defer pool.Close()

	if err := checkEventTable(ctx, ch, pool, log); err != nil {
		return err
	}
	stream, err := replication.Open(ctx, cfg.Replication, log)
	if err != nil {
		return err
	}
	defer stream.Close()

	ck := checkpoint.NewStore(pool, cfg.Replication.Slot)
	inflight, err := ck.Inflight(ctx)
	if err != nil {
		return err
	}
	wcfg := cfg.Writer
	wcfg.Metrics = cfg.Metrics
	if cfg.Metrics != nil {
		cfg.Run.Observer = cfg.Metrics
	}
	if recordCoversReplay(inflight, stream.StartLSN()) {
		wcfg.InDoubtUntil = inflight
		log.Info("rows up to the recorded in-flight LSN will be checked against ClickHouse before insert",
			zap.String("acknowledged_lsn", pglogrepl.LSN(stream.StartLSN()).String()),
			zap.String("inflight_lsn", pglogrepl.LSN(inflight).String()))
	}
	if wcfg.MaxInsertRows < cfg.Run.BatchSize {
		wcfg.MaxInsertRows = cfg.Run.BatchSize
	}
	store := outboxstore.NewFor(pool, cfg.Retry, cfg.Outbox()).InZone(cfg.Replication.TimeZone)
	if created, snapshot := stream.SlotCreated(); created {
		// The snapshot is imported now, before the stream's first command ends
		// its export; the backlog is delivered beside the stream, whose rows
		// are all newer. What it leaves undelivered (stopped, or failed) stays
		// pending and the sweep's rescue of stranded rows takes it.
		backfill, err := sweep.New(sweep.Config{BatchSize: wcfg.MaxInsertRows, TimeZone: cfg.Replication.TimeZone}, pool, ch, store, log).
			StartBackfill(ctx, snapshot)
		if err != nil {
			return err
		}
		backfillDone := make(chan struct{})
		go func() {
			defer close(backfillDone)
			res, err := backfill(ctx)
			ObserveSweep(cfg.Metrics, res, err)
			if err != nil && ctx.Err() == nil {
				log.Warn("backfill stopped; the rows it did not deliver stay pending and the sweep's rescue delivers them", zap.Error(err))
				return
			}
			log.Info(BackfillLogMsg, zap.Int64("backfilled_rows", res.Backfilled))
		}()
		defer func() { <-backfillDone }()
	}
	var target Sink = ch
	if cfg.WrapSink != nil {
		target = cfg.WrapSink(target)
	}
	writer := NewWriter(wcfg, target, store, ck, stream.Tracker(), log)
	writer.EnableCeiling(ch)
	// Streamed transactions are staged in ClickHouse while they run (one
	// server only); the writer clears what earlier sessions staged when it
	// starts, staging or not.
	cfg.Run.Stage = cfg.Run.Stage && stream.Streaming() && cfg.Sink.Cluster == ""
	switch {
	case cfg.Run.Stage:
		writer.EnableStaging(ch, cfg.Replication.Slot)
	case cfg.Sink.Cluster == "":
		writer.ClearStagedAtStart(ch, cfg.Replication.Slot)
	}

	// Room for as many batches as one merged insert holds, so a writer that fell
	// behind finds them queued and merges them (CLICKHOUSE_BATCH_SIZE); memory stays
	// bounded by that many rows.
	batches := make(chan *batch.Batch, max(1, wcfg.MaxInsertRows/max(1, cfg.Run.BatchSize)))
	writerDone := make(chan struct{})
	// The writer drains past ctx's end; only abandon (or a failed stream) stops it.
	writerCtx, cancelWriter := context.WithCancel(abandon)
	defer cancelWriter()
	var writerErr error
	go func() {
		defer close(writerDone)
		writerErr = writer.Run(writerCtx, batches)
	}()

	sweepCtx, cancelSweep := context.WithCancel(ctx)
	sweepDone := make(chan struct{})
	go func() {
		defer close(sweepDone)
		if cfg.SweepInterval > 0 {
			sweeper := sweep.New(sweep.Config{BatchSize: wcfg.MaxInsertRows, TimeZone: cfg.Replication.TimeZone, Slot: cfg.Replication.Slot}, pool, ch, store, log)
			pruner := outboxstore.NewPruner(outboxstore.PruneConfig{Table: cfg.Outbox(), Retention: cfg.Retention, TimeZone: cfg.Replication.TimeZone,
				PartitionInterval: cfg.PartitionInterval}, pool, log)
			runSweeps(sweepCtx, sweeper, pruner, cfg.SweepInterval, cfg.Metrics, log)
		}
	}()
	defer func() { cancelSweep(); <-sweepDone }()
	if cfg.VerifyInterval > 0 {
		if cfg.VerifyWindow <= 0 {
			cfg.VerifyWindow = 24 * time.Hour
		}
		verifyDone := make(chan struct{})
		go func() { defer close(verifyDone); runVerifies(sweepCtx, cfg, pool, ch, log) }()
		defer func() { cancelSweep(); <-verifyDone }()
	}

	streamErr := stream.Run(ctx, cfg.Run, batches, writerDone)
	if streamErr != nil {
		// The stream failed: the writer must not keep retrying a batch nobody will
		// acknowledge. Unacknowledged rows are replayed on the next start.
		cancelWriter()
	}
	<-writerDone
	if writerErr != nil && !errors.Is(writerErr, context.Canceled) {
		return fmt.Errorf("writer: %w", writerErr)
	}
	if streamErr != nil && !errors.Is(streamErr, replication.ErrWriterStopped) {
		return streamErr
	}
	return writerErr
}

// BackfillLogMsg is what the pipeline logs when a new slot's backfill has
// taken every row of the slot's snapshot (with their count as
// backfilled_rows); the benchmark waits for it.
const BackfillLogMsg = "new replication slot: pending rows committed before it were backfilled"

// runSweeps sweeps at once and then every interval until ctx ends, and prunes
// after each sweep (so at least as often). A sweep that finds ClickHouse
// unavailable just waits for the next period; pruning does not need ClickHouse
// (it removes only rows already processed).
func runSweeps(ctx context.Context, s *sweep.Sweeper, p *outboxstore.Pruner, interval time.Duration, m *metrics.Metrics, log *zap.Logger) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		res, err := s.Run(ctx)
		ObserveSweep(m, res, err)
		if err != nil && ctx.Err() == nil {
			log.Warn("sweep stopped early; next attempt in one period", zap.Error(err), zap.Duration("period", interval))
		}
		if ctx.Err() == nil {
			pres, err := p.Maintain(ctx)
			if err != nil && ctx.Err() == nil {
				m.AddError(metrics.StageSweep)
				log.Warn("outbox maintenance (partitions, retention) stopped early; next attempt in one period", zap.Error(err))
			}
			if p.Enabled() {
				if ages, err := p.Ages(ctx); err == nil {
					m.ObservePrune(pres.Removed, pres.Took, ages.OldestRow)
				}
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// ObserveSweep records a sweep's result in m.
func ObserveSweep(m *metrics.Metrics, res sweep.Result, err error) {
	m.ObserveSweep(int(res.Delivered), int(res.Failed), int(res.Dead))
	m.AddAlreadyPresent(int(res.AlreadyPresent))
	if err != nil && !errors.Is(err, context.Canceled) {
		m.AddError(metrics.StageSweep)
	}
}
