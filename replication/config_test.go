package replication

import (
	"strings"
	"testing"
)

// TestDefaultSpillDir: one slot name on two servers, or in two databases of
// one, gets two spill directories (each streamer empties its own at start);
// the same server and database keep theirs whatever the password.
func TestDefaultSpillDir(t *testing.T) {
	base := DefaultSpillDir("postgres://u:one@db1:5432/app", "outbox_streamer")
	for _, tc := range []struct {
		name, dsn string
		same      bool
	}{
		{"other password", "postgres://u:two@db1:5432/app", true},
		{"other server", "postgres://u:one@db2:5432/app", false},
		{"other port", "postgres://u:one@db1:5433/app", false},
		{"other database", "postgres://u:one@db1:5432/app2", false},
		{"added standby host", "postgres://u:one@db1:5432,db2:5432/app", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := DefaultSpillDir(tc.dsn, "outbox_streamer")
			if (got == base) != tc.same {
				t.Errorf("%s vs %s: same directory = %v, want %v", got, base, got == base, tc.same)
			}
		})
	}
	if !strings.Contains(base, "outbox-streamer-spill-outbox_streamer-") || strings.Contains(base, "one") {
		t.Errorf("spill dir %q: want the slot in the name and no password", base)
	}
	cfg := Config{DSN: "postgres://u:one@db1:5432/app"}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	if cfg.SpillDir != base {
		t.Errorf("Validate's default spill dir %q, want %q", cfg.SpillDir, base)
	}
}

// TestConnConfig checks the session settings the decoder depends on, which the
// streamer and the bench's slot reader both connect with, and that a DSN that
// does not parse is not echoed with its password.
func TestConnConfig(t *testing.T) {
	cfg, err := ConnConfig("postgres://u:secret@127.0.0.1:5432/db?TimeZone=Europe/Berlin")
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"replication": "database", "DateStyle": "ISO, YMD", "TimeZone": "UTC",
		"extra_float_digits": "3", "application_name": "outbox-streamer"}
	for k, v := range want {
		if got := cfg.RuntimeParams[k]; got != v {
			t.Errorf("%s = %q, want %q", k, got, v)
		}
	}
	if _, err := ConnConfig("postgres://u:secret@127.0.0.1:notaport/db"); err == nil || strings.Contains(err.Error(), "secret") {
		t.Errorf("bad DSN: error %v, want one without the password", err)
	}
}
