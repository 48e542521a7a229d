package localsvc_test

import (
	"context"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/localsvc"
)

// resetMidInsert opens a native connection to addr, starts sending a large
// insert into r.t and resets the connection (RST, as the kernel does for a
// SIGKILLed process with unread data) after delay. It reports whether the
// reset hit the insert (the insert failed), or why it could not start one.
func resetMidInsert(ctx context.Context, t *testing.T, addr string, delay time.Duration) (bool, error) {
	t.Helper()
	var (
		mu  sync.Mutex
		raw *net.TCPConn
	)
	conn, err := clickhouse.Open(&clickhouse.Options{
		Addr: []string{addr},
		DialContext: func(ctx context.Context, addr string) (net.Conn, error) {
			var d net.Dialer
			c, err := d.DialContext(ctx, "tcp", addr)
			if err == nil {
				mu.Lock()
				raw = c.(*net.TCPConn)
				mu.Unlock()
			}
			return c, err
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	batch, err := conn.PrepareBatch(ctx, "INSERT INTO r.t (id, s)")
	if err != nil {
		return false, err
	}
	for j := 0; j < 200000; j++ {
		if err := batch.Append(uint64(j), "payload "+strconv.Itoa(j)); err != nil {
			t.Fatal(err)
		}
	}
	sent := make(chan error, 1)
	go func() { sent <- batch.Send() }()
	time.Sleep(delay)
	mu.Lock()
	_ = raw.SetLinger(0) // close with RST
	_ = raw.Close()
	mu.Unlock()
	return <-sent != nil, nil
}

func createResetTable(ctx context.Context, t *testing.T, addr string) {
	t.Helper()
	conn, err := clickhouse.Open(&clickhouse.Options{Addr: []string{addr}})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	for _, q := range []string{"CREATE DATABASE IF NOT EXISTS r",
		"CREATE TABLE IF NOT EXISTS r.t (id UInt64, s String) ENGINE = MergeTree ORDER BY id"} {
		if err := conn.Exec(ctx, q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
}

// TestClickHouseResetShield resets connections in the middle of inserts, as
// a SIGKILLed client does. Without the shield the 26.7 server aborts after a
// few dozen of these (TestClickHouseResetBug); behind it, it must survive
// every one and go on serving.
func TestClickHouseResetShield(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a server")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	crashed := make(chan *localsvc.Crash, 1)
	ch, err := localsvc.StartClickHouse(ctx, localsvc.ClickHouseOptions{OnCrash: func(c *localsvc.Crash) { crashed <- c }})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ch.Stop() })
	createResetTable(ctx, t, ch.Addr())
	resets := resetRounds(t, 60)
	hits := 0
	for i := 0; i < resets; i++ {
		hit, err := resetMidInsert(ctx, t, ch.Addr(), time.Duration(2+(i%20))*time.Millisecond)
		if err != nil {
			t.Fatalf("insert %d behind the shield: %v (crash: %v)", i+1, err, ch.Crash())
		}
		if hit {
			hits++
		}
		select {
		case c := <-crashed:
			t.Fatalf("server crashed behind the shield after %d resets: %v", i+1, c)
		default:
		}
	}
	// Give a late abort its chance to show, then check the server serves.
	time.Sleep(time.Second)
	if c := ch.Crash(); c != nil {
		t.Fatalf("server crashed behind the shield: %v", c)
	}
	conn, err := clickhouse.Open(&clickhouse.Options{Addr: []string{ch.Addr()}})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	var n uint64
	if err := conn.QueryRow(ctx, "SELECT count() FROM r.t").Scan(&n); err != nil {
		t.Fatalf("query after %d resets: %v", resets, err)
	}
	// The resets must really have hit inserts in flight for this to mean anything.
	if hits < resets/2 {
		t.Fatalf("only %d of %d resets hit an insert in flight", hits, resets)
	}
	t.Logf("server survived %d resets, %d of them mid-insert, behind the shield (%d rows from inserts that completed first)", resets, hits, n)
}

// resetRounds is OUTBOX_TEST_RESETS, or def.
func resetRounds(t *testing.T, def int) int {
	if v := os.Getenv("OUTBOX_TEST_RESETS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 {
			t.Fatalf("OUTBOX_TEST_RESETS=%q: want a positive number", v)
		}
		return n
	}
	return def
}

// TestClickHouseResetBug reproduces why the shield exists: connected
// directly, the 26.7 server dies of mid-insert resets ("Terminate called for
// uncaught exception: Code: 210. DB::NetException: Connection reset by
// peer") — in one run of 30 at the 24th, in another not within 80 — and the
// harness must report that crash at once with the log lines that explain it,
// even though the process hangs instead of exiting. Being a matter of
// chance, it runs only when asked: OUTBOX_TEST_RESET_BUG=1 (with
// OUTBOX_TEST_RESETS rounds at most, default 300).
func TestClickHouseResetBug(t *testing.T) {
	if os.Getenv("OUTBOX_TEST_RESET_BUG") != "1" {
		t.Skip("set OUTBOX_TEST_RESET_BUG=1 to reproduce the 26.7 abort on mid-insert resets")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	crashed := make(chan *localsvc.Crash, 1)
	ch, err := localsvc.StartClickHouse(ctx, localsvc.ClickHouseOptions{Direct: true, OnCrash: func(c *localsvc.Crash) { crashed <- c }})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ch.Stop() })
	createResetTable(ctx, t, ch.Addr())
	maxResets := resetRounds(t, 300)
	for i := 0; i < maxResets; i++ {
		// A server that refuses the next insert has died: the crash we wait for.
		if _, err := resetMidInsert(ctx, t, ch.Addr(), time.Duration(2+(i%20))*time.Millisecond); err != nil {
			t.Logf("insert %d: %v", i+1, err)
			break
		}
	}
	var c *localsvc.Crash
	select {
	case c = <-crashed:
	case <-time.After(10 * time.Second):
		t.Skipf("the server survived %d mid-insert resets: this build may have fixed the abort (the shield can stay, it is harmless)", maxResets)
	}
	t.Logf("crash report:\n%v", c)
	if !strings.Contains(c.Log, "<Fatal>") {
		t.Errorf("crash report quotes no <Fatal> line:\n%v", c)
	}
	if c.Status == "" || c.Pid == 0 {
		t.Errorf("crash report lacks status or pid: %+v", c)
	}
	if ch.Running() {
		t.Errorf("crashed server still running after the report")
	}
	// It can be started again on the same ports.
	if err := ch.Start(ctx); err != nil {
		t.Fatalf("start after crash: %v", err)
	}
	if ch.Crash() != nil {
		t.Errorf("Crash() = %v after a fresh start, want nil", ch.Crash())
	}
}

// TestCrashReported kills servers behind the harness's back: each must be
// reported at once with its exit status, and a stop that the harness asked
// for must not be.
func TestCrashReported(t *testing.T) {
	if testing.Short() {
		t.Skip("starts servers")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	chCrashes := make(chan *localsvc.Crash, 4)
	ch, err := localsvc.StartClickHouse(ctx, localsvc.ClickHouseOptions{OnCrash: func(c *localsvc.Crash) { chCrashes <- c }})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ch.Stop() })
	pgCrashes := make(chan *localsvc.Crash, 4)
	pg, err := localsvc.StartPostgres(ctx, localsvc.PostgresOptions{OnCrash: func(c *localsvc.Crash) { pgCrashes <- c }})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pg.Stop() })

	// Asked-for restarts and kills are no crashes.
	if err := ch.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	if err := pg.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	if err := ch.Kill(); err != nil {
		t.Fatal(err)
	}
	if err := ch.Start(ctx); err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		name    string
		pid     int
		sig     syscall.Signal
		crashes chan *localsvc.Crash
		status  string
	}{
		// On SIGABRT the chDB build's fatal-signal handler logs, and then the
		// process either exits or hangs; the harness must report both.
		{"clickhouse", ch.Pid(), syscall.SIGABRT, chCrashes, "logged a fatal error|signal: aborted"},
		{"postgres", pg.Pid(), syscall.SIGKILL, pgCrashes, "signal: killed"},
	} {
		if tc.pid == 0 {
			t.Fatalf("%s: no pid", tc.name)
		}
		if err := syscall.Kill(tc.pid, tc.sig); err != nil {
			t.Fatal(err)
		}
		select {
		case c := <-tc.crashes:
			t.Logf("%s crash report: %v", tc.name, c)
			if c.Pid != tc.pid || !hasAnyPrefix(c.Status, strings.Split(tc.status, "|")) {
				t.Errorf("%s: crash pid %d status %q, want %d %q...", tc.name, c.Pid, c.Status, tc.pid, tc.status)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("%s killed with %v: no crash reported within 10 s", tc.name, tc.sig)
		}
		if len(tc.crashes) > 0 {
			t.Errorf("%s: more than one crash reported", tc.name)
		}
	}
	if ch.Crash() == nil || pg.Crash() == nil {
		t.Errorf("Crash() after crashes: clickhouse %v, postgres %v", ch.Crash(), pg.Crash())
	}
	if !localsvc.PortFree(ch.TCPPort) {
		t.Errorf("the shield still accepts connections on %d for a crashed server", ch.TCPPort)
	}
}

func hasAnyPrefix(s string, prefixes []string) bool {
	for _, p := range prefixes {
		if strings.HasPrefix(s, p) {
			return true
		}
	}
	return false
}
