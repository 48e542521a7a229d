package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/fixture"
	"github.com/outbox-streamer/outbox-streamer/internal/harness/localsvc"
	"github.com/outbox-streamer/outbox-streamer/internal/harness/testenv"
)

func TestMain(m *testing.M) { testenv.Main(m) }

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// binary builds the real outbox-streamer once per test run.
func binary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "outbox-streamer-bin-")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "outbox-streamer")
		out, err := exec.Command("go", "build", "-o", binPath, ".").CombinedOutput()
		if err != nil {
			buildErr = err
			t.Logf("%s", out)
		}
	})
	if buildErr != nil {
		t.Fatalf("build outbox-streamer: %v", buildErr)
	}
	return binPath
}

// envFor is the environment pointing the binary at e's databases.
func envFor(e *fixture.Env, extra ...string) []string {
	host, port, _ := strings.Cut(e.Sink.Addr, ":")
	env := []string{
		"PATH=" + os.Getenv("PATH"),
		"DATABASE_URL=" + e.DSN,
		"CLICKHOUSE_HOST=" + host,
		"CLICKHOUSE_PORT=" + port,
		"CLICKHOUSE_SCHEMA=" + e.Sink.Database,
		"REPLICATION_SLOT_NAME=" + e.Slot,
		"STATUS_INTERVAL=100ms",
		"METRICS_ADDR=127.0.0.1:0",
		"EVENT_BATCH_TIMEOUT=50ms",
	}
	return append(env, extra...)
}

// runCmd runs the binary to completion and returns its exit code and output.
func runCmd(t *testing.T, env []string, args ...string) (int, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, binary(t), args...)
	cmd.Env = env
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("run %v: %v", args, err)
	}
	return code, out.String()
}

// startStreamer starts `outbox-streamer run` in the background.
func startStreamer(t *testing.T, env []string) (*exec.Cmd, *bytes.Buffer) {
	t.Helper()
	return startStreamerArgs(t, env, "run")
}

// startStreamerArgs starts the binary with args in the background.
func startStreamerArgs(t *testing.T, env []string, args ...string) (*exec.Cmd, *bytes.Buffer) {
	t.Helper()
	cmd := exec.Command(binary(t), args...)
	cmd.Env = env
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
		}
		if t.Failed() {
			lines := strings.Split(strings.TrimSpace(out.String()), "\n")
			t.Logf("the last lines of `outbox-streamer %s`:\n%s", strings.Join(args, " "), strings.Join(lines[max(0, len(lines)-40):], "\n"))
		}
	})
	return cmd, &out
}

func TestSIGTERMMidStreamThenRestartLosesNothing(t *testing.T) {
	e := fixture.New(t, testenv.ModernClickHouse(t))
	env := envFor(e)
	cmd, out := startStreamer(t, env)
	fixture.WaitFor(t, time.Minute, "slot active", func() bool { return e.ConfirmedFlush(t) > 0 })

	// A producer keeps committing while the streamer is stopped and started again.
	ctx, stopProducer := context.WithCancel(context.Background())
	produced := make(chan struct{})
	go func() {
		defer close(produced)
		for ctx.Err() == nil {
			_, _ = e.Pool.Exec(context.Background(), `INSERT INTO event_outbox (event_type, event_date_time, event_context)
				SELECT 'p', now() AT TIME ZONE 'UTC', '{}' FROM generate_series(1, 200)`)
		}
	}()
	fixture.WaitFor(t, time.Minute, "some events in ClickHouse", func() bool { c, _ := e.CHCounts(t); return c > 2000 })
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("streamer exited with %v after SIGTERM; output:\n%s", err, out)
	}
	if !strings.Contains(out.String(), "stopped streaming") {
		t.Fatalf("no orderly stop in the output:\n%s", out)
	}
	_, processedAtStop := e.Committed(t)
	startStreamer(t, env)
	fixture.WaitFor(t, time.Minute, "more events delivered after the restart", func() bool {
		_, processed := e.Committed(t)
		return processed > processedAtStop+2000
	})
	stopProducer()
	<-produced
	e.AssertExactlyDelivered(t, 2*time.Minute, e.CurrentWAL(t))
}

func TestPreconditionsFailWithOneClearLine(t *testing.T) {
	e := fixture.New(t, testenv.ModernClickHouse(t))
	ctx := context.Background()

	t.Run("publication missing", func(t *testing.T) {
		code, out := runCmd(t, envFor(e, "PUBLICATION_NAME=nope"), "run")
		wantFailure(t, code, out, `publication "nope" does not exist`, "migrate up")
	})
	t.Run("publication publishes updates", func(t *testing.T) {
		if _, err := e.Pool.Exec(ctx, "CREATE PUBLICATION too_much FOR TABLE event_outbox"); err != nil {
			t.Fatal(err)
		}
		code, out := runCmd(t, envFor(e, "PUBLICATION_NAME=too_much"), "run")
		wantFailure(t, code, out, "must publish inserts only", "ALTER PUBLICATION")
	})
	t.Run("no replication privilege", func(t *testing.T) {
		if _, err := e.Pool.Exec(ctx, "CREATE ROLE plain LOGIN"); err != nil && !strings.Contains(err.Error(), "already exists") {
			t.Fatal(err)
		}
		cfg, _ := pgx.ParseConfig(e.DSN)
		dsn := strings.Replace(e.DSN, "postgres@", "plain@", 1)
		if cfg.User != "postgres" {
			t.Skip("test server DSN does not use the postgres user")
		}
		code, out := runCmd(t, envFor(e, "DATABASE_URL="+dsn), "run")
		wantFailure(t, code, out, `role "plain" lacks the REPLICATION attribute`, "ALTER ROLE")
	})
	t.Run("slot of another database", func(t *testing.T) {
		other, err := pgx.Connect(ctx, testenv.NewDatabase(t))
		if err != nil {
			t.Fatal(err)
		}
		defer other.Close(ctx)
		if _, err := other.Exec(ctx, "SELECT pg_create_logical_replication_slot($1, 'pgoutput')", e.Slot); err != nil {
			t.Fatal(err)
		}
		defer other.Exec(ctx, "SELECT pg_drop_replication_slot($1)", e.Slot) //nolint:errcheck
		code, out := runCmd(t, envFor(e), "run")
		wantFailure(t, code, out, "belongs to database", "REPLICATION_SLOT_NAME")
		code, out = runCmd(t, envFor(e), "status")
		if !strings.Contains(out, "belongs to database") {
			t.Errorf("status (exit %d) does not say the slot is another database's:\n%s", code, out)
		}
	})
	t.Run("slot in use by another program", func(t *testing.T) {
		holdSlot(t, e)
		code, out := runCmd(t, envFor(e, "SLOT_BUSY_TIMEOUT=1s"), "run")
		wantFailure(t, code, out, "is in use by server process", "another outbox-streamer")
	})
	t.Run("bad setting", func(t *testing.T) {
		code, out := runCmd(t, envFor(e, "EVENT_BATCH_SIZE=lots"), "run")
		wantFailure(t, code, out, `invalid EVENT_BATCH_SIZE (--batch-size): "lots"`, "integer")
	})
	t.Run("password never printed", func(t *testing.T) {
		code, out := runCmd(t, envFor(e, "DATABASE_URL=postgres://u:s3cr3t-pw@127.0.0.1:1/db", "CLICKHOUSE_PASSWORD=ch-s3cr3t"), "run")
		if code == 0 {
			t.Fatal("run succeeded against an unreachable PostgreSQL")
		}
		if strings.Contains(out, "s3cr3t") {
			t.Fatalf("a password appears in the output:\n%s", out)
		}
	})
}

// holdSlot streams from e's slot with a bare replication connection, as a foreign
// program would, until the test ends.
func holdSlot(t *testing.T, e *fixture.Env) {
	t.Helper()
	ctx := context.Background()
	cfg, err := pgconn.ParseConfig(e.DSN)
	if err != nil {
		t.Fatal(err)
	}
	cfg.RuntimeParams["replication"] = "database"
	conn, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	if _, err := pglogrepl.CreateReplicationSlot(ctx, conn, e.Slot, "pgoutput", pglogrepl.CreateReplicationSlotOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := pglogrepl.StartReplication(ctx, conn, e.Slot, 0, pglogrepl.StartReplicationOptions{
		PluginArgs: []string{"proto_version '1'", "publication_names 'outbox_publication'"}}); err != nil {
		t.Fatal(err)
	}
}

// TestWALLevelNotLogicalFailsClearly runs against a server with wal_level=replica.
func TestWALLevelNotLogicalFailsClearly(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	pg, err := localsvc.StartPostgres(ctx, localsvc.PostgresOptions{Settings: map[string]string{"wal_level": "replica"}})
	if err != nil {
		t.Fatal(err)
	}
	defer pg.Stop()
	e := fixture.NewOn(t, pg.DSN(), testenv.ModernClickHouse(t))
	code, out := runCmd(t, envFor(e), "run")
	wantFailure(t, code, out, `wal_level is "replica"`, "set wal_level = logical")
}

// TestMetricsReadinessAndStatus checks what operators see from a running streamer:
// /metrics with the delivered rows and the slot lag, /readyz, and `status`.
func TestMetricsReadinessAndStatus(t *testing.T) {
	e := fixture.New(t, testenv.ModernClickHouse(t))
	_, out := startStreamer(t, envFor(e))
	var addr string
	fixture.WaitFor(t, time.Minute, "metrics address in the log", func() bool {
		m := regexp.MustCompile(`"serving /metrics[^"]*".*?"addr":"([^"]+)"`).FindStringSubmatch(out.String())
		if m != nil {
			addr = m[1]
		}
		return addr != ""
	})
	fixture.WaitFor(t, time.Minute, "readyz 200", func() bool { code, _ := httpGet(t, "http://"+addr+"/readyz"); return code == 200 })
	e.Insert(t, 1234, false)
	fixture.WaitFor(t, time.Minute, "delivered", func() bool { _, p := e.Committed(t); return p == 1234 })
	fixture.WaitFor(t, time.Minute, "metrics showing the delivered rows", func() bool {
		_, body := httpGet(t, "http://"+addr+"/metrics")
		return regexp.MustCompile(`(?m)^outbox_streamer_rows_delivered_total 1234$`).MatchString(body) &&
			strings.Contains(body, "outbox_streamer_commit_to_clickhouse_latency_seconds_bucket") &&
			strings.Contains(body, "outbox_streamer_leader 1")
	})
	code, status := runCmd(t, envFor(e), "status", "--json")
	if code != 0 || !strings.Contains(status, `"processed": 1234`) || !strings.Contains(status, `"active": true`) {
		t.Fatalf("status --json (exit %d):\n%s", code, status)
	}
	// Nothing undelivered: the age probe passes however small the limit.
	if code, out := runCmd(t, envFor(e), "status", "--max-age", "1ns"); code != 0 {
		t.Fatalf("status --max-age on an idle outbox exited %d:\n%s", code, out)
	}
	if _, err := e.Pool.Exec(context.Background(), `INSERT INTO event_outbox (event_type, event_date_time, status, next_attempt_at, created_at)
		VALUES ('old', now(), 'failed', now() + interval '1 hour', now() - interval '2 hours')`); err != nil {
		t.Fatal(err)
	}
	if code, out := runCmd(t, envFor(e), "status", "--max-age", "1h"); code != 3 || !strings.Contains(out, "over --max-age") {
		t.Fatalf("status --max-age 1h with a 2-hour-old failed row exited %d, want 3:\n%s", code, out)
	}
}

func httpGet(t *testing.T, url string) (int, string) {
	resp, err := http.Get(url)
	if err != nil {
		return 0, ""
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func wantFailure(t *testing.T, code int, out string, want ...string) {
	t.Helper()
	if code == 0 {
		t.Fatalf("exit code 0, want failure; output:\n%s", out)
	}
	for _, w := range want {
		if !strings.Contains(out, w) {
			t.Fatalf("output lacks %q:\n%s", w, out)
		}
	}
}

func TestHelpListsEverySettingWithDefault(t *testing.T) {
	code, out := runCmd(t, []string{"PATH=" + os.Getenv("PATH")}, "run", "--help")
	if code != 0 {
		t.Fatalf("run --help exited %d:\n%s", code, out)
	}
	for _, want := range []string{"EVENT_BATCH_SIZE", "1000", "EVENT_BATCH_TIMEOUT", "100ms", "CLICKHOUSE_EVENT_LOG_TABLE_NAME", "event_log",
		"DATABASE_URL", "CLICKHOUSE_SEND_RECEIVE_TIMEOUT", "REPLICATION_SLOT_NAME", "--sweep"} {
		if !strings.Contains(out, want) {
			t.Errorf("run --help lacks %q", want)
		}
	}
}

// TestSIGTERMDuringStartExitsZero stops the streamer before it streams: an orderly
// stop, exit 0.
func TestSIGTERMDuringStartExitsZero(t *testing.T) {
	e := fixture.New(t, testenv.ModernClickHouse(t))
	e.Insert(t, 20000, false) // a backfill to work on while starting
	cmd, out := startStreamer(t, envFor(e))
	fixture.WaitFor(t, time.Minute, "start-up under way", func() bool { return strings.Contains(out.String(), "starting outbox-streamer") })
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("exit %v after SIGTERM during start-up:\n%s", err, out)
	}
}

// TestMigrateStatusJSON: `migrate status --json` is one JSON array a script
// can read, a state per database.
func TestMigrateStatusJSON(t *testing.T) {
	e := fixture.New(t, testenv.ModernClickHouse(t))
	code, out := runCmd(t, envFor(e), "migrate", "status", "--json")
	if code != 0 {
		t.Fatalf("migrate status --json exited %d:\n%s", code, out)
	}
	var st []struct {
		Database string `json:"database"`
		Version  uint   `json:"version"`
		Latest   uint   `json:"latest"`
		State    string `json:"state"`
	}
	line := out[strings.LastIndex(strings.TrimSpace(out), "\n")+1:]
	if err := json.Unmarshal([]byte(line), &st); err != nil {
		t.Fatalf("not JSON: %v\n%s", err, out)
	}
	if len(st) != 2 || st[0].Database != "postgres" || st[1].Database != "clickhouse" {
		t.Fatalf("migrate status --json: %+v", st)
	}
	for _, s := range st {
		if s.State != "up to date" || s.Version != s.Latest || s.Version == 0 {
			t.Errorf("%s: %+v, want up to date", s.Database, s)
		}
	}
}

// TestSecondOutboxWithOutboxTable (docs/many-outboxes.md): a second instance
// with its own OUTBOX_TABLE, publication, slot and event table migrates its
// outbox beside the first one's, streams it, and its status and dead-letters
// report its table, not event_outbox.
func TestSecondOutboxWithOutboxTable(t *testing.T) {
	e := fixture.New(t, testenv.ModernClickHouse(t))
	ctx := context.Background()
	e.Insert(t, 3, false) // the first outbox's rows: never counted below
	env := envFor(e, "OUTBOX_TABLE=billing.event_outbox", "PUBLICATION_NAME=billing_publication",
		"CLICKHOUSE_EVENT_LOG_TABLE_NAME=billing_log")
	for i, kv := range env {
		if strings.HasPrefix(kv, "REPLICATION_SLOT_NAME=") {
			env[i] = "REPLICATION_SLOT_NAME=" + e.Slot + "_billing"
		}
	}
	code, out := runCmd(t, env, "migrate", "up")
	if code != 0 || !strings.Contains(out, "billing.event_outbox: not partitioned") {
		t.Fatalf("migrate up with OUTBOX_TABLE exited %d:\n%s", code, out)
	}
	code, out = runCmd(t, env, "migrate", "status")
	if code != 0 || strings.Count(out, "up to date") != 2 {
		t.Fatalf("migrate status with OUTBOX_TABLE exited %d:\n%s", code, out)
	}
	if _, err := e.Pool.Exec(ctx, `INSERT INTO billing.event_outbox (event_type, event_date_time, status, attempts, last_error)
		VALUES ('billing.dead', now(), 'dead', 10, 'gave up')`); err != nil {
		t.Fatal(err)
	}
	if _, err := e.Pool.Exec(ctx, `INSERT INTO billing.event_outbox (event_type, event_date_time)
		SELECT 'billing.paid', now() AT TIME ZONE 'UTC' FROM generate_series(1, 5)`); err != nil {
		t.Fatal(err)
	}
	startStreamer(t, env)
	fixture.WaitFor(t, time.Minute, "the billing rows delivered", func() bool {
		var n int
		_ = e.Pool.QueryRow(ctx, `SELECT count(*) FROM billing.event_outbox WHERE status = 'processed'`).Scan(&n)
		return n == 5
	})
	var inCH uint64
	if err := e.CHConn.QueryRow(ctx, "SELECT count() FROM "+e.Sink.Database+".billing_log").Scan(&inCH); err != nil || inCH != 5 {
		t.Fatalf("billing_log holds %d rows (%v), want 5", inCH, err)
	}
	if c, _ := e.CHCounts(t); c != 0 {
		t.Fatalf("event_log holds %d rows: the billing instance delivered into the first outbox's table", c)
	}
	code, out = runCmd(t, env, "status", "--json")
	if code != 0 || !strings.Contains(out, `"processed": 5`) || !strings.Contains(out, `"dead": 1`) || !strings.Contains(out, `"pending": 0`) {
		t.Fatalf("status --json with OUTBOX_TABLE (exit %d):\n%s", code, out)
	}
	code, out = runCmd(t, env, "dead-letters", "list")
	if code != 0 || !strings.Contains(out, "billing.dead") || !strings.Contains(out, "1 dead letter(s) shown") {
		t.Fatalf("dead-letters list with OUTBOX_TABLE (exit %d):\n%s", code, out)
	}
	code, out = runCmd(t, append(envFor(e), "OUTBOX_TABLE=Billing.Outbox"), "status")
	wantFailure(t, code, out, "invalid OUTBOX_TABLE (--outbox-table)")
}
