package pipeline_test

import (
	"context"
	"testing"
	"time"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/fixture"
	"github.com/outbox-streamer/outbox-streamer/internal/harness/testenv"
	"github.com/outbox-streamer/outbox-streamer/sink"
)

// TestStagedStreamedTransactions (issue 17): with staging on, the rows of a
// transaction the server streams before its commit are written to the
// staging table while it runs — none reaches the event table before the
// commit — and copied into the event table at the commit; an aborted one is
// only dropped from staging; savepoints rolled back stay out. A crash while a
// transaction is staged loses nothing of it. A crash after
// the copy and before the rows' status is set replays the transaction and
// delivers nothing twice (the replay is checked against ClickHouse, not
// copied again).
func TestStagedStreamedTransactions(t *testing.T) {
	for _, srv := range testenv.ClickHouseServers(t) {
		t.Run(srv.Name, func(t *testing.T) { testStaged(t, fixture.New(t, srv)) })
	}
}

func testStaged(t *testing.T, e *fixture.Env) {
	ctx := context.Background()
	spillDir := t.TempDir()
	stop := startStreaming(t, e, spillDir, true)
	countType := func(typ string) uint64 {
		var n uint64
		if err := e.CHConn.QueryRow(ctx, "SELECT count() FROM "+e.Table+" WHERE event_type = '"+typ+"'").Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	stagedCount := func() uint64 { return stagedRows(t, e) }
	// Committed, with a savepoint rolled back.
	tx, err := e.Pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx) //nolint:errcheck
	for _, q := range []struct {
		sql  string
		args []any
	}{
		{bigRows, []any{"staged.keep", 2000}},
		{"SAVEPOINT s", nil},
		{bigRows, []any{"staged.rolled.back", 1000}},
		{"ROLLBACK TO SAVEPOINT s", nil},
		{bigRows, []any{"staged.keep", 1000}},
	} {
		if _, err := tx.Exec(ctx, q.sql, q.args...); err != nil {
			t.Fatal(err)
		}
	}
	fixture.WaitFor(t, 30*time.Second, "the open transaction's rows in the staging table", func() bool { return stagedCount() >= 3000 })
	if n := countType("staged.keep") + countType("staged.rolled.back"); n != 0 {
		t.Fatalf("%d rows of an open transaction in the event table", n)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	e.AssertExactlyDelivered(t, time.Minute, e.CurrentWAL(t))
	if n := countType("staged.keep"); n != 3000 {
		t.Errorf("%d committed rows in the event table, want 3000", n)
	}
	fixture.WaitFor(t, 30*time.Second, "the staging table empty after the copy", func() bool { return stagedCount() == 0 })

	// Aborted whole: dropped from staging, never in the event table.
	aborted, err := e.Pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := aborted.Exec(ctx, bigRows, "staged.aborted", 3000); err != nil {
		t.Fatal(err)
	}
	fixture.WaitFor(t, 30*time.Second, "the aborted transaction's rows in the staging table", func() bool { return stagedCount() > 0 })
	if err := aborted.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	fixture.WaitFor(t, 30*time.Second, "the staging table empty after the abort", func() bool { return stagedCount() == 0 })

	// A crash while a transaction is being staged: the next session clears
	// the staging table, and the server streams the transaction again.
	open, err := e.Pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer open.Rollback(ctx) //nolint:errcheck
	if _, err := open.Exec(ctx, bigRows, "staged.across.crash", 2000); err != nil {
		t.Fatal(err)
	}
	fixture.WaitFor(t, 30*time.Second, "the open transaction's rows in the staging table", func() bool { return stagedCount() > 0 })
	stop()
	stop = startStreaming(t, e, spillDir, true)
	if _, err := open.Exec(ctx, bigRows, "staged.across.crash", 2000); err != nil {
		t.Fatal(err)
	}
	if err := open.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	e.AssertExactlyDelivered(t, time.Minute, e.CurrentWAL(t))
	if n := countType("staged.across.crash"); n != 4000 {
		t.Errorf("%d rows of the transaction staged across a crash in the event table, want 4000", n)
	}

	// A crash after the copy, before the status update: the status UPDATE
	// of these rows hangs in a trigger until the pipeline is abandoned.
	for _, q := range []string{
		`CREATE FUNCTION hang_status() RETURNS trigger LANGUAGE plpgsql AS $$
		 BEGIN IF NEW.event_type = 'staged.crash' THEN PERFORM pg_sleep(600); END IF; RETURN NEW; END $$`,
		`CREATE TRIGGER hang_status BEFORE UPDATE ON ` + e.Outbox.Ident() + ` FOR EACH ROW EXECUTE FUNCTION hang_status()`,
	} {
		if _, err := e.Pool.Exec(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := e.Pool.Exec(ctx, bigRows, "staged.crash", 3000); err != nil {
		t.Fatal(err)
	}
	fixture.WaitFor(t, time.Minute, "the transaction copied into the event table", func() bool { return countType("staged.crash") == 3000 })
	stop()
	// The abandoned pipeline's UPDATEs may still sleep in the trigger: pgx
	// cancels a query with a request on a new connection, which a loaded
	// machine can give up on, and a crashed process sends none.
	if _, err := e.Pool.Exec(ctx, `SELECT pg_cancel_backend(pid) FROM pg_stat_activity
		WHERE datname = current_database() AND pid <> pg_backend_pid() AND wait_event = 'PgSleep'`); err != nil {
		t.Fatal(err)
	}
	if _, err := e.Pool.Exec(ctx, "DROP TRIGGER hang_status ON "+e.Outbox.Ident()); err != nil {
		t.Fatal(err)
	}
	startStreaming(t, e, spillDir, true)
	e.AssertExactlyDelivered(t, time.Minute, e.CurrentWAL(t))
	if n := countType("staged.crash"); n != 3000 {
		t.Errorf("%d rows of the replayed transaction in the event table, want 3000", n)
	}
}

// stagedRows counts what e's slot has in the staging table.
func stagedRows(t *testing.T, e *fixture.Env) uint64 {
	t.Helper()
	var n uint64
	if err := e.CHConn.QueryRow(context.Background(), "SELECT count() FROM "+sinkStaging(e)+" WHERE slot = '"+e.Slot+"'").Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// sinkStaging is e's staging table, quoted.
func sinkStaging(e *fixture.Env) string {
	return sink.QuoteIdent(e.Sink.Database) + "." + sink.QuoteIdent(sink.StagingTable(e.Sink.Table))
}

// TestStagingLeavesNothingBehind: what an earlier session staged for this
// slot is dropped when a session starts, before any streamed transaction
// (after a failover the new primary never sends the old one's unfinished
// transactions again), and a streamed transaction whose every row was
// rolled back with its savepoint leaves nothing staged at its commit.
func TestStagingLeavesNothingBehind(t *testing.T) {
	e := fixture.New(t, testenv.ModernClickHouse(t))
	ctx := context.Background()
	stagedCount := func() uint64 { return stagedRows(t, e) }
	// Rows of a transaction no server will send again.
	if err := e.CHConn.Exec(ctx, "INSERT INTO "+sinkStaging(e)+` (slot, xid, subxid, event_id, event_type, event_date_time,
		environment, event_context, metadata_version, created_at)
		SELECT '`+e.Slot+`', 4242, 4242, number + 1, 'orphan', now64(6), 'test', '{}', 1, now64(6) FROM numbers(500)`); err != nil {
		t.Fatal(err)
	}
	startStreaming(t, e, t.TempDir(), true)
	fixture.WaitFor(t, 30*time.Second, "the orphaned staging rows dropped at start", func() bool { return stagedCount() == 0 })

	tx, err := e.Pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx) //nolint:errcheck
	if _, err := tx.Exec(ctx, "SAVEPOINT s"); err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, bigRows, "staged.all.rolled.back", 3000); err != nil {
		t.Fatal(err)
	}
	fixture.WaitFor(t, 30*time.Second, "the open transaction's rows in the staging table", func() bool { return stagedCount() > 0 })
	for _, q := range []string{"ROLLBACK TO SAVEPOINT s", "CREATE TEMP TABLE keeps_xid (x int)"} {
		if _, err := tx.Exec(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	e.Insert(t, 10, false)
	e.AssertExactlyDelivered(t, time.Minute, e.CurrentWAL(t))
	fixture.WaitFor(t, 30*time.Second, "nothing staged after the commit of rolled-back rows", func() bool { return stagedCount() == 0 })
}

// TestStagingOfAnAbortedTransactionIsClearedAtSessionStart: a transaction
// staged by a session that crashed, then rolled back while no streamer ran,
// may never be sent again (PostgreSQL 18 does not decode a transaction it
// knows aborted; after a failover the new primary never had it). The next
// session clears its staged rows at its start, even one that does not stage.
func TestStagingOfAnAbortedTransactionIsClearedAtSessionStart(t *testing.T) {
	e := fixture.New(t, testenv.ModernClickHouse(t))
	ctx := context.Background()
	spillDir := t.TempDir()
	stop := startStreaming(t, e, spillDir, true)
	stagedCount := func() uint64 { return stagedRows(t, e) }
	tx, err := e.Pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx) //nolint:errcheck
	if _, err := tx.Exec(ctx, bigRows, "staged.orphan", 3000); err != nil {
		t.Fatal(err)
	}
	fixture.WaitFor(t, 30*time.Second, "the open transaction's rows in the staging table", func() bool { return stagedCount() > 0 })
	stop()
	if err := tx.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	startStreaming(t, e, spillDir, false)
	e.Insert(t, 10, false)
	e.AssertExactlyDelivered(t, time.Minute, e.CurrentWAL(t))
	fixture.WaitFor(t, 30*time.Second, "the orphaned staged rows cleared", func() bool { return stagedCount() == 0 })
}
