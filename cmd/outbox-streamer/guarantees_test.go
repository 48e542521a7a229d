package main

import (
	"context"
	"fmt"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/fixture"
	"github.com/outbox-streamer/outbox-streamer/internal/harness/testenv"
)

// TestDeadLetterAndRequeue: a row ClickHouse cannot hold fails, is retried by the
// sweep until it becomes a dead letter, is listed with its reason, and after the
// operator fixes and requeues it, the next sweep delivers it — on an
// unpartitioned and on a partitioned outbox.
func TestDeadLetterAndRequeue(t *testing.T) {
	t.Run("unpartitioned", func(t *testing.T) { testDeadLetterAndRequeue(t, fixture.New(t, testenv.ModernClickHouse(t))) })
	t.Run("partitioned", func(t *testing.T) {
		testDeadLetterAndRequeue(t, fixture.NewPartitioned(t, testenv.ModernClickHouse(t), 24*time.Hour))
	})
}

func testDeadLetterAndRequeue(t *testing.T, e *fixture.Env) {
	env := envFor(e, "EVENT_MAX_ATTEMPTS=2", "EVENT_RETRY_BASE_DELAY=0.05", "EVENT_RETRY_MAX_DELAY=0.1")
	ctx := context.Background()
	var id int64
	if err := e.Pool.QueryRow(ctx, `INSERT INTO event_outbox (event_type, event_date_time, status, next_attempt_at)
		VALUES ('poison', '2300-01-01', 'failed', now()) RETURNING id`).Scan(&id); err != nil {
		t.Fatal(err)
	}
	sweepUntil := func(want string) {
		t.Helper()
		fixture.WaitFor(t, 30*time.Second, "row status "+want, func() bool {
			code, out := runCmd(t, env, "run", "--sweep")
			if code != 0 {
				t.Fatalf("run --sweep exited %d:\n%s", code, out)
			}
			var status string
			_ = e.Pool.QueryRow(ctx, "SELECT status FROM event_outbox WHERE id = $1", id).Scan(&status)
			return status == want
		})
	}
	sweepUntil("dead")

	code, out := runCmd(t, env, "dead-letters", "list")
	if code != 0 || !strings.Contains(out, fmt.Sprint(id)) || !strings.Contains(out, "outside what ClickHouse stores") {
		t.Fatalf("dead-letters list (exit %d) does not show the row and its reason:\n%s", code, out)
	}
	if _, err := e.Pool.Exec(ctx, "UPDATE event_outbox SET event_date_time = '2026-01-01' WHERE id = $1", id); err != nil {
		t.Fatal(err)
	}
	code, out = runCmd(t, env, "dead-letters", "requeue", "--id", fmt.Sprint(id))
	if code != 0 || !strings.Contains(out, "requeued 1 dead letter") {
		t.Fatalf("requeue (exit %d):\n%s", code, out)
	}
	sweepUntil("processed")
	if c, u := e.CHCounts(t); c != 1 || u != 1 {
		t.Fatalf("ClickHouse holds count=%d uniq=%d, want the one requeued event", c, u)
	}
}

// TestStandbyTakesOverWhenTheLeaderDies runs two instances on one slot: the second
// waits; after SIGKILL of the first it takes over and every event is delivered once.
func TestStandbyTakesOverWhenTheLeaderDies(t *testing.T) {
	e := fixture.New(t, testenv.ModernClickHouse(t))
	env := envFor(e)
	leaderCmd, _ := startStreamer(t, env)
	fixture.WaitFor(t, time.Minute, "leader streaming", func() bool { return e.ConfirmedFlush(t) > 0 && slotPID(t, e) != 0 })
	standby, standbyOut := startStreamer(t, env)
	fixture.WaitFor(t, time.Minute, "standby waiting", func() bool {
		return strings.Contains(standbyOut.String(), "waiting as hot standby")
	})
	e.Insert(t, 1000, false)
	fixture.WaitFor(t, time.Minute, "first events delivered", func() bool { _, p := e.Committed(t); return p == 1000 })

	if err := leaderCmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	_ = leaderCmd.Wait()
	e.Insert(t, 1000, false)
	fixture.WaitFor(t, time.Minute, "standby streaming", func() bool {
		return strings.Contains(standbyOut.String(), "took over as leader") && slotPID(t, e) != 0
	})
	t.Logf("standby took over %s after the leader's SIGKILL", time.Since(killed).Round(time.Millisecond))
	e.AssertExactlyDelivered(t, time.Minute, e.CurrentWAL(t))
	_ = standby
}

// TestLeaderStopsWhenItsLockSessionDies terminates the leader's lock session: it must
// stop streaming at once (and then compete for the lock again).
func TestLeaderStopsWhenItsLockSessionDies(t *testing.T) {
	e := fixture.New(t, testenv.ModernClickHouse(t))
	_, out := startStreamer(t, envFor(e))
	fixture.WaitFor(t, time.Minute, "streaming", func() bool { return slotPID(t, e) != 0 })
	if _, err := e.Pool.Exec(context.Background(), `SELECT pg_terminate_backend(pid) FROM pg_stat_activity
		WHERE datname = current_database() AND query LIKE '%pg_try_advisory_lock%' AND pid <> pg_backend_pid()`); err != nil {
		t.Fatal(err)
	}
	fixture.WaitFor(t, time.Minute, "the leader noticing the lost lock", func() bool {
		return strings.Contains(out.String(), "lost the leader lock")
	})
	fixture.WaitFor(t, time.Minute, "streaming again after re-acquiring the lock", func() bool {
		return strings.Count(out.String(), `"streaming"`) >= 2
	})
	e.Insert(t, 100, false)
	e.AssertExactlyDelivered(t, time.Minute, e.CurrentWAL(t))
}

// TestInvalidatedSlotIsRecreatedAndBackfilled makes the server invalidate the slot
// (max_slot_wal_keep_size) while the streamer is stopped with undelivered rows; the
// next start recreates the slot and delivers the rows through the backfill.
func TestInvalidatedSlotIsRecreatedAndBackfilled(t *testing.T) {
	recreatedAfterInvalidation(t, "max_slot_wal_keep_size = '1MB'", []string{
		"CREATE TABLE filler (x text)",
		"INSERT INTO filler SELECT repeat('x', 2000) FROM generate_series(1, 40000)",
		"SELECT pg_switch_wal()",
		"CHECKPOINT",
	}, "")
}

// TestIdleInvalidatedSlotIsRecreatedAndBackfilled: PostgreSQL 18 invalidates a slot
// left idle past idle_replication_slot_timeout; the streamer treats it like a
// slot that lost its WAL.
func TestIdleInvalidatedSlotIsRecreatedAndBackfilled(t *testing.T) {
	if testenv.PGMajor(t, testenv.Postgres(t)) < 18 {
		t.Skip("idle_replication_slot_timeout is new in PostgreSQL 18")
	}
	recreatedAfterInvalidation(t, "idle_replication_slot_timeout = '1s'", []string{
		"SELECT pg_sleep(2)",
		"CHECKPOINT",
	}, "idle_timeout")
}

// recreatedAfterInvalidation stops the streamer with 500 rows only in the slot's
// WAL, lets setting and then invalidate invalidate the slot, and checks that the
// next start recreates the slot, says why (reason, when not empty) and delivers
// every row exactly once through the backfill.
func recreatedAfterInvalidation(t *testing.T, setting string, invalidate []string, reason string) {
	pg := testenv.PrivatePostgres(t)
	e := fixture.NewOn(t, pg.DSN(), testenv.ModernClickHouse(t))
	ctx := context.Background()
	for _, q := range []string{"ALTER SYSTEM SET " + setting, "SELECT pg_reload_conf()"} {
		if _, err := e.Pool.Exec(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	env := envFor(e)
	cmd, out := startStreamer(t, env)
	e.Insert(t, 100, false)
	fixture.WaitFor(t, time.Minute, "first rows delivered", func() bool { _, p := e.Committed(t); return p == 100 })
	_ = cmd.Process.Signal(syscall.SIGTERM)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("streamer: %v\n%s", err, out)
	}
	e.Insert(t, 500, false) // pending, only in the slot's WAL
	for _, q := range invalidate {
		if _, err := e.Pool.Exec(ctx, q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	var walStatus string
	if err := e.Pool.QueryRow(ctx, "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1", e.Slot).Scan(&walStatus); err != nil {
		t.Fatal(err)
	}
	if walStatus != "lost" {
		t.Fatalf("slot wal_status = %q after %v, want lost (test set-up)", walStatus, invalidate)
	}
	_, out2 := startStreamer(t, env)
	e.AssertExactlyDelivered(t, time.Minute, e.CurrentWAL(t))
	if !strings.Contains(out2.String(), "invalidated") || !strings.Contains(out2.String(), `"backfilled_rows":500`) {
		t.Fatalf("logs do not say the slot was recreated and 500 rows backfilled:\n%s", out2)
	}
	if reason != "" && !strings.Contains(out2.String(), `"invalidation_reason":"`+reason+`"`) {
		t.Fatalf("logs do not name the invalidation reason %s:\n%s", reason, out2)
	}
}

func slotPID(t *testing.T, e *fixture.Env) int32 {
	var pid *int32
	_ = e.Pool.QueryRow(context.Background(), "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1", e.Slot).Scan(&pid)
	if pid == nil {
		return 0
	}
	return *pid
}

// TestStartWithClickHouseUnreachable (issue 11 item 4): `run` against a
// ClickHouse that does not answer streams anyway — the outbox is the buffer —
// says in one line what is unreachable and what to check, hands the rows to
// the sweep after the outage bound and lets the slot move; SIGTERM ends it
// cleanly. (It used to exit at once: a crash loop under Kubernetes.)
func TestStartWithClickHouseUnreachable(t *testing.T) {
	e := fixture.New(t, testenv.ModernClickHouse(t))
	cmd, out := startStreamer(t, envFor(e, "CLICKHOUSE_PORT=1", "CLICKHOUSE_CONNECT_TIMEOUT=1", "CLICKHOUSE_OUTAGE_FAIL_AFTER=1s"))
	fixture.WaitFor(t, time.Minute, "streamer streaming", func() bool { return e.ConfirmedFlush(t) > 0 })
	e.Insert(t, 20, false)
	after := e.CurrentWAL(t)
	fixture.WaitFor(t, time.Minute, "rows failed with the reason", func() bool {
		var n int
		_ = e.Pool.QueryRow(context.Background(), `SELECT count(*) FROM event_outbox
			WHERE status = 'failed' AND last_error LIKE '%unreachable%'`).Scan(&n)
		return n == 20
	})
	fixture.WaitFor(t, time.Minute, "slot past the failed rows", func() bool { return e.ConfirmedFlush(t) >= after })
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("streamer: %v\n%s", err, out)
	}
	if !strings.Contains(out.String(), "clickhouse at 127.0.0.1:1 is unreachable") || !strings.Contains(out.String(), "CLICKHOUSE_HOST") {
		t.Errorf("output does not say what is unreachable and what to check:\n%s", out)
	}
	// One line at start says what happens to the rows meanwhile.
	if n := strings.Count(out.String(), "clickhouse is unreachable at start; streaming goes on"); n != 1 ||
		!strings.Contains(out.String(), "each batch is retried for 1s (CLICKHOUSE_OUTAGE_FAIL_AFTER), then its rows are marked failed and acknowledged; the sweep delivers them once ClickHouse is back (every 1m0s, EVENT_PROCESSING_INTERVAL)") {
		t.Errorf("%d start lines about the outage, or without the plan:\n%s", n, out)
	}
}

// TestPruneSIGKILLLosesNothing (issue 12): `prune` killed in the middle of a
// pass leaves every row that is not an old processed one, and a second pass
// finishes the job; `prune --dry-run` counts without removing.
func TestPruneSIGKILLLosesNothing(t *testing.T) {
	e := fixture.New(t, testenv.ModernClickHouse(t))
	ctx := context.Background()
	if _, err := e.Pool.Exec(ctx, `INSERT INTO event_outbox (event_type, event_date_time, status, created_at)
		SELECT 'old', now() AT TIME ZONE 'UTC', CASE WHEN g % 100 = 0 THEN 'failed' WHEN g % 101 = 0 THEN 'dead' ELSE 'processed' END,
		       (now() AT TIME ZONE 'UTC') - interval '2 days'
		FROM generate_series(1, 200000) AS g`); err != nil {
		t.Fatal(err)
	}
	count := func(q string) int64 {
		var n int64
		if err := e.Pool.QueryRow(ctx, q).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	keep := count("SELECT count(*) FROM event_outbox WHERE status <> 'processed'")
	code, out := runCmd(t, envFor(e), "prune", "--older-than", "1d", "--dry-run")
	if code != 0 || !strings.Contains(out, fmt.Sprintf("would remove %d processed rows", 200000-keep)) {
		t.Fatalf("dry run (exit %d):\n%s", code, out)
	}
	cmd, _ := startStreamerArgs(t, envFor(e), "prune", "--older-than", "1d")
	time.Sleep(150 * time.Millisecond)
	_ = cmd.Process.Kill()
	_ = cmd.Wait()
	// The killed client's backend finishes (or aborts) the batch statement it
	// was running; each batch is one statement, so either way it is whole.
	fixture.WaitFor(t, time.Minute, "the killed prune's last statement to end", func() bool {
		return count(`SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
			AND state = 'active' AND query LIKE 'WITH batch AS%'`) == 0
	})
	left := count("SELECT count(*) FROM event_outbox WHERE status = 'processed'")
	if got := count("SELECT count(*) FROM event_outbox WHERE status <> 'processed'"); got != keep {
		t.Fatalf("after a SIGKILLed prune %d failed or dead rows remain, want %d", got, keep)
	}
	code, out = runCmd(t, envFor(e), "prune", "--older-than", "1d")
	if code != 0 || !strings.Contains(out, fmt.Sprintf("removed %d processed rows", left)) {
		t.Fatalf("second prune (exit %d) after the kill left %d processed rows:\n%s", code, left, out)
	}
	if n := count("SELECT count(*) FROM event_outbox WHERE status = 'processed'"); n != 0 {
		t.Fatalf("%d old processed rows left after the second pass", n)
	}
	t.Logf("the killed pass had removed %d of %d rows; %s", 200000-keep-left, 200000-keep, strings.TrimSpace(out))
}
