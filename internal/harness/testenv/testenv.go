// Package testenv gives integration tests a PostgreSQL server and ClickHouse
// servers: the ones named by environment variables (as set by outbox-devenv
// or by a user with servers of their own), or else local processes started
// lazily, once per test binary, with package localsvc.
//
// A test binary that uses it must have
//
//	func TestMain(m *testing.M) { testenv.Main(m) }
//
// which also lets the binary act as the launcher of the modern ClickHouse.
//
// Servers are shared by all tests of a binary; tests get isolation from
// fresh databases (NewDatabase, NewCHDatabase). Chaos tests that stop or
// restart a server should use a private one (PrivatePostgres,
// PrivateClickHouse) or make sure no other test runs in parallel.
package testenv

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/url"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/localsvc"
)

// Environment variables naming servers to use instead of starting local ones.
const (
	// EnvPGDSN is a superuser DSN of a PostgreSQL with wal_level=logical.
	EnvPGDSN = "OUTBOX_TEST_PG_DSN"
	// EnvCHAddr is host:port (native protocol) of a modern ClickHouse.
	EnvCHAddr = "OUTBOX_TEST_CH_ADDR"
	// EnvCHHTTPAddr is host:port of the same server's HTTP interface.
	EnvCHHTTPAddr = "OUTBOX_TEST_CH_HTTP_ADDR"
	// EnvCHLegacyAddr is host:port (native protocol) of a legacy ClickHouse.
	EnvCHLegacyAddr = "OUTBOX_TEST_CH_LEGACY_ADDR"
	// EnvRequireLegacy, set to "1", makes a missing legacy ClickHouse a
	// test failure instead of a skip.
	EnvRequireLegacy = "OUTBOX_TEST_REQUIRE_LEGACY"
	// EnvModernOnly, set to "1", makes ClickHouseServers return the modern
	// server alone: for runs that vary something else (the PostgreSQL major
	// of make test-pg-compat), where the legacy server only doubles the time.
	EnvModernOnly = "OUTBOX_TEST_CH_MODERN_ONLY"
	// EnvNoResetShield, set to "1", connects tests straight to the modern
	// ClickHouse's native port, without the reset shield of localsvc: to
	// reproduce the server's abort on mid-query resets.
	EnvNoResetShield = "OUTBOX_TEST_NO_RESET_SHIELD"
	// EnvCrashFile names a file where outbox-devenv appends a report for
	// each of its servers that crashes (see Crashes).
	EnvCrashFile = "OUTBOX_TEST_CRASH_FILE"
)

// startTimeout bounds starting one shared service. It is generous because
// the first modern ClickHouse on a machine may download the chDB library.
const startTimeout = 10 * time.Minute

// CHServer is a ClickHouse server tests can use.
type CHServer struct {
	// Name is "modern" or "legacy"; handy as a subtest name.
	Name string
	// Addr is host:port of the native protocol.
	Addr string
	// HTTPAddr is host:port of the HTTP interface, or "" when unknown.
	HTTPAddr string
	// Legacy is true for ClickHouse 18.16, which lacks many modern features.
	Legacy bool
}

// Options returns clickhouse-go options for database db on the server
// (user default, no password, native protocol).
func (s CHServer) Options(db string) *clickhouse.Options {
	return &clickhouse.Options{
		Addr:        []string{s.Addr},
		Protocol:    clickhouse.Native,
		Auth:        clickhouse.Auth{Database: db, Username: "default"},
		DialTimeout: 10 * time.Second,
	}
}

// service is one lazily started shared server.
type service[T any] struct {
	once   sync.Once
	handle T
	err    error
}

var (
	pgSvc     service[*localsvc.Postgres]
	modernSvc service[*localsvc.ClickHouse]
	legacySvc service[*localsvc.ClickHouse]

	// stopMu guards stops, the shutdown functions of everything this binary
	// started (shared and private servers).
	stopMu sync.Mutex
	stops  []func() error

	// crashMu guards crashes: every crash of a shared server this binary
	// started, and crashes of private servers while their test runs.
	crashMu sync.Mutex
	crashes []crashRecord
)

type crashRecord struct {
	crash *localsvc.Crash
	owner testing.TB // the test of a private server; nil for shared ones
}

// recordCrash remembers a crash of a shared server this binary started.
func recordCrash(c *localsvc.Crash) {
	crashMu.Lock()
	defer crashMu.Unlock()
	crashes = append(crashes, crashRecord{crash: c})
}

// Crashes returns every crash of a test server seen so far — of the
// servers this binary started and, under outbox-devenv, of the servers it
// started — or nil. Tests that wait for something check it so that a dead
// server fails them at once, with its exit status and logs, instead of
// after a timeout with "connection refused".
func Crashes() error {
	crashMu.Lock()
	var errs []error
	for _, r := range crashes {
		errs = append(errs, r.crash)
	}
	crashMu.Unlock()
	if path := os.Getenv(EnvCrashFile); path != "" {
		if data, err := os.ReadFile(path); err == nil && len(strings.TrimSpace(string(data))) > 0 {
			errs = append(errs, fmt.Errorf("outbox-devenv reports:\n%s", data))
		}
	}
	return errors.Join(errs...)
}

// CrashNote is "" when no server crashed, else a paragraph quoting
// Crashes, for appending to failure messages.
func CrashNote() string {
	if err := Crashes(); err != nil {
		return "\n--- a test server crashed ---\n" + err.Error()
	}
	return ""
}

// reportCrashesTo makes crashes of t's private server fail t at once and
// show in Crashes while t runs. Reports stop when t ends.
func reportCrashesTo(t testing.TB) func(*localsvc.Crash) {
	var (
		mu   sync.Mutex
		done bool
	)
	t.Cleanup(func() {
		mu.Lock()
		done = true
		mu.Unlock()
		crashMu.Lock()
		defer crashMu.Unlock()
		kept := crashes[:0]
		for _, r := range crashes {
			if r.owner != t {
				kept = append(kept, r)
			}
		}
		crashes = kept
	})
	return func(c *localsvc.Crash) {
		mu.Lock()
		defer mu.Unlock()
		if done {
			return
		}
		crashMu.Lock()
		crashes = append(crashes, crashRecord{crash: c, owner: t})
		crashMu.Unlock()
		t.Errorf("testenv: %v", c)
	}
}

// Main runs the tests of a test binary: it must be called from TestMain.
// It turns the binary into the modern ClickHouse launcher when asked to,
// runs the tests, stops every server the binary started and exits with the
// tests' code.
func Main(m *testing.M) {
	localsvc.RunCHDBLauncherIfRequested()
	code := m.Run()
	// os.Exit skips deferred calls: stop explicitly.
	if err := stopAll(); err != nil {
		fmt.Fprintf(os.Stderr, "testenv: stopping servers: %v\n", err)
	}
	os.Exit(code)
}

// registerStop records a shutdown function for Main.
func registerStop(f func() error) {
	stopMu.Lock()
	defer stopMu.Unlock()
	stops = append(stops, f)
}

// stopAll stops everything registered, newest first.
func stopAll() error {
	stopMu.Lock()
	defer stopMu.Unlock()
	var errs []error
	for i := len(stops) - 1; i >= 0; i-- {
		errs = append(errs, stops[i]())
	}
	stops = nil
	return errors.Join(errs...)
}

// Postgres returns a superuser DSN of a PostgreSQL server with
// wal_level=logical: OUTBOX_TEST_PG_DSN if set, else a local server started
// once for this test binary. A server that cannot start fails the test.
func Postgres(t testing.TB) string {
	t.Helper()
	if dsn := os.Getenv(EnvPGDSN); dsn != "" {
		return dsn
	}
	pg := startShared(t, &pgSvc, "PostgreSQL", func(ctx context.Context) (*localsvc.Postgres, error) {
		opts := localsvc.PostgresOptions{OnCrash: recordCrash}
		if err := opts.AgeFromEnv(); err != nil {
			return nil, err
		}
		return localsvc.StartPostgres(ctx, opts)
	})
	return pg.DSN()
}

// PostgresHandle returns the PostgreSQL server this binary started (starting
// it if needed), for tests that stop, restart or kill it; nil when the
// server comes from OUTBOX_TEST_PG_DSN.
func PostgresHandle(t testing.TB) *localsvc.Postgres {
	t.Helper()
	if os.Getenv(EnvPGDSN) != "" {
		return nil
	}
	Postgres(t)
	return pgSvc.handle
}

// PrivatePostgres starts a PostgreSQL server for this test alone and stops
// it when the test ends: for chaos tests that must not disturb other tests.
func PrivatePostgres(t testing.TB) *localsvc.Postgres {
	t.Helper()
	opts := localsvc.PostgresOptions{}
	if err := opts.AgeFromEnv(); err != nil {
		t.Fatalf("testenv: %v", err)
	}
	return PrivatePostgresWith(t, opts)
}

// PrivatePostgresWith is PrivatePostgres with options, e.g. an old cluster
// (XIDEpoch, NextXID) whatever the environment asks for.
func PrivatePostgresWith(t testing.TB, opts localsvc.PostgresOptions) *localsvc.Postgres {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	opts.OnCrash = reportCrashesTo(t)
	pg, err := localsvc.StartPostgres(ctx, opts)
	if err != nil {
		t.Fatalf("testenv: start private PostgreSQL: %v", err)
	}
	registerStop(pg.Stop)
	t.Cleanup(func() { _ = pg.Stop() })
	return pg
}

// NewDatabase creates a fresh database t_<random hex> on the server from
// Postgres and returns its superuser DSN. When the test ends, the database's
// replication slots are dropped (their walsenders terminated first), its
// other connections are terminated and it is dropped.
func NewDatabase(t testing.TB) string {
	t.Helper()
	return NewDatabaseOn(t, Postgres(t))
}

// NewDatabaseOn is NewDatabase on the server with superuser DSN serverDSN,
// for example a PrivatePostgres's DSN().
func NewDatabaseOn(t testing.TB, serverDSN string) string {
	t.Helper()
	name := "t_" + randomHex(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, serverDSN)
	if err != nil {
		t.Fatalf("testenv: connect to PostgreSQL: %v", err)
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{name}.Sanitize()); err != nil {
		t.Fatalf("testenv: create database %s: %v", name, err)
	}
	t.Cleanup(func() {
		if err := dropDatabase(serverDSN, name); err != nil {
			// A chaos test may leave the server down; a leftover database
			// on a test server is harmless, so only report it.
			t.Logf("testenv: cleanup of database %s: %v", name, err)
		}
	})
	dsn, err := withDatabase(serverDSN, name)
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	return dsn
}

// dropDatabase drops the replication slots of database name, terminates its
// connections and drops it.
func dropDatabase(serverDSN, name string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, serverDSN)
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	defer conn.Close(context.Background())

	// A slot can only be dropped once its walsender has gone, which happens
	// shortly after pg_terminate_backend: retry for a bounded time.
	deadline := time.Now().Add(15 * time.Second)
	for {
		rows, err := conn.Query(ctx, "SELECT slot_name, active_pid FROM pg_replication_slots WHERE database = $1", name)
		if err != nil {
			return fmt.Errorf("list replication slots: %w", err)
		}
		type slot struct {
			name string
			pid  *int32
		}
		var slots []slot
		for rows.Next() {
			var s slot
			if err := rows.Scan(&s.name, &s.pid); err != nil {
				rows.Close()
				return fmt.Errorf("list replication slots: %w", err)
			}
			slots = append(slots, s)
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return fmt.Errorf("list replication slots: %w", err)
		}
		if len(slots) == 0 {
			break
		}
		var lastErr error
		for _, s := range slots {
			if s.pid != nil {
				if _, err := conn.Exec(ctx, "SELECT pg_terminate_backend($1)", *s.pid); err != nil {
					lastErr = fmt.Errorf("terminate walsender of slot %s: %w", s.name, err)
				}
				continue
			}
			if _, err := conn.Exec(ctx, "SELECT pg_drop_replication_slot($1)", s.name); err != nil {
				lastErr = fmt.Errorf("drop replication slot %s: %w", s.name, err)
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("replication slots still present: %w", lastErr)
		}
		time.Sleep(50 * time.Millisecond) // bounded poll while walsenders exit
	}

	if _, err := conn.Exec(ctx, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()", name); err != nil {
		return fmt.Errorf("terminate connections: %w", err)
	}
	ident := pgx.Identifier{name}.Sanitize()
	// WITH (FORCE) (PostgreSQL 13+) also covers a connection opened after
	// the terminate above; older servers do not know it.
	_, err = conn.Exec(ctx, "DROP DATABASE IF EXISTS "+ident+" WITH (FORCE)")
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "42601" {
		_, err = conn.Exec(ctx, "DROP DATABASE IF EXISTS "+ident)
	}
	if err != nil {
		return fmt.Errorf("drop database: %w", err)
	}
	return nil
}

// withDatabase returns dsn with its database replaced by db. It accepts URL
// DSNs and keyword/value DSNs.
func withDatabase(dsn, db string) (string, error) {
	if strings.Contains(dsn, "://") {
		u, err := url.Parse(dsn)
		if err != nil {
			return "", fmt.Errorf("parse DSN: %w", err)
		}
		u.Path = "/" + db
		u.RawPath = ""
		return u.String(), nil
	}
	// In keyword/value form the last occurrence of a keyword wins.
	return dsn + " dbname=" + db, nil
}

// ModernClickHouse returns a modern ClickHouse (26.x): OUTBOX_TEST_CH_ADDR
// if set, else a local chDB-based server started once for this test binary.
func ModernClickHouse(t testing.TB) CHServer {
	t.Helper()
	if addr := os.Getenv(EnvCHAddr); addr != "" {
		return CHServer{Name: "modern", Addr: addr, HTTPAddr: os.Getenv(EnvCHHTTPAddr)}
	}
	ch := startShared(t, &modernSvc, "modern ClickHouse", func(ctx context.Context) (*localsvc.ClickHouse, error) {
		return localsvc.StartClickHouse(ctx, localsvc.ClickHouseOptions{OnCrash: recordCrash, Direct: noShield()})
	})
	return CHServer{Name: "modern", Addr: ch.Addr(), HTTPAddr: ch.HTTPAddr()}
}

// legacyClickHouse returns the legacy server, an error wrapping
// localsvc.ErrNotInstalled when it is not installed, or fails the test when
// it is installed but does not start.
func legacyClickHouse(t testing.TB) (CHServer, error) {
	t.Helper()
	if addr := os.Getenv(EnvCHLegacyAddr); addr != "" {
		return CHServer{Name: "legacy", Addr: addr, Legacy: true}, nil
	}
	if _, err := localsvc.FindClickHouseLegacy(""); err != nil {
		return CHServer{}, err
	}
	ch := startShared(t, &legacySvc, "legacy ClickHouse", func(ctx context.Context) (*localsvc.ClickHouse, error) {
		return localsvc.StartClickHouseLegacy(ctx, localsvc.ClickHouseOptions{OnCrash: recordCrash})
	})
	return CHServer{Name: "legacy", Addr: ch.Addr(), HTTPAddr: ch.HTTPAddr(), Legacy: true}, nil
}

// ClickHouseServers returns every ClickHouse to run a test against: the
// modern one and, when available, the legacy one. A missing legacy server is
// logged and left out, or fails the test if OUTBOX_TEST_REQUIRE_LEGACY=1.
func ClickHouseServers(t testing.TB) []CHServer {
	t.Helper()
	servers := []CHServer{ModernClickHouse(t)}
	if os.Getenv(EnvModernOnly) == "1" {
		return servers
	}
	legacy, err := legacyClickHouse(t)
	switch {
	case err == nil:
		servers = append(servers, legacy)
	case os.Getenv(EnvRequireLegacy) == "1":
		t.Fatalf("testenv: legacy ClickHouse required (%s=1): %v", EnvRequireLegacy, err)
	default:
		t.Logf("testenv: legacy ClickHouse not available, testing the modern one only: %v", err)
	}
	return servers
}

// ClickHouseHandle returns the server behind srv when this binary started
// it, for tests that stop, restart or kill it; nil for servers named by
// environment variables.
func ClickHouseHandle(t testing.TB, srv CHServer) *localsvc.ClickHouse {
	t.Helper()
	svc := &modernSvc
	if srv.Legacy {
		svc = &legacySvc
	}
	if h := svc.handle; h != nil && h.Addr() == srv.Addr {
		return h
	}
	return nil
}

// PrivateClickHouse starts a ClickHouse server (legacy or modern) for this
// test alone and stops it when the test ends: for chaos tests that must not
// disturb other tests. A missing legacy server skips the test unless
// OUTBOX_TEST_REQUIRE_LEGACY=1.
func PrivateClickHouse(t testing.TB, legacy bool) *localsvc.ClickHouse {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	var (
		ch  *localsvc.ClickHouse
		err error
	)
	opts := localsvc.ClickHouseOptions{OnCrash: reportCrashesTo(t), Direct: noShield()}
	if legacy {
		ch, err = localsvc.StartClickHouseLegacy(ctx, opts)
		if errors.Is(err, localsvc.ErrNotInstalled) && os.Getenv(EnvRequireLegacy) != "1" {
			t.Skipf("testenv: %v", err)
		}
	} else {
		ch, err = localsvc.StartClickHouse(ctx, opts)
	}
	if err != nil {
		t.Fatalf("testenv: start private ClickHouse: %v", err)
	}
	registerStop(ch.Stop)
	t.Cleanup(func() { _ = ch.Stop() })
	return ch
}

// noShield reports whether EnvNoResetShield asks for direct connections.
func noShield() bool { return os.Getenv(EnvNoResetShield) == "1" }

// CHServerOf describes a ClickHouse started with PrivateClickHouse.
func CHServerOf(ch *localsvc.ClickHouse) CHServer {
	name := "modern"
	if ch.Legacy {
		name = "legacy"
	}
	return CHServer{Name: name, Addr: ch.Addr(), HTTPAddr: ch.HTTPAddr(), Legacy: ch.Legacy}
}

// NewCHDatabase creates a fresh database t_<random hex> on srv (with the
// server's default engine: Atomic on 26.x, Ordinary on 18.16) and drops it
// when the test ends. It returns the database name.
func NewCHDatabase(t testing.TB, srv CHServer) string {
	t.Helper()
	name := "t_" + randomHex(t)
	if err := chExec(srv, "CREATE DATABASE "+name); err != nil {
		t.Fatalf("testenv: create ClickHouse database on %s: %v", srv.Name, err)
	}
	t.Cleanup(func() {
		if err := chExec(srv, "DROP DATABASE IF EXISTS "+name); err != nil {
			t.Logf("testenv: cleanup of ClickHouse database %s on %s: %v", name, srv.Name, err)
		}
	})
	return name
}

// chExec runs one statement on srv over a short-lived native connection.
func chExec(srv CHServer, query string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := clickhouse.Open(srv.Options("default"))
	if err != nil {
		return fmt.Errorf("open %s: %w", srv.Addr, err)
	}
	defer conn.Close()
	if err := conn.Exec(ctx, query); err != nil {
		return fmt.Errorf("%s: %w", query, err)
	}
	return nil
}

// startShared starts a shared service once per binary and registers its
// shutdown with Main. A start failure is remembered and fails every test
// asking for the service, without retrying each time.
func startShared[T interface{ Stop() error }](t testing.TB, svc *service[T], what string, start func(context.Context) (T, error)) T {
	t.Helper()
	var took time.Duration
	svc.once.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
		defer cancel()
		began := time.Now()
		svc.handle, svc.err = start(ctx)
		took = time.Since(began)
		if svc.err == nil {
			registerStop(svc.handle.Stop)
		}
	})
	if svc.err != nil {
		t.Fatalf("testenv: start %s: %v", what, svc.err)
	}
	if took > 0 {
		t.Logf("testenv: started %s in %v", what, took.Round(time.Millisecond))
	}
	return svc.handle
}

// randomHex returns 12 random hex digits for unique names.
func randomHex(t testing.TB) string {
	var b [6]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatalf("testenv: random name: %v", err)
	}
	return hex.EncodeToString(b[:])
}
