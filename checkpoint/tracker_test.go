package checkpoint

import "testing"

func TestTrackerAcknowledgesOnlyWholeTransactions(t *testing.T) {
	tr := NewTracker(100)
	// Transaction A: 3 rows, commit end LSN 200.
	tr.Begin()
	for i := 0; i < 3; i++ {
		tr.NextSeq()
	}
	tr.Commit(200)
	// Transaction B: 2 rows, commit end LSN 300.
	tr.Begin()
	tr.NextSeq()
	tr.NextSeq()
	tr.Commit(300)

	if got := tr.SafeLSN(); got != 100 {
		t.Fatalf("nothing durable: SafeLSN = %d, want 100", got)
	}
	// First batch holds A's first two rows: A is not complete.
	mustResolve(t, tr, 0, 2)
	if got := tr.SafeLSN(); got != 100 {
		t.Fatalf("half of A durable: SafeLSN = %d, want 100", got)
	}
	// A later batch (A's last row + B's first) resolves: A done, B not.
	mustResolve(t, tr, 2, 4)
	if got := tr.SafeLSN(); got != 200 {
		t.Fatalf("A durable: SafeLSN = %d, want 200", got)
	}
	mustResolve(t, tr, 4, 5)
	if got := tr.SafeLSN(); got != 300 {
		t.Fatalf("all durable: SafeLSN = %d, want 300", got)
	}
	if !tr.Idle() {
		t.Fatal("tracker should be idle")
	}
}

func TestTrackerOutOfOrderResolution(t *testing.T) {
	tr := NewTracker(0)
	for i, lsn := range []uint64{10, 20, 30} {
		tr.Begin()
		tr.NextSeq()
		tr.Commit(lsn)
		_ = i
	}
	mustResolve(t, tr, 2, 3) // the last transaction first
	if got := tr.SafeLSN(); got != 0 {
		t.Fatalf("gap below: SafeLSN = %d, want 0", got)
	}
	mustResolve(t, tr, 0, 1)
	if got := tr.SafeLSN(); got != 10 {
		t.Fatalf("SafeLSN = %d, want 10", got)
	}
	mustResolve(t, tr, 1, 2)
	if got := tr.SafeLSN(); got != 30 {
		t.Fatalf("SafeLSN = %d, want 30", got)
	}
}

func TestTrackerEmptyTransactionAndFollowServer(t *testing.T) {
	tr := NewTracker(50)
	tr.Begin()
	tr.Commit(60) // no rows: acknowledgeable at once
	if got := tr.SafeLSN(); got != 60 {
		t.Fatalf("empty transaction: SafeLSN = %d, want 60", got)
	}
	if got := tr.FollowServer(90); got != 90 {
		t.Fatalf("idle: FollowServer = %d, want 90", got)
	}
	tr.Begin()
	tr.NextSeq()
	if got := tr.FollowServer(500); got != 90 {
		t.Fatalf("open transaction: FollowServer = %d, want 90", got)
	}
	tr.Commit(120)
	if got := tr.FollowServer(500); got != 90 {
		t.Fatalf("unresolved rows: FollowServer = %d, want 90", got)
	}
	mustResolve(t, tr, 0, 1)
	if got := tr.FollowServer(500); got != 500 {
		t.Fatalf("durable and idle: FollowServer = %d, want 500", got)
	}
	if got := tr.FollowServer(400); got != 500 {
		t.Fatalf("never moves back: FollowServer = %d, want 500", got)
	}
}

func TestTrackerRejectsBadRanges(t *testing.T) {
	tr := NewTracker(0)
	tr.Begin()
	tr.NextSeq()
	tr.NextSeq()
	tr.Commit(10)
	for _, c := range []struct {
		name     string
		from, to uint64
	}{
		{"beyond received", 0, 3},
		{"reversed", 2, 1},
	} {
		t.Run(c.name, func(t *testing.T) {
			if err := tr.Resolve(c.from, c.to); err == nil {
				t.Fatalf("Resolve(%d, %d) succeeded", c.from, c.to)
			}
		})
	}
	mustResolve(t, tr, 0, 1)
	if err := tr.Resolve(0, 1); err == nil {
		t.Fatal("resolving a range twice succeeded")
	}
}

func mustResolve(t *testing.T, tr *Tracker, from, to uint64) {
	t.Helper()
	if err := tr.Resolve(from, to); err != nil {
		t.Fatalf("Resolve(%d, %d): %v", from, to, err)
	}
}

// TestTrackerStaysBoundedWhileStalled (issue 11 item 10): while the writer
// is stalled on one unresolved row, a million commits without rows (other
// tables' transactions) must not grow the list of unacknowledged commits,
// and once the row resolves the tracker acknowledges the last of them.
func TestTrackerStaysBoundedWhileStalled(t *testing.T) {
	tr := NewTracker(100)
	tr.Begin()
	first := tr.NextSeq()
	tr.Commit(200)
	for i := uint64(0); i < 1_000_000; i++ {
		tr.Begin()
		tr.Commit(300 + i)
	}
	if n := len(tr.commits); n > 2 {
		t.Fatalf("%d unacknowledged commit marks after a million empty commits, want at most 2", n)
	}
	if got := tr.SafeLSN(); got != 100 {
		t.Fatalf("SafeLSN = %d before the row resolved, want 100", got)
	}
	if err := tr.Resolve(first, first+1); err != nil {
		t.Fatal(err)
	}
	if got, want := tr.SafeLSN(), uint64(300+999_999); got != want {
		t.Fatalf("SafeLSN = %d after the row resolved, want %d", got, want)
	}
}
