package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/url"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/fixture"
	"github.com/outbox-streamer/outbox-streamer/internal/harness/testenv"
)

// TestFailuresAndStrictProbes (issue 27): a row the streamer's validation
// refuses is dead after one attempt, not EVENT_MAX_ATTEMPTS; `failures`
// groups failed and dead rows by reason and lists them; `status` shows the
// top reasons; probes that would pass by mistake fail; the sweep's summary
// is the only thing it prints.
func TestFailuresAndStrictProbes(t *testing.T) {
	e := fixture.New(t, testenv.ModernClickHouse(t))
	env := envFor(e)
	ctx := context.Background()
	var invalid []int64
	for _, day := range []string{"2300-01-01", "2300-06-15", "2301-02-03"} {
		var id int64
		if err := e.Pool.QueryRow(ctx, `INSERT INTO event_outbox (event_type, event_date_time, status, next_attempt_at)
			VALUES ('poison', $1, 'failed', now()) RETURNING id`, day).Scan(&id); err != nil {
			t.Fatal(err)
		}
		invalid = append(invalid, id)
	}
	var waiting int64
	if err := e.Pool.QueryRow(ctx, `INSERT INTO event_outbox (event_type, event_date_time, status, attempts, next_attempt_at, last_error)
		VALUES ('order', now(), 'failed', 1, now() + interval '1 hour', 'clickhouse at 127.0.0.1:1 is unreachable') RETURNING id`).Scan(&waiting); err != nil {
		t.Fatal(err)
	}

	code, out := runCmd(t, env, "run", "--sweep")
	if code != 0 || !strings.HasPrefix(out, "sweep: ") || !strings.Contains(out, "3 became dead letters") || strings.Contains(out, "{") {
		t.Fatalf("run --sweep should print its summary line only (exit %d):\n%s", code, out)
	}
	for _, id := range invalid {
		var status string
		var attempts int
		if err := e.Pool.QueryRow(ctx, `SELECT status, attempts FROM event_outbox WHERE id = $1`, id).Scan(&status, &attempts); err != nil {
			t.Fatal(err)
		}
		if status != "dead" || attempts != 1 {
			t.Errorf("row %d with a date ClickHouse cannot hold: %s after %d attempt(s), want dead after 1", id, status, attempts)
		}
	}

	code, out = runCmd(t, env, "failures")
	t.Logf("failures:\n%s", out)
	if code != 0 {
		t.Fatalf("failures exited %d:\n%s", code, out)
	}
	if !regexp.MustCompile(`(?m)^0\s+3\s+.*invalid event: event_date_time`).MatchString(out) ||
		!regexp.MustCompile(`(?m)^1\s+0\s+.*is unreachable$`).MatchString(out) ||
		!strings.Contains(out, "1 failed, 3 dead, 2 reason(s)") ||
		!regexp.MustCompile(fmt.Sprintf(`(?m)^%d\s+order\s+failed\s+1\s+in \d+m`, waiting)).MatchString(out) ||
		!regexp.MustCompile(fmt.Sprintf(`(?m)^%d\s+poison\s+dead\s+1\s+never \(dead\)`, invalid[0])).MatchString(out) {
		t.Errorf("failures does not group the reasons or list the rows")
	}
	code, out = runCmd(t, env, "failures", "--json", "--limit", "2")
	var rep failuresReport
	if err := json.Unmarshal([]byte(out), &rep); code != 0 || err != nil || len(rep.Reasons) != 2 || len(rep.Rows) != 2 || rep.Reasons[0].Dead != 3 {
		t.Errorf("failures --json --limit 2 (exit %d, %v):\n%s", code, err, out)
	}

	code, out = runCmd(t, env, "status")
	if code != 0 || !strings.Contains(out, "3× invalid event: event_date_time") || !strings.Contains(out, "1× clickhouse at 127.0.0.1:1 is unreachable") {
		t.Errorf("status does not show the top failure reasons (exit %d):\n%s", code, out)
	}
	code, out = runCmd(t, env, "status", "--slot", "typo", "--max-lag", "1000")
	if code != 3 || !strings.Contains(out, `slot "typo" does not exist`) {
		t.Errorf("status --slot typo --max-lag 1000: exit %d, want 3:\n%s", code, out)
	}
	code, out = runCmd(t, env, "dead-letters", "requeue", "--id", "999999")
	if code != 1 || !strings.Contains(out, "requeued 0") || !strings.Contains(out, "no dead letter with id 999999") {
		t.Errorf("requeue of a missing id: exit %d, want 1:\n%s", code, out)
	}
	code, out = runCmd(t, env, "dead-letters", "requeue", "--id", fmt.Sprintf("%d,%d", invalid[0], waiting))
	if code != 1 || !strings.Contains(out, "requeued 1") || !strings.Contains(out, fmt.Sprintf("no dead letter with id %d", waiting)) {
		t.Errorf("requeue of a dead and a failed row: exit %d, want 1 naming the failed one:\n%s", code, out)
	}
}

// keywordDSN is e's DSN in libpq's keyword/value form with a password
// (which the harness's trust authentication ignores).
func keywordDSN(t *testing.T, e *fixture.Env, user string) (dsn, redacted string) {
	t.Helper()
	u, err := url.Parse(e.DSN)
	if err != nil {
		t.Fatal(err)
	}
	db := strings.TrimPrefix(u.Path, "/")
	dsn = fmt.Sprintf("host=%s port=%s user=%s dbname=%s password='pass secret' sslmode=disable", u.Hostname(), u.Port(), user, db)
	return dsn, fmt.Sprintf("postgres://%s@%s/%s", user, u.Host, db)
}

// TestOneLinePerError (issue 27): a refused ClickHouse or PostgreSQL login
// is one line naming the user and server, not "unreachable", server advice or
// a `migrate up` hint; a keyword DSN is logged with host, port, user and
// database, never its password.
func TestOneLinePerError(t *testing.T) {
	srv := testenv.ModernClickHouse(t)
	if srv.HTTPAddr == "" {
		t.Skip("no HTTP address of the modern ClickHouse")
	}
	e := fixture.New(t, srv)
	// Over HTTP: the 26.7 library server aborts on a refused native login
	// (ENVIRONMENT.md), its HTTP handler answers.
	host, port, _ := strings.Cut(srv.HTTPAddr, ":")
	wrongCH := envFor(e, "CLICKHOUSE_PROTOCOL=http", "CLICKHOUSE_HOST="+host, "CLICKHOUSE_PORT="+port, "CLICKHOUSE_USER=nobody", "CLICKHOUSE_PASSWORD=wrong")
	for _, args := range [][]string{{"verify", "--since", "1h"}, {"run", "--sweep"}} {
		code, out := runCmd(t, wrongCH, args...)
		want := fmt.Sprintf("outbox-streamer: clickhouse at %s rejected user \"nobody\": authentication failed (516); check CLICKHOUSE_USER and CLICKHOUSE_PASSWORD\n", srv.HTTPAddr)
		if code != 1 || out != want {
			t.Errorf("%v with a wrong ClickHouse user: exit %d, output:\n%s\nwant:\n%s", args, code, out, want)
		}
	}

	dsn, _ := keywordDSN(t, e, "nobody")
	code, out := runCmd(t, envFor(e, "DATABASE_URL="+dsn), "verify", "--since", "1h")
	if code != 1 || strings.Count(out, "\n") != 1 || !strings.Contains(out, `rejected user "nobody"`) || !strings.Contains(out, "(28000)") ||
		strings.Contains(out, "migrate up") || strings.Contains(out, "secret") {
		t.Errorf("verify with an unknown PostgreSQL user: exit %d, output:\n%s", code, out)
	}

	dsn, redacted := keywordDSN(t, e, "postgres")
	cmd, log := startStreamer(t, envFor(e, "DATABASE_URL="+dsn, "LOG_FORMAT=json"))
	fixture.WaitFor(t, time.Minute, "the start line", func() bool { return strings.Contains(log.String(), `"starting outbox-streamer"`) })
	_ = cmd.Process.Signal(syscall.SIGTERM)
	_ = cmd.Wait()
	if !strings.Contains(log.String(), `"postgres":"`+redacted+`"`) || strings.Contains(log.String(), "secret") {
		t.Errorf("the start line should show %s and no password:\n%s", redacted, log)
	}
}

// TestTimeZoneColumnsAgree (issue 27): with EVENT_TIME_ZONE set, the
// streamer writes updated_at in that zone as the application writes
// created_at (it wrote UTC: three hours apart for Europe/Moscow), on the
// stream's and the sweep's status updates and on requeue; `status` warns
// when created_at lies hours ahead read in EVENT_TIME_ZONE (the zone
// forgotten).
func TestTimeZoneColumnsAgree(t *testing.T) {
	e := fixture.New(t, testenv.ModernClickHouse(t))
	ctx := context.Background()
	const zone = "Europe/Moscow" // UTC+3 all year
	insert := func(n int, eventTime string) {
		t.Helper()
		if _, err := e.Pool.Exec(ctx, `INSERT INTO event_outbox (event_type, event_date_time, created_at, updated_at)
			SELECT 'tz', `+eventTime+`, now() AT TIME ZONE '`+zone+`', now() AT TIME ZONE '`+zone+`' FROM generate_series(1, $1)`, n); err != nil {
			t.Fatal(err)
		}
	}
	env := envFor(e, "EVENT_TIME_ZONE="+zone, "EVENT_RETRY_BASE_DELAY=0.05")
	cmd, _ := startStreamer(t, env)
	e.WaitStreaming(t)
	insert(50, "now()")
	insert(1, "'2300-01-01'") // invalid: dead at once, by MarkFailed
	fixture.WaitFor(t, time.Minute, "delivered", func() bool { c := e.StatusCounts(t); return c["processed"] == 50 && c["dead"] == 1 })
	_ = cmd.Process.Signal(syscall.SIGTERM)
	_ = cmd.Wait()
	var dead int64
	if err := e.Pool.QueryRow(ctx, `SELECT id FROM event_outbox WHERE status = 'dead'`).Scan(&dead); err != nil {
		t.Fatal(err)
	}
	if code, out := runCmd(t, env, "dead-letters", "requeue", "--id", fmt.Sprint(dead)); code != 0 {
		t.Fatalf("requeue: exit %d:\n%s", code, out)
	}
	// The two columns of a row are seconds apart, not three hours.
	var worst float64
	if err := e.Pool.QueryRow(ctx, `SELECT max(abs(EXTRACT(EPOCH FROM updated_at - created_at)))::float8 FROM event_outbox`).Scan(&worst); err != nil {
		t.Fatal(err)
	}
	if worst > 3600 {
		t.Errorf("updated_at and created_at of a row differ by up to %.0f s with EVENT_TIME_ZONE=%s", worst, zone)
	}
	if code, out := runCmd(t, env, "status"); code != 0 || strings.Contains(out, "in the future") {
		t.Errorf("status with the right zone (exit %d) should not warn:\n%s", code, out)
	}
	code, out := runCmd(t, envFor(e), "status", "--json")
	var st slotStatus
	if err := json.Unmarshal([]byte(out), &st); code != 0 || err != nil || st.CreatedAheadSeconds < 2*3600 || st.CreatedAheadSeconds > 4*3600 {
		t.Errorf("status --json with EVENT_TIME_ZONE forgotten should report created_at about 3 h ahead (exit %d, %v):\n%s", code, err, out)
	}
	if code, out := runCmd(t, envFor(e), "status"); code != 0 || !strings.Contains(out, "in the future read in EVENT_TIME_ZONE UTC") {
		t.Errorf("status with EVENT_TIME_ZONE forgotten does not warn (exit %d):\n%s", code, out)
	}
	if _, out := runCmd(t, envFor(e), "verify", "--since", "1h"); !strings.Contains(out, "warning: the newest row's created_at is 3h0m0s in the future") {
		t.Errorf("verify with EVENT_TIME_ZONE forgotten does not warn:\n%s", out)
	}
	if _, out := runCmd(t, env, "verify", "--since", "1h"); strings.Contains(out, "warning") || strings.Contains(out, `"level"`) {
		t.Errorf("verify with the right zone should print its report only:\n%s", out)
	}
}
