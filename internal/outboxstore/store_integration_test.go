package outboxstore_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/fixture"
	"github.com/outbox-streamer/outbox-streamer/internal/harness/testenv"
	"github.com/outbox-streamer/outbox-streamer/internal/outboxstore"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// TestStatusUpdateWaitsForRowsToBecomeVisible: logical decoding can hand over a
// transaction a moment before its commit is visible to other sessions. A status
// update for such a row must wait for it, not silently update nothing and leave the
// row pending for ever.
func TestStatusUpdateWaitsForRowsToBecomeVisible(t *testing.T) {
	e := fixture.New(t, testenv.ModernClickHouse(t))
	ctx := context.Background()
	store := outboxstore.New(e.Pool, outboxstore.RetryConfig{})
	for _, c := range []struct {
		name   string
		update func(id int64) error
		want   string
	}{
		{"processed", func(id int64) error { _, err := store.MarkProcessed(ctx, outboxstore.RefsOf([]int64{id})); return err }, "processed"},
		{"failed", func(id int64) error {
			_, err := store.MarkFailed(ctx, []outboxstore.Failure{{ID: id, Reason: "bad"}})
			return err
		}, "failed"},
		{"deferred", func(id int64) error {
			_, err := store.MarkDeferred(ctx, outboxstore.RefsOf([]int64{id}), "down")
			return err
		}, "failed"},
	} {
		t.Run(c.name, func(t *testing.T) {
			tx, err := e.Pool.Begin(ctx)
			if err != nil {
				t.Fatal(err)
			}
			defer tx.Rollback(ctx) //nolint:errcheck
			var id int64
			if err := tx.QueryRow(ctx, `INSERT INTO event_outbox (event_type, event_date_time) VALUES ('t', now()) RETURNING id`).Scan(&id); err != nil {
				t.Fatal(err)
			}
			done := make(chan error, 1)
			go func() { done <- c.update(id) }()
			select {
			case err := <-done:
				t.Fatalf("the update returned (%v) while the row's transaction is still open", err)
			case <-time.After(300 * time.Millisecond):
			}
			if err := tx.Commit(ctx); err != nil {
				t.Fatal(err)
			}
			if err := <-done; err != nil {
				t.Fatal(err)
			}
			var status string
			if err := e.Pool.QueryRow(ctx, "SELECT status FROM event_outbox WHERE id = $1", id).Scan(&status); err != nil {
				t.Fatal(err)
			}
			if status != c.want {
				t.Fatalf("status = %q, want %q", status, c.want)
			}
		})
	}
}

// TestStatusUpdateLeavesFinishedRowsAlone: rows already processed (a replay after a
// crash) are visible, so the update returns at once and does not touch them.
func TestStatusUpdateLeavesFinishedRowsAlone(t *testing.T) {
	e := fixture.New(t, testenv.ModernClickHouse(t))
	ctx := context.Background()
	e.Insert(t, 10, false)
	if _, err := e.Pool.Exec(ctx, "UPDATE event_outbox SET status = 'processed'"); err != nil {
		t.Fatal(err)
	}
	var ids []int64
	rows, _ := e.Pool.Query(ctx, "SELECT id FROM event_outbox")
	for rows.Next() {
		var id int64
		_ = rows.Scan(&id)
		ids = append(ids, id)
	}
	rows.Close()
	store := outboxstore.New(e.Pool, outboxstore.RetryConfig{})
	if _, err := store.MarkDeferred(ctx, outboxstore.RefsOf(ids), "down"); err != nil {
		t.Fatal(err)
	}
	if _, p := e.Committed(t); p != 10 {
		t.Fatalf("%d rows processed after deferring finished rows, want all 10 untouched", p)
	}
}

// TestVanishedRowsAreSettled (issue 11 item 1): a row whose inserting
// transaction committed but which no longer exists (deleted in the same
// transaction, or afterwards) is reported as vanished at once, for each kind
// of status update, instead of being waited for until ErrNotVisible.
func TestVanishedRowsAreSettled(t *testing.T) {
	e := fixture.New(t, testenv.ModernClickHouse(t))
	ctx := context.Background()
	store := outboxstore.New(e.Pool, outboxstore.RetryConfig{})
	gone := func() outboxstore.Ref {
		var id, xid int64
		if err := e.Pool.QueryRow(ctx, `WITH ins AS (INSERT INTO event_outbox (event_type, event_date_time)
			VALUES ('x', now() AT TIME ZONE 'UTC') RETURNING id, xmin::text::bigint AS xid)
			SELECT id, xid FROM ins`).Scan(&id, &xid); err != nil {
			t.Fatal(err)
		}
		if _, err := e.Pool.Exec(ctx, "DELETE FROM event_outbox WHERE id = $1", id); err != nil {
			t.Fatal(err)
		}
		return outboxstore.Ref{ID: id, Xid: uint32(xid)}
	}
	for _, c := range []struct {
		name   string
		update func(r outboxstore.Ref) ([]int64, error)
	}{
		{"processed", func(r outboxstore.Ref) ([]int64, error) { return store.MarkProcessed(ctx, []outboxstore.Ref{r}) }},
		{"failed", func(r outboxstore.Ref) ([]int64, error) {
			return store.MarkFailed(ctx, []outboxstore.Failure{{ID: r.ID, Xid: r.Xid, Reason: "bad"}})
		}},
		{"deferred", func(r outboxstore.Ref) ([]int64, error) { return store.MarkDeferred(ctx, []outboxstore.Ref{r}, "down") }},
	} {
		t.Run(c.name, func(t *testing.T) {
			r := gone()
			start := time.Now()
			vanished, err := c.update(r)
			if err != nil {
				t.Fatalf("status update of a vanished row: %v", err)
			}
			if len(vanished) != 1 || vanished[0] != r.ID {
				t.Fatalf("vanished = %v, want [%d]", vanished, r.ID)
			}
			t.Logf("settled as vanished after %v", time.Since(start).Round(time.Millisecond))
		})
	}
}

// TestReasonsAreStorable (issue 11 item 7): reasons that are long with a
// multibyte character at the cut, or hold NUL bytes or invalid UTF-8, are
// stored; PostgreSQL used to reject them (22021) and the writer looped.
func TestReasonsAreStorable(t *testing.T) {
	e := fixture.New(t, testenv.ModernClickHouse(t))
	ctx := context.Background()
	store := outboxstore.New(e.Pool, outboxstore.RetryConfig{})
	for _, reason := range []string{strings.Repeat("a", 1999) + "ééé", "nul \x00 byte", "bad \xff utf-8"} {
		var id int64
		if err := e.Pool.QueryRow(ctx, `INSERT INTO event_outbox (event_type, event_date_time)
			VALUES ('x', now() AT TIME ZONE 'UTC') RETURNING id`).Scan(&id); err != nil {
			t.Fatal(err)
		}
		if _, err := store.MarkFailed(ctx, []outboxstore.Failure{{ID: id, Reason: reason}}); err != nil {
			t.Errorf("MarkFailed with reason of %d bytes: %v", len(reason), err)
		}
		if _, err := store.MarkDeferred(ctx, outboxstore.RefsOf([]int64{id}), reason); err != nil {
			t.Errorf("MarkDeferred with reason of %d bytes: %v", len(reason), err)
		}
	}
}

// TestClaimUsesTheIndex: a sweep round must cost its LIMIT, not the backlog.
// With 200,000 failed rows due (a backfill) the claims must read the partial
// index in its order: no sequential scan and no sort of the failed rows.
func TestClaimUsesTheIndex(t *testing.T) {
	e := fixture.New(t, testenv.ModernClickHouse(t))
	ctx := context.Background()
	if _, err := e.Pool.Exec(ctx, `INSERT INTO event_outbox (event_type, event_date_time, status, next_attempt_at)
		SELECT 't', now(), CASE WHEN g % 10 = 0 THEN 'processed' ELSE 'failed' END,
		       CASE WHEN g % 1000 = 1 THEN NULL ELSE now() - g * interval '1 ms' END
		FROM generate_series(1, 200000) AS g`); err != nil {
		t.Fatal(err)
	}
	if _, err := e.Pool.Exec(ctx, "ANALYZE event_outbox"); err != nil {
		t.Fatal(err)
	}
	for _, q := range outboxstore.ClaimStatements(outboxstore.DefaultName) {
		rows, err := e.Pool.Query(ctx, "EXPLAIN "+strings.Replace(q, "$1", "1000", 1))
		if err != nil {
			t.Fatal(err)
		}
		var plan []string
		for rows.Next() {
			var line string
			if err := rows.Scan(&line); err != nil {
				t.Fatal(err)
			}
			plan = append(plan, line)
		}
		rows.Close()
		text := strings.Join(plan, "\n")
		if strings.Contains(text, "Seq Scan") || strings.Contains(text, "Sort") || !strings.Contains(text, "event_outbox_undelivered_idx") {
			t.Errorf("a claim does not read the partial index in order:\n%s\n%s", q, text)
		}
	}
	tx, err := e.Pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx) //nolint:errcheck // read only
	claimed, err := outboxstore.New(e.Pool, outboxstore.RetryConfig{}).WithTx(tx).ClaimDue(ctx, 1000, time.UTC)
	if err != nil {
		t.Fatal(err)
	}
	if len(claimed) != 1000 {
		t.Fatalf("claimed %d rows, want 1000", len(claimed))
	}
	// The unscheduled rows (every 1000th, 180 of them failed) come first.
	var unscheduled int
	if err := tx.QueryRow(ctx, `SELECT count(*) FROM event_outbox WHERE status = 'failed' AND next_attempt_at IS NULL`).Scan(&unscheduled); err != nil {
		t.Fatal(err)
	}
	var firstScheduled int
	for i, c := range claimed {
		if (c.Event.ID-1)%1000 != 0 {
			firstScheduled = i
			break
		}
	}
	if firstScheduled != unscheduled {
		t.Errorf("the first %d claimed rows have no next_attempt_at, want all %d such rows first", firstScheduled, unscheduled)
	}
}

// TestMarkProcessedByRange: a batch with consecutive ids is updated by range;
// rows just outside it, and a row in a gap of a batch that is not
// consecutive, stay pending; a range with a row already processed and one
// deleted falls back to the row-by-row path and reports the deleted one.
func TestMarkProcessedByRange(t *testing.T) {
	e := fixture.New(t, testenv.ModernClickHouse(t))
	ctx := context.Background()
	store := outboxstore.New(e.Pool, outboxstore.RetryConfig{})
	insert := func(n int) []outboxstore.Ref {
		t.Helper()
		rows, err := e.Pool.Query(ctx, `INSERT INTO event_outbox (event_type, event_date_time)
			SELECT 't', now() AT TIME ZONE 'UTC' FROM generate_series(1, $1)
			RETURNING id, xmin::text::bigint`, n)
		if err != nil {
			t.Fatal(err)
		}
		var refs []outboxstore.Ref
		for rows.Next() {
			var id, xid int64
			if err := rows.Scan(&id, &xid); err != nil {
				t.Fatal(err)
			}
			refs = append(refs, outboxstore.Ref{ID: id, Xid: uint32(xid)})
		}
		if err := rows.Err(); err != nil {
			t.Fatal(err)
		}
		return refs
	}
	status := func(id int64) string {
		t.Helper()
		var s string
		if err := e.Pool.QueryRow(ctx, "SELECT status FROM event_outbox WHERE id = $1", id).Scan(&s); err != nil {
			t.Fatal(err)
		}
		return s
	}
	want := func(refs []outboxstore.Ref, st string) {
		t.Helper()
		for _, r := range refs {
			if got := status(r.ID); got != st {
				t.Errorf("row %d is %s, want %s", r.ID, got, st)
			}
		}
	}

	refs := insert(12)
	vanished, err := store.MarkProcessed(ctx, refs[1:11])
	if err != nil || len(vanished) != 0 {
		t.Fatalf("consecutive batch: vanished %v, %v", vanished, err)
	}
	want(refs[1:11], "processed")
	want([]outboxstore.Ref{refs[0], refs[11]}, "pending")

	refs = insert(10)
	gapped := append(append([]outboxstore.Ref{}, refs[:4]...), refs[5:]...)
	if _, err := store.MarkProcessed(ctx, gapped); err != nil {
		t.Fatal(err)
	}
	want(gapped, "processed")
	want(refs[4:5], "pending")

	refs = insert(10)
	if _, err := store.MarkProcessed(ctx, refs[2:3]); err != nil {
		t.Fatal(err)
	}
	if _, err := e.Pool.Exec(ctx, "DELETE FROM event_outbox WHERE id = $1", refs[6].ID); err != nil {
		t.Fatal(err)
	}
	vanished, err = store.MarkProcessed(ctx, refs)
	if err != nil {
		t.Fatal(err)
	}
	if len(vanished) != 1 || vanished[0] != refs[6].ID {
		t.Errorf("vanished = %v, want [%d]", vanished, refs[6].ID)
	}
	want(append(append([]outboxstore.Ref{}, refs[:6]...), refs[7:]...), "processed")
}
