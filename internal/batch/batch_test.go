package batch

import (
	"testing"
	"time"

	"github.com/outbox-streamer/outbox-streamer/internal/record"
)

func TestBuilderCutsBySize(t *testing.T) {
	b := NewBuilder(3, time.Hour)
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
	b := NewBuilder(1000, 100*time.Millisecond)
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
