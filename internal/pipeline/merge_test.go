package pipeline

import (
	"testing"

	"github.com/outbox-streamer/outbox-streamer/internal/batch"
	"github.com/outbox-streamer/outbox-streamer/internal/record"
)

// TestMergeStopsAtInsertBytes: queued batches are merged up to the row cap,
// but not past the byte cap; the batch that would pass it is kept for the
// next insert, not dropped, and a batch over the cap alone still goes whole.
func TestMergeStopsAtInsertBytes(t *testing.T) {
	mk := func(first uint64, rows, bytes int) *batch.Batch {
		b := &batch.Batch{FirstSeq: first, Bytes: bytes}
		for i := 0; i < rows; i++ {
			b.Events = append(b.Events, record.Event{ID: int64(first) + int64(i)})
		}
		return b
	}
	in := make(chan *batch.Batch, 4)
	in <- mk(10, 10, 400)
	in <- mk(20, 10, 400)
	in <- mk(30, 10, 5000)
	close(in)
	w := &Writer{cfg: WriterConfig{MaxInsertRows: 10000, MaxInsertBytes: 1000}}
	got := w.merge(mk(0, 10, 100), in)
	if got.Len() != 30 || got.Bytes != 900 {
		t.Fatalf("merged %d rows of %d bytes, want 30 rows of 900 bytes", got.Len(), got.Bytes)
	}
	if w.next == nil || w.next.FirstSeq != 30 {
		t.Fatalf("the batch over the byte cap was not kept for the next insert: %+v", w.next)
	}
	// Alone it is over the cap, and still delivered whole.
	b := w.next
	w.next = nil
	if got := w.merge(b, in); got.Len() != 10 || w.next != nil {
		t.Fatalf("a lone batch over the cap: %d rows, next %v", got.Len(), w.next)
	}
}
