package pipeline_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/fixture"
	"github.com/outbox-streamer/outbox-streamer/internal/harness/testenv"
	"github.com/outbox-streamer/outbox-streamer/internal/pipeline"
	"github.com/outbox-streamer/outbox-streamer/replication"
)

// smallWorkMem makes the walsender stream every transaction past 64kB (the
// least logical_decoding_work_mem allows) before its commit.
func smallWorkMem(dsn string) string {
	sep := "?"
	if strings.Contains(dsn, "?") {
		sep = "&"
	}
	return dsn + sep + "options=-c%20logical_decoding_work_mem%3D64kB"
}

// slotStats reads the slot's pg_stat_replication_slots counters.
func slotStats(t *testing.T, e *fixture.Env) (spillBytes, streamBytes, streamTxns int64) {
	t.Helper()
	err := e.Pool.QueryRow(context.Background(), `SELECT spill_bytes, stream_bytes, stream_txns
		FROM pg_stat_replication_slots WHERE slot_name = $1`, e.Slot).Scan(&spillBytes, &streamBytes, &streamTxns)
	if err != nil && !errors.Is(err, pgx.ErrNoRows) {
		t.Fatal(err)
	}
	return
}

const bigRows = `INSERT INTO event_outbox (event_type, event_date_time, environment, event_context, metadata_version)
	SELECT $1, (now() AT TIME ZONE 'UTC'), 'test', jsonb_build_object('n', g, 'pad', repeat('x', 200)), 1
	FROM generate_series(1, $2) g`

// startStreaming runs the pipeline on e with protocol 2, every transaction
// past 64kB streamed, staging on or off, until the returned stop abandons it
// (as a crash would; also at the test's end). It skips the test on a server
// that cannot stream, and fails with the pipeline's own error when it ends
// before streaming (a precondition it refused, say).
func startStreaming(t *testing.T, e *fixture.Env, spillDir string, stage bool) (stop func()) {
	t.Helper()
	testenv.RequireStreaming(t, e.DSN)
	cfg := pipeline.Config{
		Replication: replication.Config{DSN: smallWorkMem(e.DSN), Slot: e.Slot, Publication: e.Publication,
			StatusInterval: 100 * time.Millisecond, Streaming: replication.StreamingOn, SpillDir: spillDir},
		Run:           replication.RunConfig{BatchSize: 1000, BatchTimeout: 50 * time.Millisecond, Stage: stage},
		Sink:          e.Sink,
		SweepInterval: time.Second,
	}
	drain, stopDrain := context.WithCancel(context.Background())
	abandon, stopAll := context.WithCancel(context.Background())
	finished := make(chan struct{})
	var runErr error
	go func() {
		defer close(finished)
		runErr = pipeline.Stream(drain, abandon, cfg, zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel)))
	}()
	stopped := false
	stop = func() {
		if stopped {
			return
		}
		stopped = true
		stopAll()
		stopDrain()
		select {
		case <-finished:
		case <-time.After(time.Minute):
			t.Error("pipeline did not stop within a minute")
		}
	}
	t.Cleanup(stop)
	fixture.WaitFor(t, time.Minute, "slot streaming", func() bool {
		select {
		case <-finished:
			t.Fatalf("the pipeline ended before it streamed: %v", runErr)
		default:
		}
		return e.Streaming(t)
	})
	return stop
}

// TestStreamingInProgressTransactions (issue 17): with protocol 2 the server
// streams large transactions before they commit, and spills nothing to its
// own disk; the streamer keeps them in its spill, delivers them on commit and
// drops them on abort, savepoints rolled back included. A stop in the middle
// of a streamed transaction (abandoned, as a crash would) loses nothing and
// duplicates nothing: the server sends the transaction again.
func TestStreamingInProgressTransactions(t *testing.T) {
	e := fixture.New(t, testenv.ModernClickHouse(t))
	ctx := context.Background()
	spillDir := t.TempDir()
	run := func() (stopCrash func()) { return startStreaming(t, e, spillDir, false) }
	stop := run()

	// A transaction with a savepoint rolled back, and one aborted whole.
	tx, err := e.Pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, q := range []struct {
		sql  string
		args []any
	}{
		{bigRows, []any{"keep", 1500}},
		{"SAVEPOINT s", nil},
		{bigRows, []any{"rolled.back", 1500}},
		{"ROLLBACK TO SAVEPOINT s", nil},
		{bigRows, []any{"keep", 1500}},
	} {
		if _, err := tx.Exec(ctx, q.sql, q.args...); err != nil {
			t.Fatal(err)
		}
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	aborted, err := e.Pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := aborted.Exec(ctx, bigRows, "never.committed", 3000); err != nil {
		t.Fatal(err)
	}
	if err := aborted.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	e.AssertExactlyDelivered(t, time.Minute, e.CurrentWAL(t))
	fixture.WaitFor(t, 30*time.Second, "streamed transactions in pg_stat_replication_slots", func() bool {
		_, streamBytes, streamTxns := slotStats(t, e)
		return streamBytes > 0 && streamTxns >= 2
	})
	if spill, stream, txns := slotStats(t, e); spill != 0 {
		t.Errorf("PostgreSQL spilled %d bytes to its disk with streaming on (streamed %d bytes in %d transactions)", spill, stream, txns)
	}

	// A streamed transaction in progress when the streamer goes away.
	tx, err = e.Pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx) //nolint:errcheck
	_, _, before := slotStats(t, e)
	if _, err := tx.Exec(ctx, bigRows, "keep.across.crash", 2000); err != nil {
		t.Fatal(err)
	}
	fixture.WaitFor(t, 30*time.Second, "the open transaction streamed", func() bool {
		_, _, n := slotStats(t, e)
		return n > before
	})
	stop()
	run()
	if _, err := tx.Exec(ctx, bigRows, "keep.across.crash", 2000); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	e.AssertExactlyDelivered(t, time.Minute, e.CurrentWAL(t))
}
