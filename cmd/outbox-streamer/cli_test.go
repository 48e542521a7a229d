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
