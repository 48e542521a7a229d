package pipeline_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/fixture"
	"github.com/outbox-streamer/outbox-streamer/internal/harness/testenv"
	"github.com/outbox-streamer/outbox-streamer/internal/outboxstore"
	"github.com/outbox-streamer/outbox-streamer/internal/pipeline"
	"github.com/outbox-streamer/outbox-streamer/internal/sweep"
	"github.com/outbox-streamer/outbox-streamer/sink"
)

// TestManyOutboxesStreamAtOnce (issue 16, docs/many-outboxes.md): three
// outboxes in one database — event_outbox, billing.event_outbox (the same
// table name in another schema: the decoder must match the namespace) and
// orders_outbox (another table in the same schema: the migrations' derived
// names must not collide) — each with its own publication, slot and
// ClickHouse table, stream at once, as three instances would. Rows committed
// before the slots existed (backfill), while streaming, and in one
// transaction that writes into all three each reach their own event table
// exactly once and no other. The sweep and the retention of one outbox then
// touch none of the others' rows.
func TestManyOutboxesStreamAtOnce(t *testing.T) {
	for _, srv := range testenv.ClickHouseServers(t) {
		t.Run(srv.Name, func(t *testing.T) {
			ctx := context.Background()
			a := fixture.New(t, srv)
			b := fixture.NewOutbox(t, a, "billing.event_outbox", "billing_publication", "billing_log")
			c := fixture.NewOutbox(t, a, "orders_outbox", "orders_publication", "orders_log")
			all := []*fixture.Env{a, b, c}

			// Committed before the slots exist: backfilled, then swept.
			for i, e := range all {
				e.Insert(t, 10*(i+1), false)
			}
			stops := make([]func() error, len(all))
			for i, e := range all {
				stops[i] = startWith(t, e, func(cfg *pipeline.Config) {
					cfg.Replication.Schema, cfg.Replication.Table = e.Outbox.Schema, e.Outbox.Table
				})
			}
			for _, e := range all {
				e.WaitStreaming(t)
			}
			for i, e := range all {
				e.Insert(t, []int{1500, 700, 300}[i], false)
				e.Insert(t, 50, true) // rolled back: never delivered
			}
			// One transaction writing into every outbox: each slot carries only
			// its own table's rows.
			a.InsertTx(t, func(tx pgx.Tx) error {
				for _, e := range all {
					if _, err := tx.Exec(ctx, `INSERT INTO `+e.Outbox.Ident()+` (event_type, event_date_time, event_context)
						VALUES ($1, now() AT TIME ZONE 'UTC', '{}')`, "mark."+e.Outbox.String()); err != nil {
						return err
					}
				}
				return nil
			})
			for i, e := range all {
				e.Insert(t, []int{200, 400, 600}[i], false)
			}
			wal := a.CurrentWAL(t)
			for _, e := range all {
				e.AssertExactlyDelivered(t, 2*time.Minute, wal)
			}
			for _, e := range all {
				rows, err := e.CHConn.Query(ctx, "SELECT event_type, count() FROM "+e.Table+" WHERE event_type LIKE 'mark.%' GROUP BY event_type")
				if err != nil {
					t.Fatal(err)
				}
				marks := map[string]uint64{}
				for rows.Next() {
					var typ string
					var n uint64
					if err := rows.Scan(&typ, &n); err != nil {
						t.Fatal(err)
					}
					marks[typ] = n
				}
				rows.Close()
				if want := "mark." + e.Outbox.String(); len(marks) != 1 || marks[want] != 1 {
					t.Errorf("%s holds the marks %v, want only %s once", e.Table, marks, want)
				}
			}
			for i, stop := range stops {
				if err := stop(); err != nil {
					t.Fatalf("pipeline of %s: %v", all[i].Outbox, err)
				}
			}

			// The sweep of a claims a's rows only: b's and c's due failed rows
			// stay as they are until their own sweep.
			for _, e := range []*fixture.Env{b, c} {
				if _, err := e.Pool.Exec(ctx, `UPDATE `+e.Outbox.Ident()+` SET status = 'failed', next_attempt_at = now() WHERE id <= 10`); err != nil {
					t.Fatal(err)
				}
			}
			res := sweepOutbox(t, a)
			if res.Delivered+res.AlreadyPresent+res.Failed+res.Dead != 0 {
				t.Fatalf("the sweep of %s touched rows: %+v", a.Outbox, res)
			}
			for _, e := range []*fixture.Env{b, c} {
				if n := e.StatusCounts(t)["failed"]; n != 10 {
					t.Fatalf("%s has %d failed rows after another outbox's sweep, want 10", e.Outbox, n)
				}
			}
			res = sweepOutbox(t, b)
			if res.AlreadyPresent != 10 || res.Delivered != 0 {
				t.Fatalf("the sweep of %s: %+v, want 10 rows found in ClickHouse", b.Outbox, res)
			}
			if n := b.StatusCounts(t)["failed"]; n != 0 {
				t.Fatalf("%s has %d failed rows after its sweep", b.Outbox, n)
			}
			if n := c.StatusCounts(t)["failed"]; n != 10 {
				t.Fatalf("%s has %d failed rows after %s's sweep, want 10", c.Outbox, n, b.Outbox)
			}

			// Retention of c removes c's processed rows only.
			before := map[*fixture.Env]int64{}
			for _, e := range all {
				before[e], _ = e.Committed(t)
			}
			p := outboxstore.NewPruner(outboxstore.PruneConfig{Table: c.Outbox, Retention: time.Hour}, c.Pool, zap.NewNop())
			pres, err := p.Prune(ctx, time.Nanosecond, false)
			if err != nil {
				t.Fatal(err)
			}
			if want := before[c] - 10; pres.Removed != want {
				t.Fatalf("pruning %s removed %d rows, want its %d processed ones", c.Outbox, pres.Removed, want)
			}
			for _, e := range []*fixture.Env{a, b} {
				if n, _ := e.Committed(t); n != before[e] {
					t.Fatalf("%s holds %d rows after %s was pruned, want %d", e.Outbox, n, c.Outbox, before[e])
				}
			}
		})
	}
}

// sweepOutbox runs one sweep of e's outbox into e's event table.
func sweepOutbox(t *testing.T, e *fixture.Env) sweep.Result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	log := zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel))
	w, err := sink.Open(ctx, e.Sink, log)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	s := sweep.New(sweep.Config{BatchSize: 100}, e.Pool, w, outboxstore.NewFor(e.Pool, outboxstore.RetryConfig{}, e.Outbox), log)
	res, err := s.Run(ctx)
	if err != nil {
		t.Fatal(fmt.Errorf("sweep of %s: %w", e.Outbox, err))
	}
	return res
}
