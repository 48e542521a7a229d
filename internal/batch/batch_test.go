package batch

import (
	"strings"
	"testing"
	"time"

	"github.com/outbox-streamer/outbox-streamer/internal/record"
)

func TestBuilderCutsBySize(t *testing.T) {
	b := NewBuilder(3, 0, time.Hour)
	now := time.Unix(1000, 0)
	var full []bool
	for i := 0; i < 3; i++ {
		full = append(full, b.Add(uint64(10+i), record.Event{ID: int64(i), CommitLSN: uint64(100 + i)}, now))
	}
	if full[0] || full[1] || !full[2] {
		t.Fatalf("full flags = %v, want [false false true]", full)
	}
	got := b.Take()
	if got.Len() != 3 || got.FirstSeq != 10 || got.EndSeq() != 13 || got.MaxCommitLSN != 102 {
		t.Fatalf("batch = first %d end %d len %d max lsn %d", got.FirstSeq, got.EndSeq(), got.Len(), got.MaxCommitLSN)
	}
	if b.Take() != nil || b.Pending() != 0 {
		t.Fatal("builder not empty after Take")
	}
}

func TestBuilderCutsByTime(t *testing.T) {
	b := NewBuilder(1000, 0, 100*time.Millisecond)
	t0 := time.Unix(1000, 0)
	if _, ok := b.Deadline(); ok {
		t.Fatal("empty builder has a deadline")
	}
	if b.Due(t0.Add(time.Hour)) {
		t.Fatal("empty builder is due")
	}
	b.Add(0, record.Event{ID: 1}, t0)
	b.Add(1, record.Event{ID: 2}, t0.Add(90*time.Millisecond))
	if d, ok := b.Deadline(); !ok || !d.Equal(t0.Add(100*time.Millisecond)) {
		t.Fatalf("deadline = %v, %v; want first row + 100ms", d, ok)
	}
	if b.Due(t0.Add(99 * time.Millisecond)) {
		t.Fatal("due before the time bound")
	}
	if !b.Due(t0.Add(100 * time.Millisecond)) {
		t.Fatal("not due at the time bound")
	}
	if got := b.Take(); got.Len() != 2 {
		t.Fatalf("batch has %d rows, want 2", got.Len())
	}
}

func TestBuilderCutsByBytes(t *testing.T) {
	row := func(contextBytes int) record.Event {
		return record.Event{Type: "t", Context: strings.Repeat("x", contextBytes)}
	}
	small := row(100).Size()
	cases := []struct {
		name     string
		maxRows  int
		maxBytes int
		rows     []record.Event
		want     []bool // full after each row
	}{
		{"full when the bytes reach the bound", 1000, 3 * small, []record.Event{row(100), row(100), row(100)}, []bool{false, false, true}},
		{"full when the bytes pass the bound", 1000, 2*small + 1, []record.Event{row(100), row(100), row(100)}, []bool{false, false, true}},
		{"a row larger than the bound is a batch of one", 1000, small, []record.Event{row(10 << 20)}, []bool{true}},
		{"rows still bound a byte-bounded batch", 2, 1 << 30, []record.Event{row(100), row(100)}, []bool{false, true}},
		{"0 is no byte bound", 1000, 0, []record.Event{row(10 << 20), row(10 << 20)}, []bool{false, false}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			b := NewBuilder(c.maxRows, c.maxBytes, time.Hour)
			now := time.Unix(1000, 0)
			wantBytes := 0
			for i, ev := range c.rows {
				wantBytes += ev.Size()
				if full := b.Add(uint64(i), ev, now); full != c.want[i] {
					t.Fatalf("row %d: full = %v, want %v", i, full, c.want[i])
				}
			}
			got := b.Take()
			if got.Len() != len(c.rows) || got.Bytes != wantBytes {
				t.Fatalf("batch has %d rows, %d bytes; want %d rows, %d bytes", got.Len(), got.Bytes, len(c.rows), wantBytes)
			}
		})
	}
}

func TestBuilderStartsEachBatchAtZeroBytes(t *testing.T) {
	b := NewBuilder(1, 0, time.Hour)
	ev := record.Event{Type: "t", Context: "{}"}
	b.Add(0, ev, time.Unix(1000, 0))
	b.Take()
	b.Add(1, ev, time.Unix(1000, 0))
	if got := b.Take(); got.Bytes != ev.Size() {
		t.Fatalf("second batch has %d bytes, want %d", got.Bytes, ev.Size())
	}
}

// TestRecycledEventsComeBackEmpty: a new batch may take the events slice of
// a recycled one, and then finds it empty and cleared (the earlier rows'
// strings released), never the old rows; a much larger slice is not taken.
func TestRecycledEventsComeBackEmpty(t *testing.T) {
	reused := 0
	for i := range 50 { // sync.Pool may drop what it is given
		old := make([]record.Event, 3, 4)
		old[0].Type, old[2].Type = "old", "old"
		Recycle(old)
		b := NewBuilder(4, 0, time.Hour)
		b.Add(uint64(i), record.Event{ID: 1, Type: "new"}, time.Now())
		got := b.Take().Events
		if len(got) != 1 || got[0].Type != "new" {
			t.Fatalf("a new batch holds %+v", got)
		}
		if &got[0] == &old[0] {
			reused++
			if full := got[:cap(got)]; full[2].Type != "" || full[1].ID != 0 {
				t.Fatalf("a recycled slice was not cleared: %+v", full)
			}
		}
	}
	if reused == 0 {
		t.Fatal("no recycled slice was ever reused")
	}
	big := make([]record.Event, 0, 100)
	Recycle(big)
	b := NewBuilder(4, 0, time.Hour)
	b.Add(0, record.Event{ID: 1}, time.Now())
	if got := b.Take().Events; cap(got) == 100 {
		t.Fatal("a batch of 4 rows took a slice of 100")
	}
}
