package outboxstore_test

import (
	"context"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/fixture"
	"github.com/outbox-streamer/outbox-streamer/internal/harness/testenv"
	"github.com/outbox-streamer/outbox-streamer/internal/outboxstore"
)

// seed inserts n rows with status st, created age ago.
func seed(t *testing.T, e *fixture.Env, n int, st string, age time.Duration) {
	t.Helper()
	if _, err := e.Pool.Exec(context.Background(), `INSERT INTO event_outbox (event_type, event_date_time, status, created_at)
		SELECT 'seed', now() AT TIME ZONE 'UTC', $2, (now() AT TIME ZONE 'UTC') - $3 * interval '1 second'
		FROM generate_series(1, $1)`, n, st, age.Seconds()); err != nil {
		t.Fatal(err)
	}
}

// TestPruneRemovesOnlyOldProcessedRows: one pass removes exactly the processed
// rows older than the retention, in many small batches; pending, failed and
// dead rows stay however old, and so do recent processed rows. A dry run
// counts the same rows and removes none.
func TestPruneRemovesOnlyOldProcessedRows(t *testing.T) {
	e := fixture.New(t, testenv.ModernClickHouse(t))
	ctx := context.Background()
	seed(t, e, 20, "failed", 3*time.Hour)
	seed(t, e, 1200, "processed", 2*time.Hour)
	seed(t, e, 20, "pending", 2*time.Hour)
	seed(t, e, 20, "dead", 2*time.Hour)
	seed(t, e, 300, "processed", 2*time.Hour)
	seed(t, e, 100, "processed", time.Minute)

	p := outboxstore.NewPruner(outboxstore.PruneConfig{Retention: time.Hour, BatchRows: 100}, e.Pool, zap.NewNop())
	dry, err := p.Prune(ctx, 0, true)
	if err != nil {
		t.Fatal(err)
	}
	if dry.Removed != 1500 {
		t.Fatalf("dry run counts %d rows, want 1500", dry.Removed)
	}
	if c := e.StatusCounts(t); c["processed"] != 1600 {
		t.Fatalf("dry run changed the outbox: %v", c)
	}
	res, err := p.Prune(ctx, 0, false)
	if err != nil {
		t.Fatal(err)
	}
	if res.Removed != 1500 || res.Batches < 15 {
		t.Fatalf("pass removed %d rows in %d batches, want 1500 in at least 15", res.Removed, res.Batches)
	}
	c := e.StatusCounts(t)
	if c["processed"] != 100 || c["pending"] != 20 || c["failed"] != 20 || c["dead"] != 20 {
		t.Fatalf("after pruning: %v, want 100 recent processed and every pending, failed and dead row", c)
	}
	ages, err := p.Ages(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if ages.OldestRow == nil || *ages.OldestRow < 3*time.Hour-time.Minute || ages.OldestProcessed == nil || *ages.OldestProcessed > 2*time.Minute {
		t.Fatalf("ages after pruning: oldest row %v, oldest processed %v", ages.OldestRow, ages.OldestProcessed)
	}
	t.Logf("removed %d rows in %d batches in %v", res.Removed, res.Batches, res.Took)
}
