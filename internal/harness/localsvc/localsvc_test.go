package localsvc_test

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/jackc/pgx/v5"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/localsvc"
)

func TestMain(m *testing.M) {
	// The modern ClickHouse runs as a re-executed copy of this test binary.
	localsvc.RunCHDBLauncherIfRequested()
	os.Exit(m.Run())
}

func TestPostgres(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	start := time.Now()
	pg, err := localsvc.StartPostgres(ctx, localsvc.PostgresOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pg.Stop() })
	t.Logf("postgres %s on port %d started in %v", pg.Version, pg.Port, time.Since(start).Round(time.Millisecond))

	exec := func(sql string) {
		t.Helper()
		conn, err := pgx.Connect(ctx, pg.DSN())
		if err != nil {
			t.Fatalf("connect: %v", err)
		}
		defer conn.Close(ctx)
		if _, err := conn.Exec(ctx, sql); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	queryString := func(sql string) string {
		t.Helper()
		conn, err := pgx.Connect(ctx, pg.DSN())
		if err != nil {
			t.Fatalf("connect: %v", err)
		}
		defer conn.Close(ctx)
		var s string
		if err := conn.QueryRow(ctx, sql).Scan(&s); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
		return s
	}

	if got := queryString("SHOW wal_level"); got != "logical" {
		t.Errorf("wal_level = %q, want logical", got)
	}
	exec("CREATE TABLE t (id int primary key, v text)")
	exec("INSERT INTO t VALUES (1, 'one')")
	// A replication slot checks that logical decoding really works.
	exec("SELECT pg_create_logical_replication_slot('s1', 'pgoutput')")

	start = time.Now()
	if err := pg.Restart(ctx); err != nil {
		t.Fatalf("restart: %v", err)
	}
	t.Logf("postgres restart took %v", time.Since(start).Round(time.Millisecond))
	if got := queryString("SELECT v FROM t WHERE id = 1"); got != "one" {
		t.Errorf("after restart v = %q", got)
	}

	// Freeze: the server is there but does not answer.
	if err := pg.Freeze(); err != nil {
		t.Fatalf("freeze: %v", err)
	}
	shortCtx, shortCancel := context.WithTimeout(ctx, 500*time.Millisecond)
	if conn, err := pgx.Connect(shortCtx, pg.DSN()); err == nil {
		conn.Close(ctx)
		t.Errorf("connected to a frozen server")
	}
	shortCancel()
	if err := pg.Thaw(); err != nil {
		t.Fatalf("thaw: %v", err)
	}
	if got := queryString("SELECT v FROM t WHERE id = 1"); got != "one" {
		t.Errorf("after thaw v = %q", got)
	}

	// Kill with a busy backend: it must die too, or the restart would find
	// the old shared memory still attached.
	busy, err := pgx.Connect(ctx, pg.DSN())
	if err != nil {
		t.Fatal(err)
	}
	busyDone := make(chan error, 1)
	go func() {
		_, err := busy.Exec(context.Background(), "SELECT pg_sleep(60)")
		busyDone <- err
	}()
	if err := pg.Kill(); err != nil {
		t.Fatalf("kill: %v", err)
	}
	if pg.Running() || !localsvc.PortFree(pg.Port) {
		t.Fatalf("postgres still reachable after Kill")
	}
	if err := <-busyDone; err == nil {
		t.Errorf("query on a killed server succeeded")
	}
	start = time.Now()
	if err := pg.Start(ctx); err != nil {
		t.Fatalf("start after kill: %v", err)
	}
	t.Logf("postgres start after kill (crash recovery) took %v", time.Since(start).Round(time.Millisecond))
	if got := queryString("SELECT slot_name FROM pg_replication_slots"); got != "s1" {
		t.Errorf("after crash slot = %q", got)
	}

	dir := pg.Dir
	start = time.Now()
	if err := pg.Stop(); err != nil {
		t.Fatalf("stop: %v", err)
	}
	t.Logf("postgres stop took %v", time.Since(start).Round(time.Millisecond))
	if err := pg.Stop(); err != nil {
		t.Errorf("second stop: %v", err)
	}
	if !localsvc.PortFree(pg.Port) {
		t.Errorf("port %d still in use after Stop", pg.Port)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("dir %s not removed: %v", dir, err)
	}
}

func TestClickHouseModern(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	start := time.Now()
	ch, err := localsvc.StartClickHouse(ctx, localsvc.ClickHouseOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ch.Stop() })
	t.Logf("clickhouse %s on %s (http %s) started in %v", ch.Version, ch.Addr(), ch.HTTPAddr(), time.Since(start).Round(time.Millisecond))
	if !strings.HasPrefix(ch.Version, "26.") {
		t.Errorf("version = %q, want 26.*", ch.Version)
	}
	exerciseClickHouse(ctx, t, ch)
}

func TestClickHouseLegacy(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	start := time.Now()
	ch, err := localsvc.StartClickHouseLegacy(ctx, localsvc.ClickHouseOptions{})
	if errors.Is(err, localsvc.ErrNotInstalled) {
		t.Skip(err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ch.Stop() })
	t.Logf("clickhouse %s on %s (http %s) started in %v", ch.Version, ch.Addr(), ch.HTTPAddr(), time.Since(start).Round(time.Millisecond))
	if !strings.HasPrefix(ch.Version, "18.") {
		t.Errorf("version = %q, want 18.*", ch.Version)
	}
	exerciseClickHouse(ctx, t, ch)
}

// exerciseClickHouse writes a row, restarts, kills and restarts the server
// checking the row survives, then stops it and checks its ports are free.
func exerciseClickHouse(ctx context.Context, t *testing.T, ch *localsvc.ClickHouse) {
	t.Helper()
	open := func() clickhouse.Conn {
		t.Helper()
		conn, err := clickhouse.Open(&clickhouse.Options{Addr: []string{ch.Addr()}, Protocol: clickhouse.Native})
		if err != nil {
			t.Fatalf("open: %v", err)
		}
		return conn
	}
	count := func() uint64 {
		t.Helper()
		conn := open()
		defer conn.Close()
		var n uint64
		if err := conn.QueryRow(ctx, "SELECT count() FROM t_localsvc.events WHERE name = 'hello'").Scan(&n); err != nil {
			t.Fatalf("count: %v", err)
		}
		return n
	}

	conn := open()
	for _, q := range []string{
		"CREATE DATABASE t_localsvc",
		"CREATE TABLE t_localsvc.events (id UInt64, name String) ENGINE = MergeTree ORDER BY id",
	} {
		if err := conn.Exec(ctx, q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	// 18.16 needs the explicit column list.
	batch, err := conn.PrepareBatch(ctx, "INSERT INTO t_localsvc.events (id, name)")
	if err != nil {
		t.Fatalf("prepare batch: %v", err)
	}
	if err := batch.Append(uint64(1), "hello"); err != nil {
		t.Fatalf("append: %v", err)
	}
	if err := batch.Send(); err != nil {
		t.Fatalf("send: %v", err)
	}
	conn.Close()
	if n := count(); n != 1 {
		t.Fatalf("count = %d, want 1", n)
	}

	start := time.Now()
	if err := ch.Restart(ctx); err != nil {
		t.Fatalf("restart: %v", err)
	}
	t.Logf("restart took %v", time.Since(start).Round(time.Millisecond))
	if n := count(); n != 1 {
		t.Fatalf("after restart count = %d, want 1", n)
	}

	if err := ch.Freeze(); err != nil {
		t.Fatalf("freeze: %v", err)
	}
	frozenCtx, frozenCancel := context.WithTimeout(ctx, 500*time.Millisecond)
	// The kernel still accepts connections; the handshake gets no answer.
	frozen, err := clickhouse.Open(&clickhouse.Options{Addr: []string{ch.Addr()}, DialTimeout: 500 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if err := frozen.Ping(frozenCtx); err == nil {
		listeners, _ := exec.Command("ss", "-ltnp").CombinedOutput()
		t.Errorf("ping on %s answered by a frozen server (pid %d); listening sockets:\n%s", ch.Addr(), ch.Pid(), listeners)
	}
	frozen.Close()
	frozenCancel()
	if err := ch.Thaw(); err != nil {
		t.Fatalf("thaw: %v", err)
	}
	if n := count(); n != 1 {
		t.Fatalf("after thaw count = %d, want 1", n)
	}

	if err := ch.Kill(); err != nil {
		t.Fatalf("kill: %v", err)
	}
	if ch.Running() || !localsvc.PortFree(ch.TCPPort) {
		t.Fatalf("server still reachable after Kill")
	}
	start = time.Now()
	if err := ch.Start(ctx); err != nil {
		t.Fatalf("start after kill: %v", err)
	}
	t.Logf("start after kill took %v", time.Since(start).Round(time.Millisecond))
	if n := count(); n != 1 {
		t.Fatalf("after kill count = %d, want 1", n)
	}

	dir := ch.Dir
	start = time.Now()
	if err := ch.Stop(); err != nil {
		t.Fatalf("stop: %v", err)
	}
	t.Logf("stop took %v", time.Since(start).Round(time.Millisecond))
	if err := ch.Stop(); err != nil {
		t.Errorf("second stop: %v", err)
	}
	for _, p := range []int{ch.TCPPort, ch.HTTPPort} {
		if !localsvc.PortFree(p) {
			t.Errorf("port %d still in use after Stop", p)
		}
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("dir %s not removed: %v", dir, err)
	}
}
