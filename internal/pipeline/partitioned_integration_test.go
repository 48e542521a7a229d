package pipeline_test

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/fixture"
	"github.com/outbox-streamer/outbox-streamer/internal/harness/testenv"
	"github.com/outbox-streamer/outbox-streamer/internal/outboxstore"
	"github.com/outbox-streamer/outbox-streamer/internal/pipeline"
	"github.com/outbox-streamer/outbox-streamer/outbox"
)

// TestPartitionedOutbox (issue 12): event_outbox range-partitioned by
// created_at streams as event_outbox, exactly once, across partition
// boundaries — a transaction writing into two partitions and the default one
// included —, the producer package works unchanged, rows older than the slot
// are backfilled, and retention drops an old partition whole once all its rows
// are processed while keeping one that still holds a failed row; ClickHouse
// keeps every event.
func TestPartitionedOutbox(t *testing.T) {
	e := fixture.NewPartitioned(t, testenv.ModernClickHouse(t), time.Hour)
	ctx := context.Background()
	log := zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel))
	// Two partitions three days back, for retention to find.
	old := time.Now().UTC().Add(-72 * time.Hour)
	if _, err := outboxstore.EnsurePartitions(ctx, e.Pool, outboxstore.DefaultName, time.Hour, old, time.UTC, 0, 1, log); err != nil {
		t.Fatal(err)
	}
	oldA := old.Truncate(time.Hour).Add(10 * time.Minute)
	oldB := oldA.Add(time.Hour)
	nameA, nameB := "event_outbox_p"+oldA.Format("20060102_15")+"00", "event_outbox_p"+oldB.Format("20060102_15")+"00"
	names := func() map[string]bool {
		parts, err := outboxstore.Partitions(ctx, e.Pool, outboxstore.DefaultName)
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]bool{}
		for _, p := range parts {
			out[p.Name] = true
		}
		return out
	}
	if !names()[nameA] || !names()[nameB] {
		t.Fatalf("partitions %s, %s missing: %v", nameA, nameB, names())
	}
	insertAt := func(tx pgx.Tx, n int, at time.Time) error {
		_, err := tx.Exec(ctx, `INSERT INTO event_outbox (event_type, event_date_time, created_at)
			SELECT 'p', now() AT TIME ZONE 'UTC', $2 FROM generate_series(1, $1)`, n, at)
		return err
	}
	// Before the slot: backfilled. And a row in the same old partition that
	// failed and is not due for a day: it holds the partition back.
	e.InsertTx(t, func(tx pgx.Tx) error { return insertAt(tx, 100, oldA) })
	var failedID int64
	if err := e.Pool.QueryRow(ctx, `INSERT INTO event_outbox (event_type, event_date_time, created_at, status, next_attempt_at)
		VALUES ('held', now() AT TIME ZONE 'UTC', $1, 'failed', now() + interval '1 day') RETURNING id`, oldA).Scan(&failedID); err != nil {
		t.Fatal(err)
	}

	startWith(t, e, func(c *pipeline.Config) {
		c.SweepInterval = 300 * time.Millisecond
		c.Retention = 48 * time.Hour
		c.PartitionInterval = time.Hour
	})
	e.WaitStreaming(t)
	// One transaction over two old partitions, the current one and the
	// default partition (a time no partition covers).
	e.InsertTx(t, func(tx pgx.Tx) error {
		for _, at := range []time.Time{oldA, oldB, time.Now().UTC(), time.Now().UTC().Add(24 * 365 * time.Hour)} {
			if err := insertAt(tx, 250, at); err != nil {
				return err
			}
		}
		return nil
	})
	// The producer package, unchanged.
	e.InsertTx(t, func(tx pgx.Tx) error {
		_, err := outbox.AppendBatch(ctx, tx, []outbox.Event{{Type: "producer", Time: time.Now()}, {Type: "producer", Time: time.Now()}})
		return err
	})
	// Every event once in ClickHouse, wherever its row lives (not counted in
	// the outbox: retention may already be removing the old processed ones).
	fixture.WaitFor(t, time.Minute, "1102 events in ClickHouse", func() bool { c, _ := e.CHCounts(t); return c >= 1102 })
	waitCaughtUp(t, e, time.Minute)
	if c, u := e.CHCounts(t); c != 1102 || u != 1102 {
		t.Fatalf("ClickHouse holds count=%d uniq=%d, want 1102 once", c, u)
	}
	// Retention: partition B (all processed) goes whole; A is kept while it
	// holds the failed row.
	fixture.WaitFor(t, time.Minute, "the old all-processed partition dropped", func() bool { return !names()[nameB] })
	if !names()[nameA] {
		t.Fatalf("partition %s was dropped although it holds failed row %d", nameA, failedID)
	}
	// Its processed rows went row by row; the failed one stays.
	fixture.WaitFor(t, time.Minute, "processed rows of the kept partition pruned", func() bool {
		var n int64
		_ = e.Pool.QueryRow(ctx, "SELECT count(*) FROM event_outbox WHERE created_at = $1", oldA).Scan(&n)
		return n == 1
	})
	// The sweep on a partitioned outbox: the failed row is due, ClickHouse
	// has it, it becomes processed — and its partition can go.
	if _, err := e.Pool.Exec(ctx, "UPDATE event_outbox SET next_attempt_at = now() WHERE id = $1", failedID); err != nil {
		t.Fatal(err)
	}
	fixture.WaitFor(t, time.Minute, "the kept partition dropped once its last row was delivered", func() bool { return !names()[nameA] })
	// The safety net on a partitioned outbox: a current row set back to
	// pending by hand is rescued, and not delivered twice.
	if _, err := e.Pool.Exec(ctx, "UPDATE event_outbox SET status = 'pending' WHERE id = (SELECT max(id) FROM event_outbox WHERE event_type = 'producer')"); err != nil {
		t.Fatal(err)
	}
	fixture.WaitFor(t, time.Minute, "the reset row processed again", func() bool {
		var n int64
		_ = e.Pool.QueryRow(ctx, "SELECT count(*) FROM event_outbox WHERE status <> 'processed'").Scan(&n)
		return n == 0
	})
	if c, u := e.CHCounts(t); c != 1103 || u != 1103 {
		t.Fatalf("after retention ClickHouse holds count=%d uniq=%d, want the 1103 events", c, u)
	}
}

// conversionSQL returns the SQL blocks of the conversion guide in
// docs/partitioned-outbox.md, with its example cutover replaced.
func conversionSQL(t *testing.T, cutover time.Time) []string {
	t.Helper()
	doc, err := os.ReadFile("../../docs/partitioned-outbox.md")
	if err != nil {
		t.Fatal(err)
	}
	text := string(doc)
	i := strings.Index(text, "## Converting an existing unpartitioned outbox")
	if i < 0 {
		t.Fatal("the guide has no conversion section")
	}
	var blocks []string
	for _, part := range strings.Split(text[i:], "```sql\n")[1:] {
		block, _, ok := strings.Cut(part, "```")
		if !ok {
			t.Fatal("unterminated SQL block in the guide")
		}
		blocks = append(blocks, strings.ReplaceAll(block, "2026-12-02 00:00:00", cutover.Format("2006-01-02 15:04:05")))
	}
	if len(blocks) != 2 {
		t.Fatalf("the guide has %d SQL blocks, want 2", len(blocks))
	}
	return blocks
}

// TestConvertUnpartitionedOutbox runs the conversion guide of
// docs/partitioned-outbox.md against an outbox that streams throughout: every
// event before, during and after the swap reaches ClickHouse once, rows after
// the cutover land in partitions the leader created, and the old table is a
// partition.
func TestConvertUnpartitionedOutbox(t *testing.T) {
	e := fixture.New(t, testenv.ModernClickHouse(t))
	ctx := context.Background()
	startWith(t, e, func(c *pipeline.Config) {
		c.SweepInterval = 300 * time.Millisecond
		c.PartitionInterval = 24 * time.Hour
	})
	e.WaitStreaming(t)
	e.Insert(t, 300, false)
	cutover := time.Now().UTC().Truncate(24 * time.Hour).Add(24 * time.Hour)
	blocks := conversionSQL(t, cutover)
	// The first block runs statement by statement (CREATE INDEX CONCURRENTLY
	// cannot run in a transaction), while events keep coming.
	for _, stmt := range strings.Split(blocks[0], ";\n") {
		if strings.TrimSpace(stmt) == "" {
			continue
		}
		if _, err := e.Pool.Exec(ctx, stmt); err != nil {
			t.Fatalf("%s: %v", stmt, err)
		}
		e.Insert(t, 50, false)
	}
	// The swap, as one script.
	if _, err := e.Pool.Exec(ctx, blocks[1]); err != nil {
		t.Fatalf("conversion: %v", err)
	}
	partitioned, err := outboxstore.Partitioned(ctx, e.Pool, outboxstore.DefaultName)
	if err != nil || !partitioned {
		t.Fatalf("event_outbox partitioned after the guide: %v %v", partitioned, err)
	}
	e.Insert(t, 300, false) // before the cutover: into the old table
	dayAfter := cutover.Add(12 * time.Hour)
	fixture.WaitFor(t, time.Minute, "the leader to create the partitions from the cutover on", func() bool {
		parts, err := outboxstore.Partitions(ctx, e.Pool, outboxstore.DefaultName)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range parts {
			if !p.Default && !p.From.After(dayAfter) && p.To.After(dayAfter) && p.Name != "event_outbox_legacy" {
				return true
			}
		}
		return false
	})
	if _, err := e.Pool.Exec(ctx, `INSERT INTO event_outbox (event_type, event_date_time, created_at)
		SELECT 'after', now() AT TIME ZONE 'UTC', $1 FROM generate_series(1, 100)`, dayAfter); err != nil {
		t.Fatal(err)
	}
	var inLegacy, total int64
	if err := e.Pool.QueryRow(ctx, "SELECT (SELECT count(*) FROM event_outbox_legacy), (SELECT count(*) FROM event_outbox)").Scan(&inLegacy, &total); err != nil {
		t.Fatal(err)
	}
	if total-inLegacy != 100 {
		t.Fatalf("%d of %d rows outside the old table, want the 100 after the cutover", total-inLegacy, total)
	}
	e.AssertExactlyDelivered(t, time.Minute, e.CurrentWAL(t))
}
