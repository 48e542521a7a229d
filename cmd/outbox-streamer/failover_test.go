package main

import (
	"context"
	"fmt"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/fixture"
	"github.com/outbox-streamer/outbox-streamer/internal/harness/localsvc"
	"github.com/outbox-streamer/outbox-streamer/internal/harness/testenv"
)

// TestPrimaryFailoverExactlyOnce: a primary with a physical standby while
// producers commit; the streamer is given both servers in one DSN with
// target_session_attrs=read-write. On 17+ the standby synchronises slots
// and is named in the primary's synchronized_standby_slots, and the streamer
// creates a failover slot (REPLICATION_SLOT_FAILOVER=auto); before 17 the
// slot is lost with the primary. The primary is SIGKILLed while a large
// transaction is being streamed and staged (14+), the standby promoted, and
// the same streamer process continues on it, on the synced slot (17+) or a
// new one and the backfill: every row the new primary holds reaches
// ClickHouse exactly once (without FINAL), every one is processed,
// ClickHouse holds nothing the new primary lacks, and nothing of the lost
// transaction stays in the staging table.
func TestPrimaryFailoverExactlyOnce(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	pg := testenv.PrivatePostgres(t)
	failoverSlots, streams := pg.Major >= 17, pg.Major >= testenv.MinStreamingMajor
	e := fixture.NewOn(t, pg.DSN(), testenv.ModernClickHouse(t))
	var sbSettings map[string]string
	if failoverSlots {
		sbSettings = map[string]string{"sync_replication_slots": "on"}
	}
	standby, err := pg.StartStandby(ctx, localsvc.StandbyOptions{Settings: sbSettings})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = standby.Stop() })
	if failoverSlots {
		for _, q := range []string{"ALTER SYSTEM SET synchronized_standby_slots = 'standby'", "SELECT pg_reload_conf()"} {
			if _, err := e.Pool.Exec(ctx, q); err != nil {
				t.Fatalf("%s: %v", q, err)
			}
		}
	}
	both := multiHostDSN(t, e.DSN, pg.Port, standby.Port)
	cmd, out := startStreamer(t, envFor(e, "DATABASE_URL="+smallWorkMem(both)))
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("streamer output:\n%s", out)
		}
	})

	stopProducers := produce(ctx, t, both)
	defer stopProducers()
	if failoverSlots {
		fixture.WaitFor(t, time.Minute, "the failover slot synced to the standby", func() bool {
			// A running-transactions record lets the slot's catalog horizon
			// move, which the standby waits for before it keeps a synced slot.
			_, _ = e.Pool.Exec(ctx, "SELECT pg_log_standby_snapshot()")
			return failoverSlotSynced(ctx, t, standby.DSN(), e.Slot)
		})
	}
	fixture.WaitFor(t, time.Minute, "rows delivered before the failover", func() bool { _, p := e.Committed(t); return p > 500 })
	beginLargeTransaction(ctx, t, e.Pool, "failover.lost")
	staged := func() uint64 { return stagedRows(ctx, t, e) }
	if streams {
		fixture.WaitFor(t, time.Minute, "the open transaction staged in ClickHouse", func() bool { return staged() > 0 })
	}

	if err := pg.Kill(); err != nil {
		t.Fatal(err)
	}
	if err := standby.Promote(ctx); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * time.Second) // producers commit on the new primary too
	commits := stopProducers()
	if commits == 0 {
		t.Fatal("the producers committed nothing")
	}

	e.Pool = newPool(ctx, t, standbyDatabaseDSN(t, e.DSN, standby.Port))
	e.AssertExactlyDelivered(t, 2*time.Minute, e.CurrentWAL(t))
	total, _ := e.Committed(t)
	t.Logf("%d producer commits acknowledged (20 rows each), %d rows on the new primary, all in ClickHouse once", commits, total)
	// The new primary has the lost transaction's changes but no abort record
	// (it never finished). The new session cleared what the old one staged
	// when it started; before 17 the new slot starts after the transaction,
	// and 18 does not decode a transaction that is neither running nor
	// committed. 17 streams it again when the synced slot's position is
	// before its rows, and the new session stages it once more; 17 then
	// sends its Stream Abort when it decodes the new primary's next
	// running-transactions record (logged at the promotion's checkpoint and
	// by the background writer): only a running streamer drops those rows.
	fixture.WaitFor(t, time.Minute, "the lost transaction's staged rows cleared", func() bool { return staged() == 0 })
	if cmd.ProcessState != nil {
		t.Fatalf("the streamer exited during the failover:\n%s", out)
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	_ = cmd.Wait()
	// 17+: the synced slot carried on, no second slot. Before: a new one.
	want := 2
	if failoverSlots {
		want = 1
	}
	if n := strings.Count(out.String(), "created replication slot"); n != want {
		t.Fatalf("the streamer created %d slots, want %d:\n%s", n, want, out)
	}
}

// produce commits small transactions of outbox rows through dsn from two
// connections until the returned stop, which returns how many commits
// succeeded. Errors (the primary dying) make a producer reconnect. stop lets
// the statement in progress finish: a cancelled one can still commit on the
// server after the client gave up on it, past a count the test already took.
func produce(ctx context.Context, t *testing.T, dsn string) (stop func() int64) {
	t.Helper()
	var stopping atomic.Bool
	var commits atomic.Int64
	var wg sync.WaitGroup
	for range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var conn *pgx.Conn
			for !stopping.Load() && ctx.Err() == nil {
				if conn == nil {
					c, err := pgx.Connect(ctx, dsn)
					if err != nil {
						time.Sleep(100 * time.Millisecond)
						continue
					}
					conn = c
				}
				_, err := conn.Exec(ctx, `INSERT INTO event_outbox (event_type, event_date_time, environment, event_context, metadata_version)
					SELECT 'failover.' || g, now() AT TIME ZONE 'UTC', 'test', jsonb_build_object('n', g), 1 FROM generate_series(1, 20) g`)
				if err != nil {
					conn.Close(context.Background())
					conn = nil
					continue
				}
				commits.Add(1)
				time.Sleep(5 * time.Millisecond)
			}
			if conn != nil {
				conn.Close(context.Background())
			}
		}()
	}
	var once sync.Once
	return func() int64 {
		once.Do(func() { stopping.Store(true); wg.Wait() })
		return commits.Load()
	}
}

// failoverSlotSynced reports whether the standby holds slot as a synced,
// persistent failover slot.
func failoverSlotSynced(ctx context.Context, t *testing.T, dsn, slot string) bool {
	t.Helper()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return false
	}
	defer conn.Close(context.Background())
	var n int
	err = conn.QueryRow(ctx, `SELECT count(*) FROM pg_replication_slots
		WHERE slot_name = $1 AND synced AND failover AND NOT temporary`, slot).Scan(&n)
	return err == nil && n == 1
}

// multiHostDSN is dsn (a database on 127.0.0.1) with both ports as hosts and
// target_session_attrs=read-write: libpq's and pgx's way to find the primary.
func multiHostDSN(t *testing.T, dsn string, primaryPort, standbyPort int) string {
	t.Helper()
	u, err := url.Parse(dsn)
	if err != nil {
		t.Fatal(err)
	}
	u.Host = fmt.Sprintf("127.0.0.1:%d,127.0.0.1:%d", primaryPort, standbyPort)
	q := u.Query()
	q.Set("target_session_attrs", "read-write")
	u.RawQuery = q.Encode()
	return u.String()
}

// standbyDatabaseDSN is dsn on the standby's port.
func standbyDatabaseDSN(t *testing.T, dsn string, port int) string {
	t.Helper()
	u, err := url.Parse(dsn)
	if err != nil {
		t.Fatal(err)
	}
	host, _, _ := strings.Cut(u.Host, ":")
	u.Host = fmt.Sprintf("%s:%d", host, port)
	return u.String()
}

func newPool(ctx context.Context, t *testing.T, dsn string) *pgxpool.Pool {
	t.Helper()
	p, err := pgxpool.New(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	return p
}
