package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/zap"

	"github.com/outbox-streamer/outbox-streamer/checkpoint"
	"github.com/outbox-streamer/outbox-streamer/internal/config"
	"github.com/outbox-streamer/outbox-streamer/internal/metrics"
	"github.com/outbox-streamer/outbox-streamer/internal/service"
	"github.com/outbox-streamer/outbox-streamer/internal/telemetry"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

// state is what /readyz reports.
type state int32

const (
	stateStarting state = iota
	stateStandby
	stateStreaming
	stateRetrying
)

var stateText = map[state]string{
	stateStarting:  "starting",
	stateStandby:   "standby: waiting for the leader lock",
	stateStreaming: "leader: streaming",
	stateRetrying:  "retrying after an error",
}

// observability holds what run sets up for operators: Sentry, OpenTelemetry, the
// metrics endpoint and the slot poller.
type observability struct {
	metrics *metrics.Metrics
	state   atomic.Int32
	stop    []func()
	poller  *metrics.SlotPoller // nil until set up
}

func (o *observability) set(s state) { o.state.Store(int32(s)) }

// fromService is what /readyz reports for each state of the supervisor.
var fromService = map[service.State]state{
	service.Standby:   stateStandby,
	service.Streaming: stateStreaming,
	service.Retrying:  stateRetrying,
}

// setService is the supervisor's OnState hook.
// Streaming changes the slot's state (active, confirmed position): the
// gauges are read at once instead of at the next poll.
func (o *observability) setService(s service.State) {
	o.set(fromService[s])
	if s == service.Streaming && o.poller != nil {
		o.poller.PollNow()
	}
}

func (o *observability) health() (bool, string) {
	s := state(o.state.Load())
	return s == stateStandby || s == stateStreaming, stateText[s]
}

// close stops everything, last started first.
func (o *observability) close() {
	for i := len(o.stop) - 1; i >= 0; i-- {
		o.stop[i]()
	}
}

// setupObservability starts Sentry, OTLP export, the HTTP endpoint and the slot
// poller. It returns the logger with the Sentry hook. The endpoint outlives the
// signal context so /healthz answers during the drain.
func setupObservability(ctx context.Context, cfg *config.Config, log *zap.Logger) (*zap.Logger, *observability, error) {
	o := &observability{metrics: metrics.New()}
	o.metrics.SetBuildInfo(version)
	flush, err := telemetry.InitSentry(cfg.SentryDSN, cfg.SentryEnv, version)
	if err != nil {
		return log, o, fmt.Errorf("SENTRY_CONFIG_DSN: %w", err)
	}
	o.stop = append(o.stop, flush)
	log = telemetry.WithSentry(log).With(zap.String("slot", cfg.Slot))

	shutdownOTel, err := telemetry.InitOTel(ctx, telemetry.OTelConfig{
		Endpoint: cfg.OTLPEndpoint, ServiceName: "outbox-streamer", ServiceVersion: version,
		Environment: cfg.Environment, Slot: cfg.Slot, Gatherer: o.metrics.Registry(),
	}, log)
	if err != nil {
		return log, o, fmt.Errorf("OTEL_EXPORTER_OTLP_ENDPOINT: %w", err)
	}
	o.stop = append(o.stop, func() {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = shutdownOTel(sctx)
	})

	if cfg.MetricsAddr != "" {
		srv, err := metrics.Listen(cfg.MetricsAddr, o.metrics.Registry(), o.health, log)
		if err != nil {
			return log, o, fmt.Errorf("METRICS_ADDR %s: %w", cfg.MetricsAddr, err)
		}
		sctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { defer close(done); _ = srv.Serve(sctx) }()
		o.stop = append(o.stop, func() { cancel(); <-done })
	} else {
		log.Info("no /metrics, /healthz or /readyz: METRICS_ADDR is empty")
	}

	pcfg, err := pgxpool.ParseConfig(cfg.PostgresDSN)
	if err != nil {
		return log, o, fmt.Errorf("DATABASE_URL: %w", err)
	}
	pcfg.MaxConns = 2
	pool, err := pgxpool.NewWithConfig(ctx, pcfg)
	if err != nil {
		return log, o, fmt.Errorf("DATABASE_URL: %w", err)
	}
	poller, err := metrics.NewSlotPoller(metrics.PollerConfig{Slot: cfg.Slot, Schema: cfg.Outbox.Schema, Table: cfg.Outbox.Table, TimeZone: cfg.TimeZone}, pool, o.metrics, log)
	if err != nil {
		pool.Close()
		return log, o, err
	}
	o.poller = poller
	progress := metrics.NewProgress(metrics.ProgressConfig{Interval: cfg.ProgressInterval, BehindRows: float64(cfg.ClickHouseBatchSize),
		Publish: viewPublisher(checkpoint.NewStore(pool, cfg.Slot), log)},
		o.metrics, log, func() bool { return state(o.state.Load()) == stateStreaming }, poller.Poll)
	pctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{}, 2)
	go func() { defer func() { done <- struct{}{} }(); _ = poller.Run(pctx) }()
	go func() { defer func() { done <- struct{}{} }(); progress.Run(pctx) }()
	o.stop = append(o.stop, func() { cancel(); <-done; <-done; pool.Close() })
	return log, o, nil
}

// cmdHealthcheck probes the local /healthz, for container health checks (the image
// has no shell or curl).
func cmdHealthcheck(args []string, stdout, stderr io.Writer) error {
	cfg, _, err := loadConfig("healthcheck", args, stdout, nil)
	if err != nil {
		return err
	}
	if cfg.MetricsAddr == "" {
		return errors.New("METRICS_ADDR is empty, so run serves no /healthz to probe; set it (default 127.0.0.1:8187) or probe another way")
	}
	host, port, err := net.SplitHostPort(cfg.MetricsAddr)
	if err != nil {
		return fmt.Errorf("METRICS_ADDR %q: %w", cfg.MetricsAddr, err)
	}
	if host == "" || host == "0.0.0.0" || host == "::" {
		host = "127.0.0.1"
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if err := metrics.Probe(ctx, "http://"+net.JoinHostPort(host, port)+"/healthz"); err != nil {
		return fmt.Errorf("unhealthy: %w", err)
	}
	fmt.Fprintln(stdout, "ok")
	return nil
}

// viewPublisher writes each progress line's view where `status` reads it.
// Its first failure is a warning (most likely `migrate up` was not run after
// an upgrade); streaming goes on either way.
func viewPublisher(ck *checkpoint.Store, log *zap.Logger) func(context.Context, metrics.View) {
	warned := false
	return func(ctx context.Context, v metrics.View) {
		b, err := json.Marshal(v)
		if err == nil {
			err = ck.PublishView(ctx, b)
		}
		if err == nil || ctx.Err() != nil {
			return
		}
		if !warned {
			warned = true
			log.Warn("cannot publish the leader's view for `status` (run `outbox-streamer migrate up`); streaming goes on", zap.Error(err))
			return
		}
		log.Debug("cannot publish the leader's view", zap.Error(err))
	}
}
