package pipeline

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/zap"

	"github.com/outbox-streamer/outbox-streamer/checkpoint"
	"github.com/outbox-streamer/outbox-streamer/internal/batch"
	"github.com/outbox-streamer/outbox-streamer/internal/fault"
	"github.com/outbox-streamer/outbox-streamer/internal/metrics"
	"github.com/outbox-streamer/outbox-streamer/internal/outboxstore"
	"github.com/outbox-streamer/outbox-streamer/internal/standby"
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
	// StandbyHold is STANDBY_HOLD: the physical slot or application_name of
	// a standby that must have flushed a commit before its rows reach the
	// event table (empty: no hold; see internal/standby).
	StandbyHold string
}

// eventTableCheckWait bounds the start's look at the event table's columns.
const eventTableCheckWait = 3 * time.Second

// checkEventTable refuses, before a replication slot is created, an event
// table whose columns the streamer cannot write (an earlier service's
// event_log): nothing is inserted into it. It asks ClickHouse only once
// PostgreSQL answered, and an unreachable ClickHouse is no reason not to
// start (the outbox buffers until it is back): that is only logged.
func checkEventTable(ctx context.Context, cfg Config, ch *sink.Client, pool *pgxpool.Pool, log *zap.Logger) error {
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
	switch {
	case err == nil || ctx.Err() != nil:
	case fault.Retryable(err):
		log.Warn("clickhouse is unreachable at start; streaming goes on (the outbox buffers): "+outagePlan(cfg), zap.Error(err))
	default:
		log.Warn("could not check the event table's columns at start; going on", zap.Error(err))
	}
	return nil
}

// outagePlan says what happens to rows while ClickHouse is away.
func outagePlan(cfg Config) string {
	if cfg.Writer.OutageFailAfter <= 0 {
		return "each batch is retried until ClickHouse answers (CLICKHOUSE_OUTAGE_FAIL_AFTER=0), and the slot holds WAL meanwhile"
	}
	plan := fmt.Sprintf("each batch is retried for %s (CLICKHOUSE_OUTAGE_FAIL_AFTER), then its rows are marked failed and acknowledged", cfg.Writer.OutageFailAfter)
	if cfg.SweepInterval > 0 {
		return plan + fmt.Sprintf("; the sweep delivers them once ClickHouse is back (every %s, EVENT_PROCESSING_INTERVAL)", cfg.SweepInterval)
	}
	return plan + "; `outbox-streamer run --sweep` delivers them once ClickHouse is back (the periodic sweep is off)"
}

// Outbox is the outbox table the pipeline streams, as the store names it:
// Replication's Schema and Table, unqualified when no schema is given (found
// through the search_path, as always).
func (c Config) Outbox() outboxstore.Name {
	return outboxstore.Name{Schema: c.Replication.Schema, Table: c.Replication.Table}
}

// normalize settles the configuration once, before anything starts: the
// metrics reach every stage, a merged insert holds at least one batch, a
// periodic verification has a window, and a cluster stages nothing (the
// staging table serves one server only).
func (c Config) normalize() Config {
	c.Writer.Metrics = c.Metrics
	if c.Metrics != nil {
		c.Run.Observer = c.Metrics
	}
	c.Writer.MaxInsertRows = max(c.Writer.MaxInsertRows, c.Run.BatchSize)
	c.Writer.FullBatch, c.Writer.Linger = c.Run.BatchSize, c.Run.BatchTimeout
	if c.VerifyWindow <= 0 {
		c.VerifyWindow = 24 * time.Hour
	}
	c.Run.Stage = c.Run.Stage && c.Sink.Cluster == ""
	return c
}

// Stream runs the streaming pipeline until ctx, the drain context, ends (then it
// stops reading, flushes the open batch, lets the writer finish and returns nil) or
// an error stops it. When abandon ends it stops without draining: the writer gives
// up, and what it had not acknowledged is replayed on the next start.
func Stream(ctx, abandon context.Context, cfg Config, log *zap.Logger) error {
	r, err := open(ctx, cfg.normalize(), log)
	if err != nil {
		return err
	}
	defer r.close()
	return r.run(ctx, abandon)
}

// run is one session of the pipeline: the replication stream read on the
// caller's goroutine, and beside it the writer, the backfill of a new slot,
// the sweeps and the periodic verification, each started by its own method.
type run struct {
	cfg    Config
	log    *zap.Logger
	ch     *sink.Client
	pool   *pgxpool.Pool
	stream *replication.Stream
	store  *outboxstore.Store
	writer *Writer
	// hold is STANDBY_HOLD's, for the writer and the sweeps (nil: off).
	hold *standby.Hold
	// batches carries the stream's batches to the writer.
	batches chan *batch.Batch

	// tasks are the goroutines beside the stream. None returns an error to
	// the others: the backfill, sweeps and verification log theirs and are
	// retried by the next sweep; the writer's is read once it is done.
	tasks      sync.WaitGroup
	writerDone chan struct{}
	writerErr  error
}

// open connects to ClickHouse and PostgreSQL, opens the replication slot and
// sets up the writer.
func open(ctx context.Context, cfg Config, log *zap.Logger) (_ *run, err error) {
	r := &run{cfg: cfg, log: log, writerDone: make(chan struct{})}
	defer func() {
		if err != nil {
			r.close()
		}
	}()
	// Lazily: ClickHouse may be down at start; the writer's outage bound and
	// the sweep deal with that, while the slot is read (the outbox buffers).
	if r.ch, err = sink.OpenLazy(cfg.Sink, log); err != nil {
		return nil, err
	}
	if r.pool, err = pgxpool.New(ctx, cfg.Replication.DSN); err != nil {
		return nil, fmt.Errorf("DATABASE_URL: %w", err)
	}
	if err := checkEventTable(ctx, cfg, r.ch, r.pool, log); err != nil {
		return nil, err
	}
	// Before the slot exists: a start refused for a wrong STANDBY_HOLD must
	// not leave a new slot behind retaining WAL.
	if cfg.StandbyHold != "" {
		if r.hold, err = standby.Open(ctx, standby.Config{Name: cfg.StandbyHold}, r.pool, log, cfg.Metrics); err != nil {
			return nil, err
		}
	}
	if r.stream, err = replication.Open(ctx, cfg.Replication, log); err != nil {
		return nil, err
	}
	ck := checkpoint.NewStore(r.pool, cfg.Replication.Slot)
	inflight, err := ck.Inflight(ctx)
	if err != nil {
		return nil, err
	}
	wcfg := cfg.Writer
	if r.hold != nil {
		wcfg.Hold = r.hold
	}
	if recordCoversReplay(inflight, r.stream.StartLSN()) {
		wcfg.InDoubtUntil = inflight
		log.Info("rows up to the recorded in-flight LSN will be checked against ClickHouse before insert",
			zap.String("acknowledged_lsn", pglogrepl.LSN(r.stream.StartLSN()).String()),
			zap.String("inflight_lsn", pglogrepl.LSN(inflight).String()))
	}
	r.store = outboxstore.NewFor(r.pool, cfg.Retry, cfg.Outbox()).InZone(cfg.Replication.TimeZone)
	var target Sink = r.ch
	if cfg.WrapSink != nil {
		target = cfg.WrapSink(target)
	}
	r.writer = NewWriter(wcfg, target, r.store, ck, r.stream.Tracker(), log)
	r.writer.EnableCeiling(r.ch, inflight)
	// Streamed transactions are staged in ClickHouse while they run, when the
	// server streams them; the writer clears what earlier sessions staged
	// when it starts, staging or not.
	r.cfg.Run.Stage = cfg.Run.Stage && r.stream.Streaming()
	switch {
	case r.cfg.Run.Stage:
		r.writer.EnableStaging(r.ch, cfg.Replication.Slot)
	case cfg.Sink.Cluster == "":
		r.writer.ClearStagedAtStart(r.ch, cfg.Replication.Slot)
	}
	// Room for as many batches as one merged insert holds, so a writer that fell
	// behind finds them queued and merges them (CLICKHOUSE_BATCH_SIZE); memory stays
	// bounded by that many rows.
	r.batches = make(chan *batch.Batch, max(1, wcfg.MaxInsertRows/max(1, cfg.Run.BatchSize)))
	return r, nil
}

// close releases what open took, in reverse.
func (r *run) close() {
	if r.stream != nil {
		r.stream.Close()
	}
	if r.pool != nil {
		r.pool.Close()
	}
	if r.ch != nil {
		r.ch.Close()
	}
}

// run reads the stream until ctx ends or something fails, and returns once
// every goroutine it started is done.
func (r *run) run(ctx, abandon context.Context) error {
	defer r.tasks.Wait()
	if created, snapshot := r.stream.SlotCreated(); created {
		if err := r.startBackfill(ctx, snapshot); err != nil {
			return err
		}
	}
	// The writer drains past ctx's end; only abandon (or a failed stream) stops it.
	writerCtx, cancelWriter := context.WithCancel(abandon)
	defer cancelWriter()
	r.startWriter(writerCtx)
	sideCtx, cancelSide := context.WithCancel(ctx)
	defer cancelSide()
	r.startSweeps(sideCtx)
	r.startVerifies(sideCtx)
	r.tasks.Go(func() {
		standby.Watch(sideCtx, standby.WatchConfig{Slot: r.cfg.Replication.Slot, Failover: r.cfg.Replication.SlotFailover}, r.pool, r.log, r.cfg.Metrics)
	})

	streamErr := r.stream.Run(ctx, r.cfg.Run, r.batches, r.writerDone)
	if streamErr != nil {
		// The stream failed: the writer must not keep retrying a batch nobody will
		// acknowledge. Unacknowledged rows are replayed on the next start.
		cancelWriter()
	}
	<-r.writerDone
	if r.writerErr != nil && !errors.Is(r.writerErr, context.Canceled) {
		return fmt.Errorf("writer: %w", r.writerErr)
	}
	if streamErr != nil && !errors.Is(streamErr, replication.ErrWriterStopped) {
		return streamErr
	}
	return r.writerErr
}

// sweepConfig is the sweep's configuration for this session; slot set, it
// rescues stranded rows too.
func (r *run) sweepConfig(slot string) sweep.Config {
	c := sweep.Config{BatchSize: r.cfg.Writer.MaxInsertRows, TimeZone: r.cfg.Replication.TimeZone, Slot: slot}
	if r.hold != nil {
		c.Hold = r.hold
	}
	return c
}

// startBackfill delivers, beside the stream, the rows a new slot's snapshot
// holds. The snapshot is imported now, before the stream's first command ends
// its export; the stream's rows are all newer. What the backfill leaves
// undelivered (stopped, or failed) stays pending and the sweep's rescue of
// stranded rows takes it.
func (r *run) startBackfill(ctx context.Context, snapshot string) error {
	cfg := r.cfg
	backfill, err := sweep.New(r.sweepConfig(""), r.pool, r.ch, r.store, r.log).
		StartBackfill(ctx, snapshot)
	if err != nil {
		return err
	}
	r.tasks.Go(func() {
		res, err := backfill(ctx)
		ObserveSweep(cfg.Metrics, res, err)
		if err != nil && ctx.Err() == nil {
			r.log.Warn("backfill stopped; the rows it did not deliver stay pending and the sweep's rescue delivers them", zap.Error(err))
			return
		}
		cfg.Metrics.ObserveBackfill(res.Backfilled)
		r.log.Info("new replication slot: pending rows committed before it were backfilled", zap.Int64("backfilled_rows", res.Backfilled))
	})
	return nil
}

// startWriter runs the writer on the stream's batches until they end or ctx
// does; writerDone closes when it returns.
func (r *run) startWriter(ctx context.Context) {
	r.tasks.Go(func() {
		defer close(r.writerDone)
		r.writerErr = r.writer.Run(ctx, r.batches)
	})
}

// startSweeps runs the fallback sweep and the outbox's maintenance every
// SweepInterval until ctx ends (not at all when it is zero).
func (r *run) startSweeps(ctx context.Context) {
	cfg := r.cfg
	if cfg.SweepInterval <= 0 {
		return
	}
	sweeper := sweep.New(r.sweepConfig(cfg.Replication.Slot), r.pool, r.ch, r.store, r.log)
	pruner := outboxstore.NewPruner(outboxstore.PruneConfig{Table: cfg.Outbox(), Retention: cfg.Retention, TimeZone: cfg.Replication.TimeZone,
		PartitionInterval: cfg.PartitionInterval}, r.pool, r.log)
	r.tasks.Go(func() { runSweeps(ctx, sweeper, pruner, cfg.SweepInterval, cfg.Metrics, r.log) })
}

// startVerifies runs the periodic verification until ctx ends, when
// VerifyInterval asks for it.
func (r *run) startVerifies(ctx context.Context) {
	if r.cfg.VerifyInterval > 0 {
		r.tasks.Go(func() { runVerifies(ctx, r.cfg, r.pool, r.ch, r.log) })
	}
}

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
