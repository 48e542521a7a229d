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
