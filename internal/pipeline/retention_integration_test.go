package pipeline_test

import (
	"context"
	"testing"
	"time"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/fixture"
	"github.com/outbox-streamer/outbox-streamer/internal/harness/testenv"
	"github.com/outbox-streamer/outbox-streamer/internal/pipeline"
)

// TestRetentionWhileStreaming (issue 12): with a short retention the leader
// prunes processed rows after each sweep while events keep streaming. Every
// event reaches ClickHouse exactly once, and since deletes are not published,
// ClickHouse keeps every event after the outbox let them go.
func TestRetentionWhileStreaming(t *testing.T) {
	e := fixture.New(t, testenv.ModernClickHouse(t))
	startWith(t, e, func(c *pipeline.Config) {
		c.Retention = time.Second
		c.SweepInterval = 300 * time.Millisecond
	})
	e.WaitStreaming(t)
	var sumIDs int64
	for i := 0; i < 20; i++ {
		e.Insert(t, 500, false)
		time.Sleep(100 * time.Millisecond)
	}
	if err := e.Pool.QueryRow(context.Background(), "SELECT max(id) FROM event_outbox").Scan(&sumIDs); err != nil {
		t.Fatal(err)
	}
	waitCaughtUp(t, e, time.Minute)
	fixture.WaitFor(t, time.Minute, "processed rows pruned", func() bool {
		var n int
		_ = e.Pool.QueryRow(context.Background(), "SELECT count(*) FROM event_outbox").Scan(&n)
		return n == 0
	})
	// ids are 1..10000 (a fresh table): each exactly once in ClickHouse.
	var c, u, lo, hi uint64
	if err := e.CHConn.QueryRow(context.Background(), "SELECT count(), uniqExact(event_id), min(event_id), max(event_id) FROM "+e.Table).Scan(&c, &u, &lo, &hi); err != nil {
		t.Fatal(err)
	}
	if c != 10000 || u != 10000 || lo != 1 || hi != 10000 || sumIDs != 10000 {
		t.Fatalf("ClickHouse holds count=%d uniq=%d ids %d..%d after pruning (outbox max id %d), want the 10000 events once", c, u, lo, hi, sumIDs)
	}
}
