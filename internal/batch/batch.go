// Package batch groups decoded rows into batches bounded by a row count, a byte
// count and a time bound, whichever is reached first.
package batch

import (
	"sync"
	"time"

	"github.com/outbox-streamer/outbox-streamer/internal/record"
)

// Batch is a contiguous run of rows from the stream: rows with sequence numbers
// [FirstSeq, FirstSeq+len(Events)).
type Batch struct {
	FirstSeq uint64
	Events   []record.Event
	// MaxCommitLSN is the highest commit LSN among the rows; the in-flight record
	// written before the insert covers it.
	MaxCommitLSN uint64
	// CommitEnd is the end of the commit record of the batch's last
	// transaction, or past it (a later commit's end): what a standby must
	// have flushed before the rows are delivered (STANDBY_HOLD). Zero when
	// the batch was handed over before that commit arrived (cut in the
	// middle of a transaction).
	CommitEnd uint64
	// Opened is when the first row entered the batch.
	Opened time.Time
	// Bytes is the sum of the rows' Size: about what the batch takes in an insert.
	Bytes int
	// Streamed, when set, ties the batch to a transaction the server streamed
	// before its commit (protocol 2) whose rows are staged in ClickHouse.
	Streamed *Streamed
}

// StreamOp is what a Streamed batch asks of the writer.
type StreamOp uint8

const (
	// OpStage: rows of an in-progress transaction, for the staging table.
	// Such a batch has no sequence numbers and is never acknowledged.
	OpStage StreamOp = iota + 1
	// OpDrop: the transaction aborted; the batch has no rows.
	OpDrop
	// OpCommit: the transaction's rows after its commit, with sequence
	// numbers like any batch; the writer copies the staged rows into the
	// event table instead of inserting these.
	OpCommit
)

// Streamed says which streamed transaction a batch belongs to.
type Streamed struct {
	Op  StreamOp
	Xid uint32
	// SubXids (OpStage) is the subtransaction of each row.
	SubXids []uint32
	// Aborted (OpCommit) are the subtransactions rolled back, and Rows the
	// rows that committed: what the staging table must hold for the copy.
	Aborted []uint32
	Rows    int
}

// Tracked reports whether the batch's rows have sequence numbers (everything
// but staging and drop batches).
func (b *Batch) Tracked() bool { return b.Streamed == nil || b.Streamed.Op == OpCommit }

// EndSeq is one past the last row's sequence number.
func (b *Batch) EndSeq() uint64 { return b.FirstSeq + uint64(len(b.Events)) }

// Len is the number of rows.
func (b *Batch) Len() int { return len(b.Events) }

// Builder accumulates rows until the batch is full or its time bound passes. It is not
// safe for concurrent use: only the receive loop owns it.
type Builder struct {
	maxRows  int
	maxBytes int // 0: no byte bound
	maxWait  time.Duration
	cur      *Batch
}

// NewBuilder returns a builder for batches of at most maxRows rows and about
// maxBytes bytes (0: no byte bound), open for at most maxWait after their first row.
func NewBuilder(maxRows, maxBytes int, maxWait time.Duration) *Builder {
	if maxRows < 1 {
		maxRows = 1
	}
	if maxBytes < 0 {
		maxBytes = 0
	}
	return &Builder{maxRows: maxRows, maxBytes: maxBytes, maxWait: maxWait}
}

// Add appends a row with sequence number seq and reports whether the batch is now
// full: it reached maxRows rows or maxBytes bytes. The byte bound is checked after
// the row is added, so a batch passes it by at most its last row, and a row larger
// than the bound is a batch of one rather than a row no batch can take.
// Rows must arrive with consecutive sequence numbers.
func (b *Builder) Add(seq uint64, ev record.Event, now time.Time) (full bool) {
	if b.cur == nil {
		b.cur = &Batch{FirstSeq: seq, Events: newEvents(b.maxRows), Opened: now}
	}
	b.cur.Events = append(b.cur.Events, ev)
	b.cur.Bytes += ev.Size()
	if ev.CommitLSN > b.cur.MaxCommitLSN {
		b.cur.MaxCommitLSN = ev.CommitLSN
	}
	return len(b.cur.Events) >= b.maxRows || (b.maxBytes > 0 && b.cur.Bytes >= b.maxBytes)
}

// Due reports whether the open batch has reached its time bound.
func (b *Builder) Due(now time.Time) bool {
	return b.cur != nil && now.Sub(b.cur.Opened) >= b.maxWait
}

// Deadline returns when the open batch must be flushed; ok is false when no batch is open.
func (b *Builder) Deadline() (deadline time.Time, ok bool) {
	if b.cur == nil {
		return time.Time{}, false
	}
	return b.cur.Opened.Add(b.maxWait), true
}

// Take returns the open batch (nil if none) and starts a new one.
func (b *Builder) Take() *Batch {
	out := b.cur
	b.cur = nil
	return out
}

// Pending is the number of rows in the open batch.
func (b *Builder) Pending() int {
	if b.cur == nil {
		return 0
	}
	return len(b.cur.Events)
}

// eventSlices holds the event slices of delivered batches for new ones
// (*[]record.Event): a new slice per batch was about 172 B of garbage per row.
var eventSlices sync.Pool

// Recycle hands back the events of a batch for a later one. The caller must
// be done with them: nothing may read them afterwards. They are cleared, so
// that the rows' strings can be collected while the slice waits.
func Recycle(events []record.Event) {
	if cap(events) == 0 {
		return
	}
	events = events[:cap(events)]
	clear(events)
	events = events[:0]
	eventSlices.Put(&events)
}

// newEvents returns an empty slice for n rows, a recycled one when there is
// one of about that size (a much larger one would hold memory a batch of n
// rows does not need, so it is left to the collector).
func newEvents(n int) []record.Event {
	if p, ok := eventSlices.Get().(*[]record.Event); ok && cap(*p) >= n && cap(*p) <= 2*n {
		return (*p)[:0]
	}
	return make([]record.Event, 0, n)
}
