package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/outbox-streamer/outbox-streamer/internal/config"
	"github.com/outbox-streamer/outbox-streamer/internal/outboxstore"
	"github.com/outbox-streamer/outbox-streamer/internal/service"
	"github.com/outbox-streamer/outbox-streamer/internal/standby"
	"github.com/outbox-streamer/outbox-streamer/internal/sweep"
	"github.com/outbox-streamer/outbox-streamer/sink"
)

func cmdRun(args []string, stdout, stderr io.Writer) error {
	var once bool
	cfg, _, err := loadConfig("run", args, stdout, func(fs *flag.FlagSet) {
		fs.BoolVar(&once, "sweep", false, "run one fallback sweep over due failed rows, print a summary and exit")
	})
	if err != nil {
		return err
	}
	who := forService
	if once {
		who = forPerson
	}
	log := newLogger(cfg, who)
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
		zap.String("table", cfg.ClickHouse.Table), zap.Stringer("outbox_table", cfg.Outbox), zap.String("slot", cfg.Slot),
		zap.String("publication", cfg.Publication),
		zap.Int("batch_size", cfg.BatchSize), zap.Duration("batch_timeout", cfg.BatchTimeout))
	return service.Run(drain, abandon, cfg, log, service.Hooks{OnState: obs.setService, Metrics: obs.metrics})
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
	store := outboxstore.NewFor(pool, service.RetryConfig(cfg), cfg.Outbox).InZone(cfg.TimeZone)
	scfg := sweep.Config{BatchSize: cfg.ClickHouseBatchSize, TimeZone: cfg.TimeZone, Slot: cfg.Slot}
	if cfg.StandbyHold != "" {
		// A person running --sweep sees only errors by default; a wait for the
		// standby must not look like a hang, so the hold's warnings show.
		holdLog := log
		if !cfg.LogLevelExplicit {
			holdLog = newLogger(cfg, forService).WithOptions(zap.IncreaseLevel(zapcore.WarnLevel))
		}
		hold, err := standby.Open(ctx, standby.Config{Name: cfg.StandbyHold}, pool, holdLog, nil)
		if err != nil {
			return err
		}
		scfg.Hold = hold
	}
	s := sweep.New(scfg, pool, ch, store, log)
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
	var qerr error
	if left.failed, left.dead, qerr = outboxstore.Undelivered(context.Background(), pool, cfg.Outbox); qerr != nil && err == nil {
		err = qerr
	}
	fmt.Fprintf(stdout, "sweep: %d delivered, %d already in ClickHouse, %d failed again, %d became dead letters, %d stranded pending rows rescued in %s; now %d failed, %d dead\n",
		res.Delivered, res.AlreadyPresent, res.Failed, res.Dead, res.Rescued, res.Took.Round(time.Millisecond), left.failed, left.dead)
	if res.Failed+res.Dead > 0 {
		fmt.Fprintln(stdout, "why: outbox-streamer failures")
	}
	return err
}
