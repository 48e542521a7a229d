package main

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
)

// TestVersion: `--version` (as well as the command) prints the version, and
// `version --json` prints it as JSON for scripts.
func TestVersion(t *testing.T) {
	for _, args := range [][]string{{"--version"}, {"-version"}, {"version"}} {
		var out, errOut bytes.Buffer
		if code := run(args, &out, &errOut); code != 0 || !strings.HasPrefix(out.String(), "outbox-streamer "+version) {
			t.Errorf("%v: exit %d, stdout %q, stderr %q", args, code, out.String(), errOut.String())
		}
	}
	var out, errOut bytes.Buffer
	if code := run([]string{"version", "--json"}, &out, &errOut); code != 0 {
		t.Fatalf("version --json: exit %d: %s", code, errOut.String())
	}
	var v struct {
		Version string `json:"version"`
		Go      string `json:"go"`
	}
	if err := json.Unmarshal(out.Bytes(), &v); err != nil || v.Version != version || v.Go == "" {
		t.Fatalf("version --json printed %q (%v)", out.String(), err)
	}
}

// TestUsageErrors: a mistyped flag is one line naming it and pointing at
// --help, exit 2 (it used to dump the whole usage and exit 1); --help goes to
// stdout and exits 0.
func TestUsageErrors(t *testing.T) {
	var out, errOut bytes.Buffer
	code := run([]string{"status", "--bogus"}, &out, &errOut)
	lines := strings.Split(strings.TrimSpace(errOut.String()), "\n")
	if code != 2 || len(lines) != 1 || !strings.Contains(lines[0], "-bogus") || !strings.Contains(lines[0], "status --help") {
		t.Errorf("status --bogus: exit %d, stderr:\n%s", code, errOut.String())
	}
	// Every command's usage error is exit 2, version's too (it was 1).
	for _, args := range [][]string{{"version", "--bogus"}, {"verify", "--bogus"}, {"prune", "--bogus"}} {
		out.Reset()
		errOut.Reset()
		if code := run(args, &out, &errOut); code != 2 || !strings.Contains(errOut.String(), "--help") {
			t.Errorf("%v: exit %d, stderr %q", args, code, errOut.String())
		}
	}
	out.Reset()
	errOut.Reset()
	if code := run([]string{"status", "--help"}, &out, &errOut); code != 0 || !strings.Contains(out.String(), "--max-lag") || errOut.Len() != 0 {
		t.Errorf("status --help: exit %d, stdout %d bytes, stderr %q", code, out.Len(), errOut.String())
	}
}

// TestStatusMaxAgeTakesSeconds: a bare number is seconds, as everywhere else
// ("--max-age 5" used to be refused as a usage error).
func TestStatusMaxAgeTakesSeconds(t *testing.T) {
	t.Setenv("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none?connect_timeout=1")
	var out, errOut bytes.Buffer
	if code := run([]string{"status", "--max-age", "5"}, &out, &errOut); code == 2 || strings.Contains(errOut.String(), "max-age") {
		t.Fatalf("status --max-age 5: exit %d, stderr %q", code, errOut.String())
	}
	if code := run([]string{"status", "--max-age", "soon"}, &out, &errOut); code != 2 {
		t.Fatalf("status --max-age soon: exit %d, want a usage error", code)
	}
}

// TestRequeueChecksItsArgumentsFirst: a requeue without --id or --all is a
// usage error before anything connects (it used to try PostgreSQL first).
func TestRequeueChecksItsArgumentsFirst(t *testing.T) {
	t.Setenv("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none?connect_timeout=1")
	var out, errOut bytes.Buffer
	code := run([]string{"dead-letters", "requeue"}, &out, &errOut)
	if code != 2 || !strings.Contains(errOut.String(), "--id") || strings.Contains(errOut.String(), "connect") {
		t.Fatalf("dead-letters requeue: exit %d, stderr %q", code, errOut.String())
	}
}

// TestCommandHelpListsOnlyItsSettings: `COMMAND --help` goes to stdout with a
// synopsis and the settings the command reads (healthcheck used to list all
// of them); run lists every setting.
func TestCommandHelpListsOnlyItsSettings(t *testing.T) {
	for _, tc := range []struct {
		args           []string
		want, unwanted []string
	}{
		{[]string{"healthcheck", "--help"}, []string{"Usage: outbox-streamer healthcheck", "METRICS_ADDR"}, []string{"DATABASE_URL", "EVENT_BATCH_SIZE"}},
		{[]string{"status", "--help"}, []string{"Usage: outbox-streamer status", "--max-lag", "DATABASE_URL", "REPLICATION_SLOT_NAME", "--outbox-table", "LOG_LEVEL"}, []string{"CLICKHOUSE_HOST", "EVENT_BATCH_SIZE"}},
		{[]string{"dead-letters", "--help"}, []string{"dead-letters requeue", "DATABASE_URL", "--outbox-table"}, []string{"CLICKHOUSE_HOST", "EVENT_BATCH_SIZE"}},
		{[]string{"version", "--help"}, []string{"version [--json]"}, nil},
		{[]string{"migrate", "force", "--help"}, []string{"migrate force VERSION --database", "CLICKHOUSE_HOST", "PUBLICATION_NAME", "--database"}, []string{"EVENT_BATCH_SIZE", "METRICS_ADDR"}},
		{[]string{"prune", "--help"}, []string{"--older-than", "OUTBOX_RETENTION"}, []string{"CLICKHOUSE_HOST"}},
		{[]string{"run", "--help"}, []string{"--sweep", "EVENT_BATCH_SIZE", "CLICKHOUSE_HOST", "METRICS_ADDR", "DATABASE_URL"}, []string{"accepted and ignored"}},
	} {
		var out, errOut bytes.Buffer
		if code := run(tc.args, &out, &errOut); code != 0 || errOut.Len() != 0 {
			t.Errorf("%v: exit %d, stderr %q", tc.args, code, errOut.String())
		}
		for _, w := range tc.want {
			if !strings.Contains(out.String(), w) {
				t.Errorf("%v lacks %q:\n%s", tc.args, w, out.String())
			}
		}
		for _, u := range tc.unwanted {
			if strings.Contains(out.String(), u) {
				t.Errorf("%v lists %q, which the command does not read", tc.args, u)
			}
		}
	}
}

// TestSubcommandUsageErrors: a missing or unknown action is one line and exit
// 2 for migrate and dead-letters too, before anything connects.
func TestSubcommandUsageErrors(t *testing.T) {
	t.Setenv("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none?connect_timeout=1")
	for _, args := range [][]string{{"migrate"}, {"migrate", "sideways"}, {"migrate", "force"}, {"migrate", "force", "1"},
		{"migrate", "force", "x", "--database", "postgres"}, {"migrate", "force", "1", "--database", "mysql"}, {"dead-letters"}} {
		var out, errOut bytes.Buffer
		code := run(args, &out, &errOut)
		lines := strings.Split(strings.TrimSpace(errOut.String()), "\n")
		if code != 2 || len(lines) != 1 || !strings.Contains(lines[0], "--help") || strings.Contains(errOut.String(), "connect") {
			t.Errorf("%v: exit %d, stderr %q", args, code, errOut.String())
		}
	}
}

// TestHealthcheckWithMetricsDisabled: METRICS_ADDR= turns the HTTP server
// off, so there is nothing to probe; say so instead of probing the default.
func TestHealthcheckWithMetricsDisabled(t *testing.T) {
	t.Setenv("METRICS_ADDR", "")
	var out, errOut bytes.Buffer
	if code := run([]string{"healthcheck"}, &out, &errOut); code != 1 || !strings.Contains(errOut.String(), "METRICS_ADDR is empty") {
		t.Fatalf("healthcheck with METRICS_ADDR=: exit %d, stderr %q", code, errOut.String())
	}
}
