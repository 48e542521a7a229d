package main

import (
	"flag"
	"fmt"
	"io"

	"go.uber.org/zap"

	"github.com/outbox-streamer/outbox-streamer/config"
	"github.com/outbox-streamer/outbox-streamer/internal/retry"
	"github.com/outbox-streamer/outbox-streamer/outboxstore"
	"github.com/outbox-streamer/outbox-streamer/pipeline"
	"github.com/outbox-streamer/outbox-streamer/replication"
)

func cmdRun(args []string, stdout, stderr io.Writer) error {
	var sweep bool
	cfg, _, err := loadConfig("run", args, stderr, func(fs *flag.FlagSet) {
		fs.BoolVar(&sweep, "sweep", false, "run one fallback sweep over failed rows, print a summary and exit")
	})
	if err != nil {
		return err
	}
	log := newLogger(cfg)
	defer log.Sync() //nolint:errcheck // nothing useful to do on a failed flush of stderr
	if sweep {
		return fmt.Errorf("--sweep is not available in this build yet")
	}
	log.Info("starting outbox-streamer",
		zap.String("postgres", config.RedactDSN(cfg.PostgresDSN)),
		zap.String("clickhouse", cfg.ClickHouse.Addr), zap.String("clickhouse_database", cfg.ClickHouse.Database),
		zap.String("table", cfg.ClickHouse.Table), zap.String("slot", cfg.Slot),
		zap.Int("batch_size", cfg.BatchSize), zap.Duration("batch_timeout", cfg.BatchTimeout))

	ctx, hard, stop := signalContext(log)
	defer stop()
	return pipeline.Stream(ctx, pipelineConfig(cfg), log, hard)
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
			MaxInsertRows: cfg.ClickHouseBatchSize,
			Retry:         retry.Policy{Max: cfg.RetryMaxWait},
		},
		Retry: outboxstore.RetryConfig{
			MaxAttempts: cfg.MaxAttempts,
			BaseDelay:   cfg.RetryBaseDelay,
			MaxDelay:    cfg.RetryMaxDelay,
		},
	}
}
