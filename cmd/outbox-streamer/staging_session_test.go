package main

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/fixture"
	"github.com/outbox-streamer/outbox-streamer/internal/harness/testenv"
)

// TestStagingClearedWhenTheSameProcessReconnects: a transaction staged in one
// replication session and rolled back while the process, having lost its
// replication connection, opens the next one. The server never sends that
// transaction again: it lies below the slot's confirmed position, where the
// walsender streams nothing, so it is dropped at its abort without a Stream
// Abort. The same process's new session must drop its staged rows when it
// starts, as a new process does.
func TestStagingClearedWhenTheSameProcessReconnects(t *testing.T) {
	e := fixture.New(t, testenv.ModernClickHouse(t))
	testenv.RequireStreaming(t, e.DSN)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd, out := startStreamer(t, envFor(e, "DATABASE_URL="+smallWorkMem(e.DSN)))
	// The slot is active while it is being created; a transaction opened then can
	// hold its creation back (a consistent point waits for it), so wait for the
	// session to stream.
	fixture.WaitFor(t, time.Minute, "streaming", func() bool {
		return strings.Contains(out.String(), `"msg":"streaming"`) && slotPID(t, e) != 0
	})
	tx := beginLargeTransaction(ctx, t, e.Pool, "staged.then.rolled.back")
	staged := func() uint64 { return stagedRows(ctx, t, e) }
	fixture.WaitFor(t, time.Minute, "the open transaction staged", func() bool { return staged() > 0 })
	// A later commit, acknowledged: the slot's confirmed position passes the
	// open transaction's rows.
	e.Insert(t, 10, false)
	wal := e.CurrentWAL(t)
	fixture.WaitFor(t, time.Minute, "the later commit acknowledged", func() bool { return e.ConfirmedFlush(t) >= wal })

	pid := slotPID(t, e)
	if _, err := e.Pool.Exec(ctx, "SELECT pg_terminate_backend($1)", pid); err != nil {
		t.Fatal(err)
	}
	if err := tx.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	fixture.WaitFor(t, time.Minute, "a second replication session", func() bool {
		return strings.Count(out.String(), `"msg":"streaming"`) >= 2 && slotPID(t, e) != 0 && slotPID(t, e) != pid
	})
	e.Insert(t, 10, false)
	e.AssertExactlyDelivered(t, time.Minute, e.CurrentWAL(t))
	fixture.WaitFor(t, time.Minute, "the rolled-back transaction's staged rows dropped", func() bool { return staged() == 0 })
	if cmd.ProcessState != nil {
		t.Fatalf("the streamer exited:\n%s", out)
	}
}

// smallWorkMem is dsn with the least logical_decoding_work_mem (64kB) for the
// walsender: it streams a large transaction before its end, and the streamer
// stages it.
func smallWorkMem(dsn string) string {
	sep := "?"
	if strings.Contains(dsn, "?") {
		sep = "&"
	}
	return dsn + sep + "options=-c%20logical_decoding_work_mem%3D64kB"
}

// beginLargeTransaction inserts 3000 outbox rows of eventType (past 64kB of
// changes) in a transaction on pool that it leaves open; the test's end
// rolls it back.
func beginLargeTransaction(ctx context.Context, t *testing.T, pool *pgxpool.Pool, eventType string) pgx.Tx {
	t.Helper()
	tx, err := pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = tx.Rollback(context.Background()) })
	if _, err := tx.Exec(ctx, `INSERT INTO event_outbox (event_type, event_date_time, environment, event_context, metadata_version)
		SELECT $1, now() AT TIME ZONE 'UTC', 'test', jsonb_build_object('pad', repeat('x', 200)), 1
		FROM generate_series(1, 3000)`, eventType); err != nil {
		t.Fatal(err)
	}
	return tx
}

// stagedRows counts what e's slot has in the staging table.
func stagedRows(ctx context.Context, t *testing.T, e *fixture.Env) uint64 {
	t.Helper()
	var n uint64
	if err := e.CHConn.QueryRow(ctx, "SELECT count() FROM "+e.Sink.Database+".event_log_staging WHERE slot = ?", e.Slot).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}
