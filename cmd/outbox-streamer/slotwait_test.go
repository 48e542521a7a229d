package main

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/fixture"
	"github.com/outbox-streamer/outbox-streamer/internal/harness/testenv"
)

// TestFirstStartNamesTheTransactionsTheSlotWaitsFor: a new slot's creation
// waits until every transaction open when it began has ended. The first start
// says which ones (by pid, not by statement), and goes on by itself once they
// end.
func TestFirstStartNamesTheTransactionsTheSlotWaitsFor(t *testing.T) {
	e := fixture.New(t, testenv.ModernClickHouse(t))
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	tx, err := e.Pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = tx.Rollback(context.Background()) })
	var pid int32
	var xid int64
	if err := tx.QueryRow(ctx, "SELECT pg_backend_pid(), txid_current()").Scan(&pid, &xid); err != nil {
		t.Fatal(err)
	}
	_, out := startStreamer(t, envFor(e))
	want := fmt.Sprintf("pid %d (xid ", pid)
	fixture.WaitFor(t, time.Minute, "the slot's wait reported", func() bool {
		return strings.Contains(out.String(), "creating the replication slot waits for transactions") && strings.Contains(out.String(), want)
	})
	if strings.Contains(out.String(), `"msg":"streaming"`) {
		t.Fatalf("streaming while a transaction older than the slot is open:\n%s", out)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	fixture.WaitFor(t, time.Minute, "streaming after the transaction ended", func() bool {
		return strings.Contains(out.String(), `"msg":"streaming"`)
	})
	e.Insert(t, 10, false)
	e.AssertExactlyDelivered(t, time.Minute, e.CurrentWAL(t))
}
