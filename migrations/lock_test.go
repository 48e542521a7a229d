package migrations_test

import (
	"context"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/testenv"
	"github.com/outbox-streamer/outbox-streamer/migrations"
	"github.com/outbox-streamer/outbox-streamer/sink"
)

// freshConfig is a migration config over a new PostgreSQL database and a new
// ClickHouse database on the modern server.
func freshConfig(t *testing.T) migrations.Config {
	t.Helper()
	srv := testenv.ModernClickHouse(t)
	db := testenv.NewCHDatabase(t, srv)
	return migrations.Config{PostgresDSN: testenv.NewDatabase(t), Publication: "outbox_publication",
		ClickHouse: sink.Config{Addr: srv.Addr, User: "default", Database: db, Table: "event_log"}}
}

// chVersionRows counts the rows of ClickHouse's migration version table: every
// version change golang-migrate records is one row (dirty, then clean).
func chVersionRows(t *testing.T, cfg migrations.Config) uint64 {
	t.Helper()
	conn, err := sink.Connect(cfg.ClickHouse)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	var n uint64
	q := "SELECT count() FROM " + sink.QuoteIdent(cfg.ClickHouse.Database) + "." + sink.QuoteIdent(migrations.MigrationsTable)
	if err := conn.QueryRow(context.Background(), q).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// TestMigrationLockHoldsAcrossProcesses: ClickHouse has no lock of its own, so
// two migrate jobs used to run its migrations side by side (the lock was
// process-local). The lock is a PostgreSQL advisory lock now: a migration
// waits while another holds it, and two at once record each version once.
func TestMigrationLockHoldsAcrossProcesses(t *testing.T) {
	cfg := freshConfig(t)
	ctx := context.Background()
	holder, err := pgx.Connect(ctx, cfg.PostgresDSN)
	if err != nil {
		t.Fatal(err)
	}
	defer holder.Close(ctx)
	if _, err := holder.Exec(ctx, "SELECT pg_advisory_lock($1)", migrations.LockKey(cfg)); err != nil {
		t.Fatal(err)
	}
	var waits []string
	cfg.Notify = func(m string) { waits = append(waits, m) }
	short, cancel := context.WithTimeout(ctx, 5*time.Second)
	err = migrations.Up(short, cfg)
	cancel()
	if err == nil || !strings.Contains(err.Error(), "migration lock") {
		t.Fatalf("migrate up while another holds the lock: %v, want it to wait for the lock", err)
	}
	if len(waits) == 0 || !strings.Contains(waits[0], "waiting for another migration") {
		t.Errorf("the wait was not reported: %q", waits)
	}
	if _, err := holder.Exec(ctx, "SELECT pg_advisory_unlock($1)", migrations.LockKey(cfg)); err != nil {
		t.Fatal(err)
	}

	// One migration alone records this many version rows ...
	alone := freshConfig(t)
	if err := migrations.Up(ctx, alone); err != nil {
		t.Fatal(err)
	}
	want := chVersionRows(t, alone)
	// ... and two at once record no more: the second finds the work done.
	cfg.Notify = nil
	var wg sync.WaitGroup
	errs := make([]error, 2)
	for i := range errs {
		wg.Add(1)
		go func() { defer wg.Done(); errs[i] = migrations.Up(ctx, cfg) }()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("concurrent migrate up %d: %v", i, err)
		}
	}
	if got := chVersionRows(t, cfg); got != want {
		t.Errorf("two concurrent migrations recorded %d ClickHouse version rows, one alone %d: they ran side by side", got, want)
	}
}

// TestForceClearsDirtyState: a dirty PostgreSQL version (its migration is
// one transaction, rolled back) is run again by migrate up; a dirty
// ClickHouse version needs the schema repaired and the version forced, and
// Force does it for one database and leaves the other alone.
func TestForceClearsDirtyState(t *testing.T) {
	cfg := freshConfig(t)
	ctx := context.Background()
	if err := migrations.Up(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	conn, err := pgx.Connect(ctx, cfg.PostgresDSN)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, "UPDATE "+migrations.MigrationsTable+" SET dirty = true"); err != nil {
		t.Fatal(err)
	}
	st, err := migrations.Statuses(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if st[0].State != "dirty" || !strings.Contains(st[0].String(), "run: outbox-streamer migrate up") {
		t.Fatalf("status after a half-done postgres migration: %v", st[0])
	}
	if err := migrations.Up(ctx, cfg); err != nil {
		t.Fatalf("migrate up on a dirty postgres version: %v", err)
	}

	ch, err := sink.Connect(cfg.ClickHouse)
	if err != nil {
		t.Fatal(err)
	}
	defer ch.Close()
	vt := sink.QuoteIdent(cfg.ClickHouse.Database) + "." + sink.QuoteIdent(migrations.MigrationsTable)
	if err := ch.Exec(ctx, "INSERT INTO "+vt+" (version, dirty, sequence) SELECT max(version), 1, max(sequence) + 1 FROM "+vt); err != nil {
		t.Fatal(err)
	}
	st, err = migrations.Statuses(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if st[1].State != "dirty" || !strings.Contains(st[1].String(), "migrate force VERSION --database clickhouse") {
		t.Fatalf("status after a half-done clickhouse migration: %v", st[1])
	}
	if err := migrations.Up(ctx, cfg); err == nil {
		t.Fatal("migrate up on a dirty clickhouse version succeeded")
	}
	if err := migrations.Force(ctx, cfg, migrations.ClickHouse, 99); err == nil || !strings.Contains(err.Error(), "does not exist") {
		t.Errorf("force to a version that does not exist: %v", err)
	}
	if err := migrations.Force(ctx, cfg, migrations.ClickHouse, int(st[1].Latest)); err != nil {
		t.Fatal(err)
	}
	st, err = migrations.Statuses(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range st {
		if s.State != "up to date" {
			t.Errorf("after force: %v", s)
		}
	}
	if err := migrations.Up(ctx, cfg); err != nil {
		t.Fatalf("migrate up after force: %v", err)
	}
}

// TestConnectWaitRetries: a migrate job that starts before PostgreSQL accepts
// connections retries for ConnectWait, saying so, instead of failing at once.
func TestConnectWaitRetries(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close() // nothing listens there now
	var waits []string
	cfg := migrations.Config{PostgresDSN: "postgres://postgres@" + addr + "/postgres?connect_timeout=1", Publication: "p",
		ClickHouse: sink.Config{Addr: "127.0.0.1:1", Database: "d", Table: "t"}, ConnectWait: 1500 * time.Millisecond,
		Notify: func(m string) { waits = append(waits, m) }}
	err = migrations.Up(context.Background(), cfg)
	if err == nil || !strings.Contains(err.Error(), "connect to postgres") {
		t.Fatalf("migrate up against a closed port: %v", err)
	}
	if len(waits) < 2 || !strings.Contains(waits[0], "postgres is not reachable yet (attempt 1") {
		t.Fatalf("want at least two reported retries, got %q", waits)
	}
}
