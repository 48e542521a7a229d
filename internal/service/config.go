package service

import (
	"github.com/outbox-streamer/outbox-streamer/internal/config"
	"github.com/outbox-streamer/outbox-streamer/internal/outboxstore"
	"github.com/outbox-streamer/outbox-streamer/internal/pipeline"
	"github.com/outbox-streamer/outbox-streamer/internal/retry"
	"github.com/outbox-streamer/outbox-streamer/replication"
)

// PipelineConfig maps the process's settings onto the streaming pipeline's. It is
// the one mapping: the binary and the benchmark both run what it returns, so a
// benchmark measures what production runs. Hooks (Metrics, WrapSink, OnStreaming)
// are left for the caller.
func PipelineConfig(cfg *config.Config) pipeline.Config {
	return pipeline.Config{
		Replication: replication.Config{
			DSN:         cfg.PostgresDSN,
			Slot:        cfg.Slot,
			Publication: cfg.Publication,
			// OUTBOX_TABLE: the decoder keeps the Relation of this schema and
			// table; the store, sweep and retention take the same name
			// (pipeline.Config.Outbox). An unqualified name is public's here.
			Schema:         cfg.Outbox.Schema,
			Table:          cfg.Outbox.Table,
			StatusInterval: cfg.StatusInterval,
			TimeZone:       cfg.TimeZone,
			Streaming:      cfg.Streaming,
			Binary:         cfg.Binary,
			SpillDir:       cfg.SpillDir,
			SpillMaxBytes:  cfg.SpillMaxBytes,
			SlotFailover:   cfg.SlotFailover,
		},
		Run: replication.RunConfig{
			BatchSize:       cfg.BatchSize,
			BatchTimeout:    cfg.BatchTimeout,
			BatchMaxBytes:   cfg.BatchMaxBytes,
			ShutdownTimeout: cfg.ShutdownTimeout,
			Stage:           cfg.StreamStaging,
		},
		Sink: cfg.ClickHouse,
		Writer: pipeline.WriterConfig{
			MaxInsertRows:   cfg.ClickHouseBatchSize,
			MaxInsertBytes:  cfg.ClickHouseBatchMaxBytes,
			Retry:           retry.Policy{Max: cfg.RetryMaxWait},
			OutageFailAfter: cfg.OutageFailAfter,
		},
		Retry:          RetryConfig(cfg),
		SweepInterval:  cfg.SweepInterval,
		Retention:      cfg.Retention,
		VerifyInterval: cfg.VerifyInterval,
		VerifyWindow:   cfg.VerifyWindow,
		StandbyHold:    cfg.StandbyHold,

		PartitionInterval: cfg.PartitionInterval,
	}
}

// RetryConfig maps the settings for failed rows (attempts, backoff between them)
// onto the outbox store's.
func RetryConfig(cfg *config.Config) outboxstore.RetryConfig {
	return outboxstore.RetryConfig{MaxAttempts: cfg.MaxAttempts, BaseDelay: cfg.RetryBaseDelay, MaxDelay: cfg.RetryMaxDelay}
}
