package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"strings"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/outbox-streamer/outbox-streamer/internal/config"
)

// TestUniqueKeys: a key given by the root logger and again by a package's
// named logger or a call appears once per line (slot used to appear twice on
// every line of run).
func TestUniqueKeys(t *testing.T) {
	var buf bytes.Buffer
	core := uniqueKeys(zapcore.NewCore(newEncoder("json", false), zapcore.AddSync(&buf), zapcore.DebugLevel))
	log := zap.New(core).With(zap.String("slot", "s1"))
	pkg := log.Named("replication").With(zap.String("slot", "s1"), zap.String("publication", "p"))
	pkg.Info("one", zap.String("slot", "s1"), zap.Int("rows", 3), zap.Int("rows", 4))
	pkg.With(zap.Namespace("batch"), zap.Int("rows", 1)).Info("nested", zap.Int("rows", 2))
	log.Info("root")
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if len(lines) != 3 {
		t.Fatalf("want 3 lines, got:\n%s", buf.String())
	}
	for _, line := range lines {
		if dup := duplicateKeys(t, line); len(dup) > 0 {
			t.Errorf("keys %v twice in %s", dup, line)
		}
	}
	if !strings.Contains(lines[0], `"rows":3`) || !strings.Contains(lines[0], `"publication":"p"`) {
		t.Errorf("first value of a key should win and others stay: %s", lines[0])
	}
	// Keys inside a namespace are not the top level's.
	if !strings.Contains(lines[1], `"batch":{"rows":1,"rows":2}`) && !strings.Contains(lines[1], `"batch":{"rows":1`) {
		t.Errorf("namespace lost: %s", lines[1])
	}
}

// duplicateKeys lists the top-level keys a JSON object holds more than once.
func duplicateKeys(t *testing.T, line string) []string {
	t.Helper()
	dec := json.NewDecoder(strings.NewReader(line))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		t.Fatalf("not a JSON object: %q", line)
	}
	seen := map[string]bool{}
	var dup []string
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			t.Fatalf("%q: %v", line, err)
		}
		key := fmt.Sprint(tok)
		if seen[key] {
			dup = append(dup, key)
		}
		seen[key] = true
		var skip json.RawMessage
		if err := dec.Decode(&skip); err != nil {
			t.Fatalf("%q: %v", line, err)
		}
	}
	return dup
}

// TestLogFormatAndLevel: LOG_FORMAT picks the encoder (auto follows the
// terminal), LOG_LEVEL the level, DEBUG forces debug, and commands that
// print for a person log errors only unless a level was asked for.
func TestLogFormatAndLevel(t *testing.T) {
	for _, tc := range []struct {
		format string
		tty    bool
		json   bool
	}{{"auto", true, false}, {"auto", false, true}, {"console", false, false}, {"json", true, true}} {
		var buf bytes.Buffer
		zap.New(zapcore.NewCore(newEncoder(tc.format, tc.tty), zapcore.AddSync(&buf), zapcore.InfoLevel)).Info("hello", zap.String("slot", "s"))
		if got := strings.HasPrefix(buf.String(), "{"); got != tc.json {
			t.Errorf("LOG_FORMAT=%s on a terminal=%v: %q", tc.format, tc.tty, buf.String())
		}
	}
	load := func(env map[string]string) *config.Config {
		t.Helper()
		fs := newFlagSet()
		cfg, _, err := config.Load(fs, nil, func(k string) (string, bool) { v, ok := env[k]; return v, ok })
		if err != nil {
			t.Fatal(err)
		}
		return cfg
	}
	for _, tc := range []struct {
		env  map[string]string
		who  logFor
		want zapcore.Level
	}{
		{nil, forService, zapcore.InfoLevel},
		{nil, forPerson, zapcore.ErrorLevel},
		{map[string]string{"LOG_LEVEL": "error"}, forService, zapcore.ErrorLevel},
		{map[string]string{"LOG_LEVEL": "info"}, forPerson, zapcore.InfoLevel},
		{map[string]string{"LOG_LEVEL": "warning"}, forService, zapcore.WarnLevel},
		{map[string]string{"DEBUG": "true", "LOG_LEVEL": "error"}, forService, zapcore.DebugLevel},
		{map[string]string{"DEBUG": "1"}, forPerson, zapcore.DebugLevel},
	} {
		if got := logLevel(load(tc.env), tc.who); got != tc.want {
			t.Errorf("%v for %d: level %s, want %s", tc.env, tc.who, got, tc.want)
		}
	}
	fs := newFlagSet()
	if _, _, err := config.Load(fs, []string{"--log-format", "xml"}, func(string) (string, bool) { return "", false }); err == nil || !strings.Contains(err.Error(), "LOG_FORMAT") {
		t.Errorf("LOG_FORMAT=xml: %v", err)
	}
}

func newFlagSet() *flag.FlagSet { return flag.NewFlagSet("t", flag.ContinueOnError) }
