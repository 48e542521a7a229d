package verify

import (
	"math"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/outbox-streamer/outbox-streamer/internal/outboxstore"
	"github.com/outbox-streamer/outbox-streamer/sink"
)

// TestMix pins the checksum's arithmetic: values computed by PostgreSQL 15
// and ClickHouse 18.16 and 26.7 by hand (docs/verify.md's SQL).
func TestMix(t *testing.T) {
	for _, c := range []struct {
		id   int64
		want uint64
	}{
		{1, 1597334677},
		{4294967296, 1}, // 2^32: only the high part
		{123456789012345, 3592495332592436661 % 4294967291}, // the SQL's value before "% 4294967291"
		{math.MaxInt64, ((math.MaxUint32*1597334677 + math.MaxInt32) % 4294967291)},
	} {
		if got := Mix(c.id); got != c.want {
			t.Errorf("Mix(%d) = %d, want %d", c.id, got, c.want)
		}
	}
	// The sums wrap modulo 2^64 like ClickHouse's UInt64 sum.
	var c Checksum
	c.Add(math.MaxInt64)
	c.Add(math.MaxInt64)
	c.Add(3)
	if c.Count != 3 || c.Sum != 1 {
		t.Errorf("checksum of MaxInt64, MaxInt64, 3 = %+v, want count 3 and sum 1 (mod 2^64)", c)
	}
	// A duplicate changes it; order does not.
	var a, b, d Checksum
	for _, id := range []int64{5, 7, 9} {
		a.Add(id)
	}
	for _, id := range []int64{9, 5, 7} {
		b.Add(id)
	}
	for _, id := range []int64{5, 7, 9, 9} {
		d.Add(id)
	}
	if a != b || a == d {
		t.Errorf("checksums: %+v %+v %+v", a, b, d)
	}
}

func TestAlign(t *testing.T) {
	ts := func(s string) time.Time {
		t.Helper()
		v, err := time.Parse(time.RFC3339, s)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	for _, c := range []struct {
		from, until string
		bucket      time.Duration
		want        [2]string
		n           int64
		err         string
	}{
		{"2026-01-31T23:10:00Z", "2026-02-01T01:00:00Z", time.Hour, [2]string{"2026-01-31T23:00:00Z", "2026-02-01T01:00:00Z"}, 2, ""},
		{"2026-01-31T23:10:00+01:00", "2026-02-01T00:00:01+01:00", time.Hour, [2]string{"2026-01-31T22:00:00Z", "2026-02-01T00:00:00Z"}, 2, ""},
		{"2026-03-01T05:00:00Z", "2026-03-02T05:00:00Z", 24 * time.Hour, [2]string{"2026-03-01T00:00:00Z", "2026-03-03T00:00:00Z"}, 2, ""},
		{"1969-12-31T23:30:00Z", "1970-01-01T00:30:00Z", time.Hour, [2]string{"1969-12-31T23:00:00Z", "1970-01-01T01:00:00Z"}, 2, ""},
		{"2026-01-01T00:00:00Z", "2026-01-01T00:00:00Z", time.Hour, [2]string{}, 0, "empty range"},
		{"2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z", 1500 * time.Millisecond, [2]string{}, 0, "whole seconds"},
		{"2000-01-01T00:00:00Z", "2026-01-01T00:00:00Z", time.Minute, [2]string{}, 0, "at most"},
	} {
		r, err := Align(ts(c.from), ts(c.until), c.bucket)
		if c.err != "" {
			if err == nil || !strings.Contains(err.Error(), c.err) {
				t.Errorf("Align(%s, %s, %s): err %v, want %q", c.from, c.until, c.bucket, err, c.err)
			}
			continue
		}
		want0, want1 := ts(c.want[0]), ts(c.want[1])
		if err != nil || !r.From.Equal(want0) || !r.Until.Equal(want1) || r.Buckets() != c.n {
			t.Errorf("Align(%s, %s, %s) = %v..%v (%d buckets), %v; want %v..%v (%d)", c.from, c.until, c.bucket, r.From, r.Until, r.Buckets(), err, want0, want1, c.n)
		}
	}
}

func TestMerger(t *testing.T) {
	row := func(id int64, status string) outboxstore.VerifyRow {
		return outboxstore.VerifyRow{ID: id, Status: status}
	}
	held := func(id int64, n uint64) sink.Held { return sink.Held{ID: id, Copies: n} }
	g := NewMerger([]outboxstore.VerifyRow{
		row(1, "processed"), // matched
		row(2, "processed"), // missing
		row(3, "pending"),   // not delivered yet: neither
		row(4, "pending"),   // in ClickHouse already: in flight
		row(5, "processed"), // twice
		row(7, "processed"), // missing, after the last ClickHouse id
	})
	for _, h := range []sink.Held{held(1, 1), held(4, 1), held(5, 2), held(6, 1)} {
		if err := g.Add(h); err != nil {
			t.Fatal(err)
		}
	}
	m := g.Finish()
	var missing []int64
	for _, r := range m.Missing {
		missing = append(missing, r.ID)
	}
	if m.Matched != 1 || m.InFlight != 1 || !reflect.DeepEqual(missing, []int64{2, 7}) ||
		!reflect.DeepEqual(m.Duplicates, []Duplicate{{ID: 5, Copies: 2, Status: "processed"}}) ||
		!reflect.DeepEqual(m.CHOnly, []sink.Held{held(6, 1)}) || m.CHRows != 5 {
		t.Fatalf("merge = %+v", m)
	}
	if err := g.Add(held(6, 1)); err == nil {
		t.Fatal("an id out of order was accepted")
	}
}

func TestPruneRule(t *testing.T) {
	berlin, err := time.LoadLocation("Europe/Berlin")
	if err != nil {
		t.Fatal(err)
	}
	now := time.Date(2026, 12, 10, 12, 0, 0, 0, time.UTC)
	rule := NewPruneRule(now, 7*24*time.Hour, berlin, 100, 500)
	// The cutoff is Berlin wall clock time: 2026-12-03 13:00 (UTC+1).
	if want := time.Date(2026, 12, 3, 13, 0, 0, 0, time.UTC); !rule.Cutoff.Equal(want) {
		t.Fatalf("cutoff %v, want %v", rule.Cutoff, want)
	}
	for _, c := range []struct {
		id   int64
		at   time.Time
		want bool
	}{
		{150, now.Add(-7*24*time.Hour - time.Second), true}, // older than the retention
		{150, now.Add(-7*24*time.Hour + time.Second), false},
		{99, now, true}, // below the oldest processed row
		{100, now, false},
		{600, now.Add(-time.Hour), false},
	} {
		if got := rule.Explains(c.id, c.at); got != c.want {
			t.Errorf("Explains(%d, %v) = %v, want %v", c.id, c.at, got, c.want)
		}
	}
	// No retention, no processed row left: everything up to the highest id.
	none := NewPruneRule(now, 0, time.UTC, 0, 500)
	if !none.Explains(500, now) || none.Explains(501, now) || !none.Cutoff.IsZero() {
		t.Errorf("rule without processed rows: %+v", none)
	}
}

func TestOffsetSpread(t *testing.T) {
	berlin, _ := time.LoadLocation("Europe/Berlin")
	kolkata, _ := time.LoadLocation("Asia/Kolkata")
	winter := time.Date(2026, 1, 10, 0, 0, 0, 0, time.UTC)
	for _, c := range []struct {
		loc  *time.Location
		a, b time.Time
		want time.Duration
	}{
		{time.UTC, winter, winter.AddDate(1, 0, 0), 0},
		{kolkata, winter, winter.AddDate(1, 0, 0), 0},
		{berlin, winter, winter.AddDate(0, 0, 7), 0},
		{berlin, winter, winter.AddDate(0, 6, 0), time.Hour},
	} {
		if got := offsetSpread(c.loc, c.a, c.b); got != c.want {
			t.Errorf("offsetSpread(%s, %v, %v) = %v, want %v", c.loc, c.a, c.b, got, c.want)
		}
	}
}
