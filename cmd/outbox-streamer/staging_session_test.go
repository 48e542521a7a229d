package main

import (
	"context"
	"strings"
	"testing"
	"time"

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
	sep := "?"
	if strings.Contains(e.DSN, "?") {
		sep = "&"
	}
	// The least logical_decoding_work_mem: the walsender streams the open
	// transaction before its end, and the streamer stages it.
	cmd, out := startStreamer(t, envFor(e, "DATABASE_URL="+e.DSN+sep+"options=-c%20logical_decoding_work_mem%3D64kB"))
	fixture.WaitFor(t, time.Minute, "streaming", func() bool { return slotPID(t, e) != 0 })

	tx, err := e.Pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(context.Background()) //nolint:errcheck
	if _, err := tx.Exec(ctx, `INSERT INTO event_outbox (event_type, event_date_time, environment, event_context, metadata_version)
		SELECT 'staged.then.rolled.back', now() AT TIME ZONE 'UTC', 'test', jsonb_build_object('pad', repeat('x', 200)), 1
		FROM generate_series(1, 3000)`); err != nil {
		t.Fatal(err)
	}
	staged := func() uint64 {
		var n uint64
		if err := e.CHConn.QueryRow(ctx, "SELECT count() FROM "+e.Sink.Database+".event_log_staging WHERE slot = ?", e.Slot).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
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
