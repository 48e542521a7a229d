package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/fixture"
	"github.com/outbox-streamer/outbox-streamer/internal/harness/loadgen"
	"github.com/outbox-streamer/outbox-streamer/internal/harness/testenv"
	"github.com/outbox-streamer/outbox-streamer/internal/verify"
)

// TestChaos drives the real binary while a producer commits at least 200,000 events
// in mixed transactions with rollbacks; meanwhile the streamer is SIGKILLed and
// restarted at random moments (once during a ClickHouse outage, so that it starts
// without ClickHouse), ClickHouse is stopped for a while and frozen past the
// streamer's receive timeout (inserts whose outcome is unknown, which the server
// completes after the client gave up), PostgreSQL is restarted, and recent rows —
// some in flight — are deleted. At the end ClickHouse must hold every committed
// event that still exists exactly once and nothing twice (without FINAL), every
// row must be processed and the slot caught up. OUTBOX_CHAOS_SEED replays a run.
func TestChaos(t *testing.T) {
	if testing.Short() {
		t.Skip("chaos test skipped in -short mode")
	}
	seed, rng := chaosSeed(t)

	pg := testenv.PrivatePostgres(t)
	ch := testenv.PrivateClickHouse(t, false)
	e := fixture.NewOn(t, pg.DSN(), testenv.CHServerOf(ch))
	env := envFor(e,
		"CLICKHOUSE_OUTAGE_FAIL_AFTER=2s", "EVENT_PROCESSING_INTERVAL=1s", "RETRY_MAX_WAIT=1s",
		"EVENT_RETRY_BASE_DELAY=0.5", "EVENT_RETRY_MAX_DELAY=2", "CLICKHOUSE_CONNECT_TIMEOUT=2", "CLICKHOUSE_SEND_RECEIVE_TIMEOUT=5")
	sup := superviseStreamer(t, env)
	sup.keepLogsOnFailure(fmt.Sprintf("chaos-%d.log", seed))
	fixture.WaitFor(t, time.Minute, "streamer streaming", func() bool { return e.ConfirmedFlush(t) > 0 })

	pcfg, err := pgxpool.ParseConfig(e.DSN)
	if err != nil {
		t.Fatal(err)
	}
	pcfg.MaxConns = 4
	pool, err := pgxpool.NewWithConfig(context.Background(), pcfg)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	loadDone := make(chan loadgen.Stats, 1)
	go func() {
		st, err := loadgen.Run(ctx, pool, loadgen.Config{
			Rate: 6000, TxSize: 40, RollbackFraction: 0.1, Connections: 2, Count: 200000,
			Copy: true, KeepGoing: true, Seed: seed,
		}, nil)
		if err != nil {
			t.Errorf("load generator: %v", err)
		}
		loadDone <- st
	}()
	// One transaction far larger than a batch, in the middle of the chaos.
	bigDone := make(chan struct{})
	go func() {
		defer close(bigDone)
		time.Sleep(2 * time.Second)
		for attempt := 0; attempt < 20; attempt++ {
			_, err := pool.Exec(ctx, `INSERT INTO event_outbox (event_type, event_date_time, event_context)
				SELECT 'big', now() AT TIME ZONE 'UTC', '{}' FROM generate_series(1, 20000)`)
			if err == nil {
				return
			}
			time.Sleep(time.Second)
		}
	}()

	// Deletes of recent rows, some of them in flight: the stream delivers
	// their inserts, their status update finds nothing.
	var deleted []int64
	deleterDone := make(chan struct{})
	stopDeleter := make(chan struct{})
	go func() {
		defer close(deleterDone)
		for {
			select {
			case <-stopDeleter:
				return
			case <-time.After(300 * time.Millisecond):
			}
			rows, err := pool.Query(ctx, `DELETE FROM event_outbox WHERE id IN (
				SELECT id FROM event_outbox ORDER BY id DESC LIMIT 2) RETURNING id`)
			if err != nil {
				continue // PostgreSQL restarting
			}
			for rows.Next() {
				var id int64
				if rows.Scan(&id) == nil {
					deleted = append(deleted, id)
				}
			}
			rows.Close()
		}
	}()

	kills, outages, pgRestarts, freezes := 0, 0, 0, 0
	pause := func() { time.Sleep(time.Duration(500+rng.IntN(2500)) * time.Millisecond) }
	for kills < 6 {
		pause()
		sup.kill()
		kills++
		switch kills {
		case 2:
			pause()
			if err := ch.Halt(); err != nil {
				t.Fatal(err)
			}
			// A start while ClickHouse is down: the streamer must stream,
			// not exit.
			time.Sleep(time.Second)
			sup.kill()
			time.Sleep(time.Duration(3000+rng.IntN(3000)) * time.Millisecond)
			if err := ch.Start(context.Background()); err != nil {
				t.Fatal(err)
			}
			e.StopMerges(t) // a restart forgets it
			outages++
		case 3:
			// Frozen past CLICKHOUSE_SEND_RECEIVE_TIMEOUT (5 s): inserts time
			// out in the client, and the server completes them when thawed.
			if err := ch.Freeze(); err != nil {
				t.Fatal(err)
			}
			time.Sleep(time.Duration(6000+rng.IntN(2000)) * time.Millisecond)
			if err := ch.Thaw(); err != nil {
				t.Fatal(err)
			}
			freezes++
		case 4:
			pause()
			if err := pg.Restart(context.Background()); err != nil {
				t.Fatal(err)
			}
			pgRestarts++
		}
	}
	st := <-loadDone
	<-bigDone
	close(stopDeleter)
	<-deleterDone
	t.Logf("producer: %d events committed, %d rolled back, %d failed, %d in doubt; chaos: %d SIGKILLs (+1 during the outage), %d ClickHouse outages, %d freezes, %d PostgreSQL restarts, %d rows deleted, %d streamer starts",
		st.Committed, st.RolledBack, st.Failed, st.InDoubt, kills, outages, freezes, pgRestarts, len(deleted), sup.runs)
	if st.Committed < 200000 {
		t.Fatalf("producer committed only %d events", st.Committed)
	}
	e.AssertExactlyDeliveredExcept(t, 5*time.Minute, e.CurrentWAL(t), deleted)
	fixture.WaitFor(t, time.Minute, "slot lag near zero", func() bool {
		var lag int64
		_ = e.Pool.QueryRow(context.Background(), `SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint
			FROM pg_replication_slots WHERE slot_name = $1`, e.Slot).Scan(&lag)
		return lag < 64*1024
	})
	total, _ := e.Committed(t)
	t.Logf("chaos survived: %d committed rows delivered exactly once", total)
	checkVerifyAfterChaos(t, env, deleted)
	// What the faults made the streamer go through, from its logs.
	logs := sup.logs()
	for _, ev := range []string{"insert into clickhouse failed, retrying", "connect to clickhouse failed, retrying",
		"clickhouse unavailable: batch marked failed", "rows gone from the outbox", "rows found in clickhouse are not sent again",
		"insert with unknown outcome", "pending rows the stream had passed"} {
		t.Logf("streamer log lines %q: %d", ev, strings.Count(logs, ev))
	}
}

// checkVerifyAfterChaos runs `verify` over the whole outbox after the chaos
// run (issue 18): nothing missing, nothing twice; the only rows in ClickHouse
// but not in the outbox are ones the chaos deleted from the outbox after they
// were delivered.
func checkVerifyAfterChaos(t *testing.T, env []string, deleted []int64) {
	t.Helper()
	cmd := exec.Command(binary(t), "verify", "--json", "--max-ids", "100000")
	cmd.Env = env
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, _ := cmd.Output() // the report (exit 1 when something differs); logs go to stderr
	code := cmd.ProcessState.ExitCode()
	var rep verify.Report
	if err := json.Unmarshal(out, &rep); err != nil {
		t.Fatalf("verify --json: exit %d, %v:\n%s\n%s", code, err, out, stderr.String())
	}
	gone := make(map[int64]bool, len(deleted))
	for _, id := range deleted {
		gone[id] = true
	}
	if rep.Totals.Missing != 0 || rep.Totals.Duplicates != 0 {
		t.Fatalf("verify after chaos: %d missing, %d duplicated (exit %d)", rep.Totals.Missing, rep.Totals.Duplicates, code)
	}
	foreign := 0
	for _, b := range rep.Buckets {
		if b.NotInOutbox == nil {
			continue
		}
		for _, id := range b.NotInOutbox.IDs {
			if !gone[id] {
				t.Errorf("verify: id %d is in ClickHouse but not in the outbox, and the chaos did not delete it", id)
			}
			foreign++
		}
	}
	if foreign == 0 && code != 0 {
		t.Errorf("verify found no difference but exited %d", code)
	}
	t.Logf("verify after chaos: %d buckets, %d processed rows, %d rows in ClickHouse that the chaos deleted from the outbox (exit %d)",
		rep.Totals.Buckets, rep.Totals.Outbox, foreign, code)
}
