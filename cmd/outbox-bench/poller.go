package main

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/zap"

	"github.com/outbox-streamer/outbox-streamer/internal/record"
	"github.com/outbox-streamer/outbox-streamer/sink"
)

// pollIndexSQL is the index a well-tuned poller has: exactly the rows it looks for,
// in the order it takes them, so each round reads the next LIMIT entries instead of
// filtering the table (the migration's event_outbox_undelivered_idx leads with
// status and next_attempt_at, which does not give id order).
const pollIndexSQL = `CREATE INDEX IF NOT EXISTS event_outbox_poll_idx ON event_outbox (id) WHERE status IN ('pending', 'failed')`

// pollSelectSQL is the earlier service's polling query.
const pollSelectSQL = `SELECT id, event_type, event_date_time, environment, event_context::text, metadata_version, created_at
	FROM event_outbox WHERE status IN ('pending', 'failed') ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED`

const pollUpdateSQL = `UPDATE event_outbox SET status = 'processed' WHERE id = ANY($1)`

// pollOnce is one round of the polling design: BEGIN; SELECT ... FOR UPDATE SKIP
// LOCKED; one ClickHouse insert (clickhouse-go PrepareBatch, through the same sink
// the streamer uses); UPDATE ... processed; COMMIT. It returns the rows delivered.
func pollOnce(ctx context.Context, conn *pgx.Conn, ch *sink.Client, limit int) (int, error) {
	tx, err := conn.Begin(ctx)
	if err != nil {
		return 0, err
	}
	defer tx.Rollback(context.Background()) //nolint:errcheck // after Commit it is a no-op
	rows, err := tx.Query(ctx, pollSelectSQL, limit)
	if err != nil {
		return 0, fmt.Errorf("select: %w", err)
	}
	events := make([]record.Event, 0, limit)
	ids := make([]int64, 0, limit)
	for rows.Next() {
		var ev record.Event
		if err := rows.Scan(&ev.ID, &ev.Type, &ev.Time, &ev.Environment, &ev.Context, &ev.MetadataVersion, &ev.CreatedAt); err != nil {
			rows.Close()
			return 0, fmt.Errorf("scan: %w", err)
		}
		events = append(events, ev)
		ids = append(ids, ev.ID)
	}
	if err := rows.Err(); err != nil {
		return 0, fmt.Errorf("select: %w", err)
	}
	if len(events) == 0 {
		return 0, tx.Commit(ctx)
	}
	if err := ch.Insert(ctx, events); err != nil {
		return 0, err
	}
	if _, err := tx.Exec(ctx, pollUpdateSQL, ids); err != nil {
		return 0, fmt.Errorf("update: %w", err)
	}
	return len(events), tx.Commit(ctx)
}

// runPoller is scenario b: the backlog delivered by the polling loop, one worker,
// rounds of PollBatch rows, until a round finds nothing.
func runPoller(ctx context.Context, b *bench) (map[string]float64, error) {
	e, err := newEnv(ctx, b.srv)
	if err != nil {
		return nil, err
	}
	defer e.close()
	if _, err := e.Pool.Exec(ctx, pollIndexSQL); err != nil {
		return nil, fmt.Errorf("create poll index: %w", err)
	}
	if _, err := e.insertBacklog(ctx, b.cfg.Rows, b.cfg.TxSize); err != nil {
		return nil, err
	}
	if err := e.settle(ctx); err != nil {
		return nil, err
	}
	ch, err := sink.Open(ctx, e.Sink, zap.NewNop())
	if err != nil {
		return nil, err
	}
	defer ch.Close()
	conn, err := pgx.Connect(ctx, e.DSN)
	if err != nil {
		return nil, err
	}
	defer conn.Close(context.Background())

	meter := &cpuMeter{}
	c0 := meter.sample()
	t0 := time.Now()
	rctx, cancel := context.WithTimeout(ctx, b.cfg.Timeout)
	defer cancel()
	total, rounds := 0, 0
	for {
		n, err := pollOnce(rctx, conn, ch, b.cfg.PollBatch)
		if err != nil {
			return nil, fmt.Errorf("poll round %d: %w", rounds+1, err)
		}
		if n == 0 {
			break
		}
		total += n
		rounds++
	}
	took := time.Since(t0)
	b.note("b", meter.sample().since(c0))
	if err := e.verifyDelivered(ctx, int64(b.cfg.Rows), nil); err != nil {
		return nil, err
	}
	return map[string]float64{
		"rows":       float64(total),
		"rounds":     float64(rounds),
		"seconds":    took.Seconds(),
		"rows_per_s": float64(total) / took.Seconds(),
	}, nil
}
