// Package checkpoint owns the acknowledgement state: it decides which
// replication position is safe to acknowledge (the Tracker, over contiguous
// resolved rows) and keeps the durable record of the batch in flight to
// ClickHouse (the outbox_checkpoint table).
package checkpoint

import (
	"fmt"
	"sync"
)

// Tracker computes the LSN that is safe to confirm to PostgreSQL.
//
// Every row received from the slot gets a sequence number, in stream order. A commit
// is recorded with the sequence number one past its last row and its end LSN. Batches
// resolve contiguous sequence ranges when ClickHouse (or the failed-row path) has made
// them durable, possibly out of order. The safe LSN is the end LSN of the last commit
// all of whose rows, and all rows before them, are resolved: a transaction split
// across several batches is acknowledged only after its last batch.
//
// The receive loop calls Begin/NextSeq/Commit; writers call Resolve; the receive loop
// reads SafeLSN. All methods are safe for concurrent use.
type Tracker struct {
	mu sync.Mutex

	nextSeq  uint64            // sequence number of the next row to be received
	resolved uint64            // every seq below this is durable
	pending  map[uint64]uint64 // resolved ranges not yet contiguous: from -> to
	commits  []commitMark      // commits not yet acknowledged, in stream order
	inTxn    bool              // a Begin was received without its Commit
	safeLSN  uint64            // highest acknowledged end LSN
}

type commitMark struct {
	endSeq uint64 // one past the transaction's last row
	lsn    uint64 // end LSN of the commit record
}

// NewTracker returns a tracker whose acknowledged position starts at startLSN (the
// slot's confirmed flush LSN).
func NewTracker(startLSN uint64) *Tracker {
	return &Tracker{pending: make(map[uint64]uint64), safeLSN: startLSN}
}

// Begin marks the start of a transaction.
func (t *Tracker) Begin() {
	t.mu.Lock()
	t.inTxn = true
	t.mu.Unlock()
}

// NextSeq assigns the sequence number of the next received row.
func (t *Tracker) NextSeq() uint64 {
	t.mu.Lock()
	s := t.nextSeq
	t.nextSeq++
	t.mu.Unlock()
	return s
}

// Commit records the end of a transaction whose rows have all been assigned sequence
// numbers. A transaction without rows becomes acknowledgeable as soon as everything
// before it is.
func (t *Tracker) Commit(endLSN uint64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.inTxn = false
	// Commits without rows since the last mark (other tables' transactions on
	// servers that send empty ones) become acknowledgeable together with it:
	// raise its LSN instead of adding a mark, so that a stalled writer does
	// not make this list grow with every transaction on the server.
	if n := len(t.commits); n > 0 && t.commits[n-1].endSeq == t.nextSeq {
		t.commits[n-1].lsn = max(t.commits[n-1].lsn, endLSN)
	} else {
		t.commits = append(t.commits, commitMark{endSeq: t.nextSeq, lsn: endLSN})
	}
	t.advance()
}

// Resolve marks rows [from, to) durable.
func (t *Tracker) Resolve(from, to uint64) error {
	if to < from {
		return fmt.Errorf("resolve: empty range [%d, %d)", from, to)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if to > t.nextSeq {
		return fmt.Errorf("resolve: range [%d, %d) beyond received rows (%d)", from, to, t.nextSeq)
	}
	if from < t.resolved {
		return fmt.Errorf("resolve: range [%d, %d) overlaps resolved rows below %d", from, to, t.resolved)
	}
	if from == to {
		return nil
	}
	if _, dup := t.pending[from]; dup {
		return fmt.Errorf("resolve: range starting at %d resolved twice", from)
	}
	t.pending[from] = to
	for {
		end, ok := t.pending[t.resolved]
		if !ok {
			break
		}
		delete(t.pending, t.resolved)
		t.resolved = end
	}
	t.advance()
	return nil
}

// advance moves safeLSN over every commit whose rows are all resolved. Callers hold mu.
func (t *Tracker) advance() {
	i := 0
	for i < len(t.commits) && t.commits[i].endSeq <= t.resolved {
		if t.commits[i].lsn > t.safeLSN {
			t.safeLSN = t.commits[i].lsn
		}
		i++
	}
	if i > 0 {
		// Copy down instead of reslicing so the backing array does not grow forever.
		n := copy(t.commits, t.commits[i:])
		t.commits = t.commits[:n]
	}
}

// SafeLSN returns the highest LSN that may be confirmed to the server.
func (t *Tracker) SafeLSN() uint64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.safeLSN
}

// Idle reports whether nothing received is still unacknowledged: no open transaction,
// no unresolved row, no pending commit. Only then may the confirmed position follow
// the server's WAL end.
func (t *Tracker) Idle() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return !t.inTxn && t.resolved == t.nextSeq && len(t.commits) == 0
}

// FollowServer raises the safe LSN to walEnd when the tracker is idle, and reports the
// resulting safe LSN. The receive loop calls it with the WAL end of a keepalive, which
// the server sends only after every message before it, so nothing below walEnd is
// still unreceived.
func (t *Tracker) FollowServer(walEnd uint64) uint64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.inTxn && t.resolved == t.nextSeq && len(t.commits) == 0 && walEnd > t.safeLSN {
		t.safeLSN = walEnd
	}
	return t.safeLSN
}
