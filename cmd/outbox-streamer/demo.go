package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/zap"

	"github.com/outbox-streamer/outbox-streamer/internal/fault"
	"github.com/outbox-streamer/outbox-streamer/outbox"
	"github.com/outbox-streamer/outbox-streamer/sink"
)

var demoTypes = []string{"user.signed_in", "order.created", "order.paid", "payment.failed", "audit.permission_changed"}

// cmdDemo writes demo events into the outbox, in transactions, and prints one progress
// line per second with how many of them ClickHouse holds.
func cmdDemo(args []string, stdout, stderr io.Writer) error {
	var rate, txSize, count int
	var duration time.Duration
	cfg, _, err := loadConfig("demo", args, stdout, func(fs *flag.FlagSet) {
		fs.IntVar(&rate, "rate", 200, "events per second")
		fs.IntVar(&txSize, "tx-size", 10, "events per transaction")
		fs.IntVar(&count, "count", 0, "stop after this many events (0: run until interrupted or --duration)")
		fs.DurationVar(&duration, "duration", 0, "stop after this long (0: no limit)")
	})
	if err != nil {
		return err
	}
	if rate < 1 || txSize < 1 {
		return fmt.Errorf("--rate and --tx-size must be at least 1")
	}
	log := newLogger(cfg, forPerson)
	ctx, _, stop := signalContext(log)
	defer stop()
	if duration > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, duration)
		defer cancel()
	}
	pool, err := pgxpool.New(ctx, cfg.PostgresDSN)
	if err != nil {
		return fmt.Errorf("connect to postgres: %w", err)
	}
	defer pool.Close()
	// The demo produces into the instance's own outbox (OUTBOX_TABLE).
	producer := outbox.New(outbox.Options{Table: cfg.Outbox.String()})
	ch, err := sink.OpenLazy(cfg.ClickHouse, zap.NewNop())
	if err != nil {
		return err
	}
	defer ch.Close()
	table := ch.Table()
	startCount, err := ch.Count(ctx)
	if err != nil {
		if fault.Retryable(err) {
			return fmt.Errorf("clickhouse at %s is unreachable (is it running? check CLICKHOUSE_HOST/CLICKHOUSE_PORT): %w", cfg.ClickHouse.Addr, err)
		}
		return fmt.Errorf("%w (has `outbox-streamer migrate up` run?)", err)
	}

	interval := time.Duration(float64(time.Second) * float64(txSize) / float64(rate))
	tick := time.NewTicker(interval)
	defer tick.Stop()
	report := time.NewTicker(time.Second)
	defer report.Stop()
	produced := 0
	started := time.Now()
	progress := func() {
		qctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		n, err := ch.Count(qctx)
		if err != nil {
			fmt.Fprintf(stdout, "produced %d events; ClickHouse count failed: %v\n", produced, err)
			return
		}
		arrived := int64(n - startCount)
		fmt.Fprintf(stdout, "[%5.1fs] produced %d events, %d in ClickHouse %s, %d on the way\n",
			time.Since(started).Seconds(), produced, arrived, table, int64(produced)-arrived)
	}
	// finish gives the streamer a moment to deliver the tail, then reports once more.
	finish := func() error {
		deadline := time.Now().Add(10 * time.Second)
		for time.Now().Before(deadline) {
			if n, err := ch.Count(context.Background()); err == nil && int64(n-startCount) >= int64(produced) {
				break
			}
			time.Sleep(200 * time.Millisecond)
		}
		progress()
		return nil
	}
	for {
		select {
		case <-ctx.Done():
			return finish()
		case <-report.C:
			progress()
		case <-tick.C:
			n := txSize
			if count > 0 && produced+n > count {
				n = count - produced
			}
			if err := insertDemo(ctx, pool, producer, n, cfg.Environment); err != nil {
				if ctx.Err() != nil {
					continue
				}
				return err
			}
			produced += n
			if count > 0 && produced >= count {
				return finish()
			}
		}
	}
}

// insertDemo writes n demo events in one transaction through package outbox, as a
// service would (one COPY for the lot), into the outbox table of w.
func insertDemo(ctx context.Context, pool *pgxpool.Pool, w *outbox.Writer, n int, env string) error {
	return pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		evs := make([]outbox.Event, n)
		for i := range evs {
			evs[i] = outbox.Event{
				Type:        demoTypes[time.Now().Nanosecond()%len(demoTypes)],
				Time:        time.Now(),
				Environment: env,
				Context:     map[string]any{"demo": true, "seq": i, "user_id": time.Now().UnixNano() % 100000},
			}
		}
		_, err := w.AppendBatch(ctx, tx, evs)
		return err
	})
}
