package outboxstore_test

import (
	"context"
	"testing"
	"time"

	"github.com/outbox-streamer/outbox-streamer/internal/e2e"
	"github.com/outbox-streamer/outbox-streamer/internal/testenv"
	"github.com/outbox-streamer/outbox-streamer/outboxstore"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// TestStatusUpdateWaitsForRowsToBecomeVisible: logical decoding can hand over a
// transaction a moment before its commit is visible to other sessions. A status
// update for such a row must wait for it, not silently update nothing and leave the
// row pending for ever.
func TestStatusUpdateWaitsForRowsToBecomeVisible(t *testing.T) {
	e := e2e.New(t, testenv.ModernClickHouse(t))
	ctx := context.Background()
	store := outboxstore.New(e.Pool, outboxstore.RetryConfig{})
	for _, c := range []struct {
		name   string
		update func(id int64) error
		want   string
	}{
		{"processed", func(id int64) error { return store.MarkProcessed(ctx, []int64{id}) }, "processed"},
		{"failed", func(id int64) error {
			return store.MarkFailed(ctx, []outboxstore.Failure{{ID: id, Reason: "bad"}})
		}, "failed"},
		{"deferred", func(id int64) error { return store.MarkDeferred(ctx, []int64{id}, "down") }, "failed"},
	} {
		t.Run(c.name, func(t *testing.T) {
			tx, err := e.Pool.Begin(ctx)
			if err != nil {
				t.Fatal(err)
			}
			defer tx.Rollback(ctx) //nolint:errcheck
			var id int64
			if err := tx.QueryRow(ctx, `INSERT INTO event_outbox (event_type, event_date_time) VALUES ('t', now()) RETURNING id`).Scan(&id); err != nil {
				t.Fatal(err)
			}
			done := make(chan error, 1)
			go func() { done <- c.update(id) }()
			select {
			case err := <-done:
				t.Fatalf("the update returned (%v) while the row's transaction is still open", err)
			case <-time.After(300 * time.Millisecond):
			}
			if err := tx.Commit(ctx); err != nil {
				t.Fatal(err)
			}
			if err := <-done; err != nil {
				t.Fatal(err)
			}
			var status string
			if err := e.Pool.QueryRow(ctx, "SELECT status FROM event_outbox WHERE id = $1", id).Scan(&status); err != nil {
				t.Fatal(err)
			}
			if status != c.want {
				t.Fatalf("status = %q, want %q", status, c.want)
			}
		})
	}
}

// TestStatusUpdateLeavesFinishedRowsAlone: rows already processed (a replay after a
// crash) are visible, so the update returns at once and does not touch them.
func TestStatusUpdateLeavesFinishedRowsAlone(t *testing.T) {
	e := e2e.New(t, testenv.ModernClickHouse(t))
	ctx := context.Background()
	e.Insert(t, 10, false)
	if _, err := e.Pool.Exec(ctx, "UPDATE event_outbox SET status = 'processed'"); err != nil {
		t.Fatal(err)
	}
	var ids []int64
	rows, _ := e.Pool.Query(ctx, "SELECT id FROM event_outbox")
	for rows.Next() {
		var id int64
		_ = rows.Scan(&id)
		ids = append(ids, id)
	}
	rows.Close()
	store := outboxstore.New(e.Pool, outboxstore.RetryConfig{})
	if err := store.MarkDeferred(ctx, ids, "down"); err != nil {
		t.Fatal(err)
	}
	if _, p := e.Committed(t); p != 10 {
		t.Fatalf("%d rows processed after deferring finished rows, want all 10 untouched", p)
	}
}
