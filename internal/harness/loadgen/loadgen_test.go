package loadgen_test

import (
	"context"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/loadgen"
	"github.com/outbox-streamer/outbox-streamer/internal/harness/testenv"
	"github.com/outbox-streamer/outbox-streamer/migrations"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// newPool returns a pool on a fresh database; with schema, the outbox's
// PostgreSQL migrations are applied (ClickHouse is not needed).
func newPool(t *testing.T, schema bool) *pgxpool.Pool {
	t.Helper()
	dsn := testenv.NewDatabase(t)
	ctx := context.Background()
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		t.Fatal(err)
	}
	cfg.MaxConns = 8
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	if !schema {
		return pool
	}
	files, err := migrations.Rendered("postgres", migrations.PostgresData("outbox_publication"))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for name := range files {
		if strings.HasSuffix(name, ".up.sql") {
			names = append(names, name)
		}
	}
	sort.Strings(names)
	for _, name := range names {
		if _, err := pool.Exec(ctx, files[name]); err != nil {
			t.Fatalf("apply %s: %v", name, err)
		}
	}
	return pool
}

// outboxCounts returns the rows in the outbox and those marked as written in
// a transaction meant to roll back.
func outboxCounts(t *testing.T, pool *pgxpool.Pool) (total, rollbackMarked int64) {
	t.Helper()
	err := pool.QueryRow(context.Background(),
		"SELECT count(*), count(*) FILTER (WHERE event_context ? 'rollback') FROM event_outbox").Scan(&total, &rollbackMarked)
	if err != nil {
		t.Fatal(err)
	}
	return total, rollbackMarked
}

func TestRunCommitsExactlyCount(t *testing.T) {
	for _, copyMode := range []bool{false, true} {
		name := "append"
		if copyMode {
			name = "copy"
		}
		t.Run(name, func(t *testing.T) {
			pool := newPool(t, true)
			cfg := loadgen.Config{Count: 2000, TxSize: 50, RollbackFraction: 0.2, Connections: 4, Copy: copyMode, Seed: 7, ContextBytes: 200}
			stats, err := loadgen.Run(context.Background(), pool, cfg, nil)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("%+v (%.0f events/s)", stats, stats.Rate())
			total, marked := outboxCounts(t, pool)
			if stats.Committed != 2000 || total != stats.Committed {
				t.Fatalf("Stats.Committed %d, PostgreSQL has %d rows; want both 2000", stats.Committed, total)
			}
			if marked != 0 {
				t.Fatalf("%d rows from rolled-back transactions are in the outbox", marked)
			}
			if stats.RolledBack == 0 || stats.RolledBack != stats.RolledBackTx*50 {
				t.Fatalf("rolled back %d events in %d transactions, want some, 50 each", stats.RolledBack, stats.RolledBackTx)
			}
			if stats.CommittedTx != 40 || stats.Failed != 0 || stats.InDoubt != 0 {
				t.Fatalf("stats %+v, want 40 committed transactions and no failures", stats)
			}
		})
	}
}

// TestRunRateDurationAndProgress: the rate is a ceiling, the duration ends the
// run, and progress is reported on the interval.
func TestRunRateDurationAndProgress(t *testing.T) {
	pool := newPool(t, true)
	cfg := loadgen.Config{Rate: 400, TxSize: 10, Connections: 2, Duration: 1500 * time.Millisecond, ProgressInterval: 200 * time.Millisecond, RollbackFraction: 0.5, Seed: 1}
	var mu sync.Mutex
	var reports []loadgen.Stats
	stats, err := loadgen.Run(context.Background(), pool, cfg, func(s loadgen.Stats) {
		mu.Lock()
		defer mu.Unlock()
		reports = append(reports, s)
	})
	if err != nil {
		t.Fatal(err)
	}
	written := stats.Committed + stats.RolledBack
	t.Logf("%+v, %d progress reports", stats, len(reports))
	// At 400/s a transaction of 10 gets a 25 ms slot; the first starts at
	// once, so at most 61 fit in 1.5 s. Only the bounds a loaded machine
	// cannot break are asserted: it can make the run slower, never faster.
	if written > 610 || written == 0 {
		t.Fatalf("wrote %d events in %s at 400/s, want some and never more than 610", written, stats.Elapsed)
	}
	if stats.Elapsed < 1500*time.Millisecond {
		t.Fatalf("run took %s, want at least its 1.5 s", stats.Elapsed)
	}
	if len(reports) == 0 {
		t.Fatal("no progress report in 1.5 s at 200 ms")
	}
	for i := 1; i < len(reports); i++ {
		if reports[i].Committed < reports[i-1].Committed {
			t.Fatalf("progress went backwards: %+v then %+v", reports[i-1], reports[i])
		}
	}
	if total, _ := outboxCounts(t, pool); total != stats.Committed {
		t.Fatalf("PostgreSQL has %d rows, Stats.Committed %d", total, stats.Committed)
	}
}

// TestRunStopsCleanly: cancelling the context (SIGINT in the command) ends the
// run without an error and without a transaction left in doubt, so the count
// still matches the database.
func TestRunStopsCleanly(t *testing.T) {
	pool := newPool(t, true)
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(500*time.Millisecond, cancel)
	stats, err := loadgen.Run(ctx, pool, loadgen.Config{TxSize: 20, Connections: 4, Copy: true}, nil)
	if err != nil {
		t.Fatal(err)
	}
	total, _ := outboxCounts(t, pool)
	if stats.Committed == 0 || total != stats.Committed || stats.InDoubt != 0 || stats.Failed != 0 {
		t.Fatalf("stats %+v, PostgreSQL has %d rows", stats, total)
	}
}

// TestRunFailures: without the outbox table every transaction fails; the run
// stops with the error, or with KeepGoing counts the failures and carries on.
func TestRunFailures(t *testing.T) {
	pool := newPool(t, false)
	stats, err := loadgen.Run(context.Background(), pool, loadgen.Config{Count: 100, Connections: 2}, nil)
	if err == nil || !strings.Contains(err.Error(), "event_outbox") {
		t.Fatalf("got %v, want an error about the missing table", err)
	}
	if stats.Committed != 0 || stats.FailedTx == 0 {
		t.Fatalf("stats %+v, want failures only", stats)
	}

	stats, err = loadgen.Run(context.Background(), pool, loadgen.Config{Count: 100, Connections: 2, KeepGoing: true, Duration: 400 * time.Millisecond}, nil)
	if err != nil {
		t.Fatalf("with KeepGoing: %v", err)
	}
	// The backoff (50 ms, then doubling) keeps a dead database from being
	// hammered: a handful of attempts per connection, not thousands.
	if stats.FailedTx < 4 || stats.FailedTx > 20 {
		t.Fatalf("with KeepGoing: %d failed transactions in 400 ms, want a handful", stats.FailedTx)
	}
}

func TestConfigValidate(t *testing.T) {
	bad := []loadgen.Config{
		{Rate: -1},
		{TxSize: -1},
		{RollbackFraction: 1.5},
		{RollbackFraction: -0.1},
		{RollbackFraction: 1, Count: 10},
		{Connections: -1},
		{Duration: -time.Second},
		{Count: -1},
		{ContextBytes: -1},
	}
	for _, c := range bad {
		if err := c.Validate(); err == nil {
			t.Errorf("%+v: no error", c)
		}
	}
	var c loadgen.Config
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if c.TxSize != 10 || c.Connections != 1 || c.Environment != "loadgen" || c.TxTimeout != 30*time.Second || c.ProgressInterval != time.Second || c.Writer == nil {
		t.Fatalf("defaults %+v", c)
	}
}

// TestRunKeepGoingCountsExactlyUnderKills terminates the generator's
// connections over and over while it runs. Transactions fail at every stage,
// some of them in the middle of COMMIT; with KeepGoing those are looked up
// with txid_status, so Stats.Committed still equals the rows in PostgreSQL.
func TestRunKeepGoingCountsExactlyUnderKills(t *testing.T) {
	pool := newPool(t, true)
	ctx := context.Background()
	killer, err := pool.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer killer.Release()
	var killed int
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
			var n int
			if err := killer.QueryRow(ctx, `SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
				WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'`).Scan(&n); err != nil {
				t.Errorf("terminate backends: %v", err)
				return
			}
			killed += n
		}
	}()
	stats, err := loadgen.Run(ctx, pool, loadgen.Config{TxSize: 20, Connections: 4, KeepGoing: true, Duration: 3 * time.Second, Seed: 9}, nil)
	close(stop)
	<-done
	if err != nil {
		t.Fatal(err)
	}
	// The last round of terminations may have hit idle connections the pool
	// still holds: start the count on fresh ones.
	pool.Reset()
	total, _ := outboxCounts(t, pool)
	t.Logf("%d backends terminated; %+v; PostgreSQL has %d rows", killed, stats, total)
	if stats.Committed == 0 || stats.FailedTx == 0 {
		t.Fatalf("stats %+v: the test wants both commits and failures", stats)
	}
	if stats.InDoubt != 0 || total != stats.Committed {
		t.Fatalf("Stats.Committed %d (in doubt %d), PostgreSQL has %d rows", stats.Committed, stats.InDoubt, total)
	}
}
