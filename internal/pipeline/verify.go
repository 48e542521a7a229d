package pipeline

import (
	"context"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/zap"

	"github.com/outbox-streamer/outbox-streamer/internal/duration"
	"github.com/outbox-streamer/outbox-streamer/internal/metrics"
	"github.com/outbox-streamer/outbox-streamer/internal/verify"
	"github.com/outbox-streamer/outbox-streamer/sink"
)

// runVerifies is VERIFY_INTERVAL: every interval, the leader compares the
// outbox's last window with ClickHouse (verify.Run, the `verify` command's
// comparison) and records the result in metrics, where an alert watches it.
// It never repairs: a difference is for an operator to look at
// (`outbox-streamer verify --repair`).
func runVerifies(ctx context.Context, cfg Config, pool *pgxpool.Pool, ch *sink.Client, log *zap.Logger) {
	cfg.Metrics.SetVerifyInterval(cfg.VerifyInterval)
	t := time.NewTicker(cfg.VerifyInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		vc := verify.Config{Table: cfg.Outbox(), From: time.Now().Add(-cfg.VerifyWindow), TimeZone: cfg.Replication.TimeZone, Retention: cfg.Retention}
		rep, err := verify.Run(ctx, vc, pool, ch)
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			cfg.Metrics.ObserveVerify(metrics.VerifyResult{}, err)
			log.Warn("periodic verification could not run; next attempt in one period", zap.Error(err), zap.Duration("period", cfg.VerifyInterval))
			continue
		}
		tot := rep.Totals
		cfg.Metrics.ObserveVerify(metrics.VerifyResult{Match: rep.Match, Missing: tot.Missing, Duplicates: tot.Duplicates,
			NotInOutbox: tot.NotInOutbox, Window: duration.Format(cfg.VerifyWindow)}, nil)
		fields := []zap.Field{zap.Duration("window", cfg.VerifyWindow), zap.Int("buckets", tot.Buckets), zap.Uint64("outbox_processed", tot.Outbox),
			zap.Uint64("clickhouse_rows", tot.ClickHouse), zap.Float64("took_s", rep.Cost.Seconds)}
		if rep.Match {
			log.Info("verified: ClickHouse holds every processed outbox row of the window once", fields...)
			continue
		}
		log.Warn("verification found differences; run `outbox-streamer verify` for the ids (--repair hands missing rows to the sweep)",
			append(fields, zap.Int("differing_buckets", tot.Differing), zap.Int64("missing", tot.Missing),
				zap.Int64("duplicated", tot.Duplicates), zap.Int64("not_in_outbox", tot.NotInOutbox))...)
	}
}
