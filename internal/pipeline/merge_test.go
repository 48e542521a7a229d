package pipeline

import (
	"testing"
	"time"

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

// TestMergeKeepsTransactionsApart: one merge loop serves every kind of
// batch; staging batches merge only with the same transaction's (their
// subtransactions with them), a committed streamed transaction's only with
// its own, and an abort with nothing.
func TestMergeKeepsTransactionsApart(t *testing.T) {
	stage := func(xid uint32, rows int) *batch.Batch {
		b := &batch.Batch{Streamed: &batch.Streamed{Op: batch.OpStage, Xid: xid}}
		for i := 0; i < rows; i++ {
			b.Events = append(b.Events, record.Event{ID: int64(i)})
			b.Streamed.SubXids = append(b.Streamed.SubXids, xid+uint32(i))
		}
		return b
	}
	commit := &batch.Streamed{Op: batch.OpCommit, Xid: 7, Rows: 4}
	tagged := func(s *batch.Streamed, lsn uint64) *batch.Batch {
		return &batch.Batch{Streamed: s, MaxCommitLSN: lsn, Events: []record.Event{{ID: 1}, {ID: 2}}}
	}
	for _, tc := range []struct {
		name      string
		first     *batch.Batch
		queued    []*batch.Batch
		rows      int
		subxids   int
		commitLSN uint64
	}{
		{"staging, same transaction", stage(7, 2), []*batch.Batch{stage(7, 3), stage(8, 1)}, 5, 5, 0},
		{"staging, then a commit", stage(7, 2), []*batch.Batch{tagged(commit, 90)}, 2, 2, 0},
		{"a commit's batches", tagged(commit, 90), []*batch.Batch{tagged(commit, 95), tagged(nil, 99)}, 4, 0, 95},
		{"ordinary, then a commit", tagged(nil, 50), []*batch.Batch{tagged(nil, 60), tagged(commit, 90)}, 4, 0, 60},
		{"an abort", &batch.Batch{Streamed: &batch.Streamed{Op: batch.OpDrop, Xid: 7}}, []*batch.Batch{stage(7, 1)}, 0, 0, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := make(chan *batch.Batch, len(tc.queued))
			for _, b := range tc.queued {
				in <- b
			}
			close(in)
			w := &Writer{cfg: WriterConfig{MaxInsertRows: 100}}
			got := w.merge(tc.first, in)
			var subxids int
			if got.Streamed != nil {
				subxids = len(got.Streamed.SubXids)
			}
			if got.Len() != tc.rows || subxids != tc.subxids || got.MaxCommitLSN != tc.commitLSN {
				t.Fatalf("merged %d rows, %d subtransactions, commit LSN %d; want %d, %d, %d",
					got.Len(), subxids, got.MaxCommitLSN, tc.rows, tc.subxids, tc.commitLSN)
			}
			if w.next == nil {
				t.Fatal("the batch that does not belong was not kept for the next insert")
			}
		})
	}
}

// TestMergeTakesTheLastCommitEnd: a merged insert waits (STANDBY_HOLD) for
// the commit end of its last batch, which covers the earlier ones; when the
// last batch was cut before its commit arrived (no end), neither is known.
func TestMergeTakesTheLastCommitEnd(t *testing.T) {
	mk := func(first uint64, commit, end uint64) *batch.Batch {
		return &batch.Batch{FirstSeq: first, Events: []record.Event{{ID: int64(first), CommitLSN: commit}}, MaxCommitLSN: commit, CommitEnd: end}
	}
	for _, c := range []struct {
		name    string
		queued  *batch.Batch
		wantEnd uint64
	}{
		{"both ends known", mk(1, 300, 340), 340},
		{"the last cut before its commit", mk(1, 300, 0), 0},
	} {
		in := make(chan *batch.Batch, 1)
		in <- c.queued
		close(in)
		w := &Writer{cfg: WriterConfig{MaxInsertRows: 100}}
		got := w.merge(mk(0, 100, 140), in)
		if got.Len() != 2 || got.CommitEnd != c.wantEnd || got.MaxCommitLSN != 300 {
			t.Errorf("%s: merged %d rows, commit end %d, max commit %d; want 2, %d, 300", c.name, got.Len(), got.CommitEnd, got.MaxCommitLSN, c.wantEnd)
		}
	}
}

// TestMergeWaitsForAFlow: a full ordinary batch means rows are flowing, so
// merge waits for the batches still to come (up to Linger) instead of
// sending the one it has; a batch cut by the timeout, or a staging batch,
// goes out with only what is queued.
func TestMergeWaitsForAFlow(t *testing.T) {
	mk := func(first, rows int) *batch.Batch {
		b := &batch.Batch{FirstSeq: uint64(first)}
		for i := range rows {
			b.Events = append(b.Events, record.Event{ID: int64(first + i)})
		}
		return b
	}
	t.Run("full batch: waits until the insert is full", func(t *testing.T) {
		in := make(chan *batch.Batch)
		go func() {
			for i := 1; i <= 3; i++ {
				time.Sleep(20 * time.Millisecond) // after merge found the queue empty
				in <- mk(i*10, 10)
			}
		}()
		w := &Writer{cfg: WriterConfig{MaxInsertRows: 40, FullBatch: 10, Linger: time.Hour}}
		if got := w.merge(mk(0, 10), in); got.Len() != 40 {
			t.Fatalf("merged %d rows, want 40: the batches that followed a full one were not waited for", got.Len())
		}
	})
	t.Run("full batch: the wait ends at Linger", func(t *testing.T) {
		in := make(chan *batch.Batch)
		w := &Writer{cfg: WriterConfig{MaxInsertRows: 40, FullBatch: 10, Linger: 10 * time.Millisecond}}
		if got := w.merge(mk(0, 10), in); got.Len() != 10 {
			t.Fatalf("merged %d rows, want 10", got.Len())
		}
	})
	t.Run("full batch: the wait ends when the stream closes", func(t *testing.T) {
		in := make(chan *batch.Batch)
		go func() { in <- mk(10, 10); close(in) }()
		w := &Writer{cfg: WriterConfig{MaxInsertRows: 40, FullBatch: 10, Linger: time.Hour}}
		if got := w.merge(mk(0, 10), in); got.Len() != 20 {
			t.Fatalf("merged %d rows, want 20", got.Len())
		}
	})
	// A wait here would block for the hour and fail the test by its timeout.
	for _, tc := range []struct {
		name  string
		first *batch.Batch
	}{
		{"batch cut by the timeout", mk(0, 9)},
		{"staging batch", &batch.Batch{Streamed: &batch.Streamed{Op: batch.OpStage, Xid: 7}, Events: mk(0, 10).Events}},
	} {
		t.Run(tc.name+": no wait", func(t *testing.T) {
			in := make(chan *batch.Batch, 1)
			in <- mk(10, 10)
			w := &Writer{cfg: WriterConfig{MaxInsertRows: 40, FullBatch: 10, Linger: time.Hour}}
			want := tc.first.Len() + 10 // what was queued
			got := w.merge(tc.first, in)
			if tc.first.Streamed == nil {
				if got.Len() != want {
					t.Fatalf("merged %d rows, want %d (what was queued)", got.Len(), want)
				}
			} else if w.next == nil {
				t.Fatal("the ordinary batch was merged into a staging batch")
			}
		})
	}
}

// TestMergeGrowsByDoublingWhenNothingIsQueued: batches that arrive one at a
// time while merge waits (nothing queued behind each) grow the insert by
// doubling, not by one batch each: nine batches appended to one make at
// most four copies, not nine.
func TestMergeGrowsByDoublingWhenNothingIsQueued(t *testing.T) {
	mk := func(rows int) *batch.Batch { return &batch.Batch{Events: make([]record.Event, rows)} }
	w := &Writer{cfg: WriterConfig{MaxInsertRows: 10000}}
	b := mk(1000)
	grown := 0
	for range 9 {
		before := cap(b.Events)
		w.appendEvents(b, mk(1000), 0)
		if cap(b.Events) != before {
			grown++
		}
	}
	if b.Len() != 10000 || grown > 4 {
		t.Fatalf("%d rows after %d growths, want 10000 rows after at most 4", b.Len(), grown)
	}
}

// TestMergedSliceIsReusedByTheNextMerge: after an ordinary batch's insert
// its merged events slice, cleared, is what the next merge grows into,
// and the batches merged into it go back to the stream; a staging batch's
// events are left alone (the stager may still read them).
func TestMergedSliceIsReusedByTheNextMerge(t *testing.T) {
	mk := func(id int64) *batch.Batch {
		b := &batch.Batch{Events: make([]record.Event, 10)}
		for i := range b.Events {
			b.Events[i] = record.Event{ID: id + int64(i), Type: "t"}
		}
		return b
	}
	w := &Writer{cfg: WriterConfig{MaxInsertRows: 40, FullBatch: 10}}
	in := make(chan *batch.Batch, 3)
	in <- mk(10)
	in <- mk(20)
	in <- mk(30)
	first := w.merge(mk(0), in)
	if first.Len() != 40 {
		t.Fatalf("merged %d rows, want 40", first.Len())
	}
	merged := first.Events[:cap(first.Events)]
	w.release(first)
	if first.Events != nil || cap(w.spare) != cap(merged) || &w.spare[:1][0] != &merged[0] {
		t.Fatal("the merged insert's slice was not kept as the spare")
	}
	if merged[0].Type != "" || merged[39].ID != 0 {
		t.Fatal("the spare still holds the delivered rows")
	}
	in <- mk(50)
	second := w.merge(mk(40), in)
	if second.Len() != 20 || &second.Events[0] != &merged[0] || second.Events[19].ID != 59 {
		t.Fatalf("the next merge did not grow into the spare: %d rows", second.Len())
	}

	staged := &batch.Batch{Streamed: &batch.Streamed{Op: batch.OpCommit}, Events: make([]record.Event, 10)}
	staged.Events[0].Type = "staged"
	w.release(staged)
	if staged.Events == nil || staged.Events[0].Type != "staged" {
		t.Fatal("a streamed transaction's events were released")
	}
}
