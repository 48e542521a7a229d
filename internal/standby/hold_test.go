package standby

import (
	"slices"
	"testing"
	"time"
)

func TestReached(t *testing.T) {
	for _, c := range []struct {
		flushed, target uint64
		want            bool
	}{
		{0, 1, false},
		{0x16B3748, 0x16B3749, false}, // one byte short of the commit's end
		{0x16B3749, 0x16B3749, true},  // exactly at it
		{0x1_0000_0000, 0xFFFF_FFFF, true},
	} {
		if got := reached(c.flushed, c.target); got != c.want {
			t.Errorf("reached(%X, %X) = %v, want %v", c.flushed, c.target, got, c.want)
		}
	}
}

// TestEpisodeLogsOncePerWait: a wait is logged once it lasted logAfter,
// once, again only when the standby goes missing during it, and its end only
// when its start was logged.
func TestEpisodeLogsOncePerWait(t *testing.T) {
	e := episode{logAfter: 5 * time.Second}
	t0 := time.Unix(1000, 0)
	if e.waiting(t0, false) || e.waiting(t0.Add(4*time.Second), false) {
		t.Fatal("logged before logAfter")
	}
	if logged, _, _ := e.done(t0.Add(4 * time.Second)); logged {
		t.Fatal("the end of a wait never logged was logged")
	}
	if e.waiting(t0.Add(10*time.Second), false) {
		t.Fatal("a new wait inherited the old one's start")
	}
	if !e.waiting(t0.Add(15*time.Second), false) {
		t.Fatal("a wait of logAfter not logged")
	}
	if e.waiting(t0.Add(16*time.Second), false) {
		t.Fatal("logged twice in one episode")
	}
	if !e.waiting(t0.Add(17*time.Second), true) {
		t.Fatal("the standby going missing was not logged")
	}
	if e.waiting(t0.Add(18*time.Second), true) {
		t.Fatal("missing logged twice")
	}
	logged, took, missing := e.done(t0.Add(20 * time.Second))
	if !logged || took != 10*time.Second || !missing {
		t.Fatalf("done = %v, %v, %v; want true, 10s, true", logged, took, missing)
	}
	if e.waiting(t0.Add(21*time.Second), false) {
		t.Fatal("the episode did not end")
	}
}

func TestParseStandbySlots(t *testing.T) {
	for in, want := range map[string][]string{
		"":                   nil,
		"standby1":           {"standby1"},
		" a , b,,c ":         {"a", "b", "c"},
		`"Odd,Name", plain`:  {`"Odd`, `Name"`, "plain"}, // a comma inside quotes is not supported by PostgreSQL either
		`"with ""quote"""`:   {`with "quote"`},
		`"standby_a","sb_b"`: {"standby_a", "sb_b"},
	} {
		if got := ParseStandbySlots(in); !slices.Equal(got, want) {
			t.Errorf("ParseStandbySlots(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestDescribeNamesMissingAndInactive(t *testing.T) {
	pos, lagging := describe([]namedSlot{{name: "a", exists: true, active: true, restart: "0/10"},
		{name: "b", exists: true, restart: "0/20"}, {name: "c"}})
	if !slices.Equal(lagging, []string{"b", "c"}) {
		t.Errorf("lagging = %q, want b and c", lagging)
	}
	if pos != "0/10,0/20,," {
		t.Errorf("pos = %q", pos)
	}
}
