package duration

import (
	"testing"
	"time"
)

func TestParseDays(t *testing.T) {
	for in, want := range map[string]time.Duration{
		"7d": 7 * 24 * time.Hour, "1d12h": 36 * time.Hour, "0.5d": 12 * time.Hour, "90": 90 * time.Second, "0": 0, "250ms": 250 * time.Millisecond,
	} {
		got, err := Parse(in)
		if err != nil || got != want {
			t.Errorf("Parse(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, bad := range []string{"d", "7x", "1d2", "seven days"} {
		if _, err := Parse(bad); err == nil {
			t.Errorf("Parse(%q) accepted", bad)
		}
	}
}

func TestFormat(t *testing.T) {
	for d, want := range map[time.Duration]string{0: "0", time.Minute: "1m", time.Hour: "1h", 90 * time.Minute: "1h30m",
		30 * time.Second: "30s", 100 * time.Millisecond: "100ms", 7 * 24 * time.Hour: "7d", 61 * time.Second: "1m1s"} {
		if got := Format(d); got != want {
			t.Errorf("Format(%v) = %q, want %q", d, got, want)
		}
		if back, err := Parse(want); err != nil || back != d {
			t.Errorf("Parse(%q) = %v, %v; want %v", want, back, err, d)
		}
	}
}
