package metrics

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/zap/zaptest"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/testenv"
	"github.com/outbox-streamer/outbox-streamer/internal/outboxstore"
	"github.com/outbox-streamer/outbox-streamer/migrations"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// downDB fails every query, like a PostgreSQL that is unreachable.
type downDB struct{ calls int }

type errRow struct{ err error }

func (r errRow) Scan(...any) error { return r.err }

var errDown = errors.New("connection refused")

func (d *downDB) Query(context.Context, string, ...any) (pgx.Rows, error) {
	d.calls++
	return nil, errDown
}

func (d *downDB) QueryRow(context.Context, string, ...any) pgx.Row {
	d.calls++
	return errRow{errDown}
}

func TestPollerCountsErrorsAndKeepsRunning(t *testing.T) {
	m := New()
	db := &downDB{}
	p, err := NewSlotPoller(PollerConfig{Slot: "s", Interval: time.Millisecond}, db, m, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Poll(context.Background()); !errors.Is(err, errDown) {
		t.Fatalf("Poll = %v, want the database's error", err)
	}
	if got := testutil.ToFloat64(m.errors.WithLabelValues(StagePoller)); got != 3 {
		t.Errorf(`errors_total{stage="slot_poller"} = %v after one failed poll, want 3 (slot, max_slot_wal_keep_size and outbox)`, got)
	}

	// Run keeps polling through failures and returns nil when its context ends.
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	deadline := time.Now().Add(10 * time.Second)
	for testutil.ToFloat64(m.errors.WithLabelValues(StagePoller)) < 10 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Run = %v, want nil", err)
	}
	if got := testutil.ToFloat64(m.errors.WithLabelValues(StagePoller)); got < 10 {
		t.Errorf("Run stopped polling after failures: %v errors counted", got)
	}
}

func TestPollerConfigValidate(t *testing.T) {
	if _, err := NewSlotPoller(PollerConfig{}, &downDB{}, nil, nil); err == nil {
		t.Error("a poller without a slot name was accepted")
	}
	c := PollerConfig{Slot: "s"}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if c.Interval != 10*time.Second || c.Timeout != 5*time.Second || c.Schema != "public" || c.Table != "event_outbox" {
		t.Errorf("defaults not filled: %+v", c)
	}
}

// outboxDB returns a pool on a fresh database holding the project's outbox schema.
func outboxDB(t *testing.T) *pgxpool.Pool {
	t.Helper()
	if testing.Short() {
		t.Skip("needs PostgreSQL (skipped with -short)")
	}
	dsn := testenv.NewDatabase(t)
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	sqls, err := migrations.Rendered("postgres", migrations.PostgresData("outbox_pub"))
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range slices.Sorted(maps.Keys(sqls)) {
		if sql := sqls[name]; strings.HasSuffix(name, ".up.sql") {
			if _, err := pool.Exec(ctx, sql); err != nil {
				t.Fatalf("apply %s: %v", name, err)
			}
		}
	}
	return pool
}

func TestPollerAgainstPostgres(t *testing.T) {
	pool := outboxDB(t)
	ctx := context.Background()
	slot := "poller_" + fmt.Sprint(time.Now().UnixNano()%1e9)

	m := New()
	p, err := NewSlotPoller(PollerConfig{Slot: slot}, pool, m, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}

	// No slot yet, empty outbox.
	if err := p.Poll(ctx); err != nil {
		t.Fatal(err)
	}
	if got := testutil.ToFloat64(m.slotActive.WithLabelValues(slot)); got != 0 {
		t.Errorf("slot_active of a missing slot = %v", got)
	}
	if n := testutil.CollectAndCount(m.slotLag); n != 0 {
		t.Errorf("slot_lag_bytes reported for a missing slot")
	}
	for _, st := range WALStatuses {
		if got := testutil.ToFloat64(m.slotWALStatus.WithLabelValues(slot, st)); got != 0 {
			t.Errorf("slot_wal_status{status=%q} = %v for a missing slot, want 0", st, got)
		}
	}
	// The WAL position is the server's: known without the slot.
	var current float64
	if err := pool.QueryRow(ctx, "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::float8").Scan(&current); err != nil {
		t.Fatal(err)
	}
	if pos := testutil.ToFloat64(m.walPosition); pos <= 0 || pos > current {
		t.Errorf("wal_position_bytes = %v, want in (0, %v], the position read just after", pos, current)
	}
	// max_slot_wal_keep_size in bytes, -1 for unlimited, whatever unit SHOW uses.
	var keep string
	if err := pool.QueryRow(ctx, "SHOW max_slot_wal_keep_size").Scan(&keep); err != nil {
		t.Fatal(err)
	}
	if got := testutil.ToFloat64(m.walKeepSize); (keep == "-1") != (got == -1) || got == 0 {
		t.Errorf("max_slot_wal_keep_size_bytes = %v with max_slot_wal_keep_size %s", got, keep)
	}

	if _, err := pool.Exec(ctx, "SELECT pg_create_logical_replication_slot($1, 'pgoutput')", slot); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_, _ = pool.Exec(context.Background(), "SELECT pg_drop_replication_slot($1)", slot)
	})
	// 300 delivered rows, 5 pending (the oldest an hour old), 2 failed, 1 dead; then
	// ANALYZE so reltuples is exact for the processed estimate.
	if _, err := pool.Exec(ctx, `INSERT INTO event_outbox (event_type, event_date_time, status, created_at)
		SELECT 't', now(), s, (now() AT TIME ZONE 'UTC') - age
		FROM (SELECT 'processed' AS s, interval '2 hours' AS age FROM generate_series(1, 300)
		      UNION ALL SELECT 'pending', interval '1 minute' FROM generate_series(1, 4)
		      UNION ALL SELECT 'pending', interval '1 hour'
		      UNION ALL SELECT 'failed', interval '10 minutes' FROM generate_series(1, 2)
		      UNION ALL SELECT 'dead', interval '3 hours') AS rows`); err != nil {
		t.Fatal(err)
	}
	if _, err := pool.Exec(ctx, "ANALYZE event_outbox"); err != nil {
		t.Fatal(err)
	}

	if err := p.Poll(ctx); err != nil {
		t.Fatal(err)
	}
	for st, want := range map[string]float64{"pending": 5, "failed": 2, "dead": 1, "processed": 300} {
		if got := testutil.ToFloat64(m.outboxRows.WithLabelValues(st)); got != want {
			t.Errorf("outbox_rows{status=%q} = %v, want %v", st, got, want)
		}
	}
	// The dead row is older, but it is parked, not waiting: the age is the pending one's.
	if age := testutil.ToFloat64(m.oldestUndelivered); age < 3590 || age > 3700 {
		t.Errorf("oldest_undelivered_age_seconds = %v, want about 3600", age)
	}
	if got := testutil.ToFloat64(m.slotActive.WithLabelValues(slot)); got != 0 {
		t.Errorf("slot_active = %v for a slot nobody streams from", got)
	}
	// The inserts happened after the slot was created: the slot lags by at least their WAL.
	if lag := testutil.ToFloat64(m.slotLag.WithLabelValues(slot)); lag <= 0 {
		t.Errorf("slot_lag_bytes = %v, want > 0 after writes past the slot", lag)
	}
	if ret := testutil.ToFloat64(m.slotRetained.WithLabelValues(slot)); ret < testutil.ToFloat64(m.slotLag.WithLabelValues(slot)) {
		t.Errorf("slot_retained_wal_bytes = %v, smaller than the lag", ret)
	}
	// A fresh slot's WAL is within max_wal_size.
	if got := testutil.ToFloat64(m.slotWALStatus.WithLabelValues(slot, "reserved")); got != 1 {
		t.Errorf(`slot_wal_status{status="reserved"} = %v for a fresh slot, want 1`, got)
	}
	if safe := testutil.CollectAndCount(m.slotSafeWAL); (keep == "-1") != (safe == 0) {
		t.Errorf("max_slot_wal_keep_size %s but %d safe_wal_size series", keep, safe)
	}

	// A missing table is an error for the outbox part, but the slot is still read.
	p2, err := NewSlotPoller(PollerConfig{Slot: slot, Table: "no_such_table"}, pool, m, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := p2.Poll(ctx); err == nil || !strings.Contains(err.Error(), "no_such_table") {
		t.Errorf("Poll of a missing table = %v", err)
	}
}

// TestWALKeepSizeQueryConvertsUnits: the query converts what SHOW prints, in any
// unit, to bytes, and -1 (unlimited) stays -1. The server's own setting cannot be
// changed here (it is server-wide and other tests share the server), so the same
// conversion runs on the forms SHOW prints.
func TestWALKeepSizeQueryConvertsUnits(t *testing.T) {
	pool := outboxDB(t)
	ctx := context.Background()
	query := strings.Replace(walKeepSizeQuery, "current_setting('max_slot_wal_keep_size', true)", "$1::text", 1)
	if query == walKeepSizeQuery {
		t.Fatal("walKeepSizeQuery no longer reads current_setting('max_slot_wal_keep_size', true)")
	}
	for in, want := range map[string]int64{"-1": -1, "0": 0, "1500MB": 1500 << 20, "4GB": 4 << 30, "2TB": 2 << 40, "64kB": 64 << 10} {
		var got *int64
		if err := pool.QueryRow(ctx, query, in).Scan(&got); err != nil {
			t.Fatalf("%s: %v", in, err)
		}
		if got == nil || *got != want {
			t.Errorf("%s: %v bytes, want %d", in, got, want)
		}
	}
	var got *int64
	if err := pool.QueryRow(ctx, query, nil).Scan(&got); err != nil || got != nil {
		t.Errorf("no setting (before PostgreSQL 13): %v, %v; want NULL", got, err)
	}
}

// TestOutboxQueryUsesThePartialIndex guards the promise that a poll never scans the
// whole table: with many processed rows the planner must read the partial index.
func TestOutboxQueryUsesThePartialIndex(t *testing.T) {
	pool := outboxDB(t)
	ctx := context.Background()
	if _, err := pool.Exec(ctx, `INSERT INTO event_outbox (event_type, event_date_time, status)
		SELECT 't', now(), CASE WHEN g % 5000 = 0 THEN 'pending' ELSE 'processed' END
		FROM generate_series(1, 200000) AS g`); err != nil {
		t.Fatal(err)
	}
	if _, err := pool.Exec(ctx, "ANALYZE event_outbox"); err != nil {
		t.Fatal(err)
	}
	rows, err := pool.Query(ctx, "EXPLAIN "+outboxstore.BacklogQuery(outboxstore.Name{Schema: "public", Table: "event_outbox"}))
	if err != nil {
		t.Fatal(err)
	}
	plan, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	text := strings.Join(plan, "\n")
	if strings.Contains(text, "Seq Scan") || !strings.Contains(text, "event_outbox_undelivered_idx") {
		t.Errorf("the outbox query does not use the partial index:\n%s", text)
	}
}

// TestPollNowPollsAtOnce: when streaming starts the slot's gauges must not wait
// a whole interval (5 s after `run` they used to be empty): PollNow makes
// Run poll at once.
func TestPollNowPollsAtOnce(t *testing.T) {
	pool := outboxDB(t)
	ctx := context.Background()
	slot := "poll_now_slot"
	m := New()
	p, err := NewSlotPoller(PollerConfig{Slot: slot, Interval: time.Hour}, pool, m, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	rctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { defer close(done); _ = p.Run(rctx) }()
	defer func() { cancel(); <-done }()
	// The first poll (at Run's start) sets the outbox gauges and sees no slot.
	deadline := time.Now().Add(30 * time.Second)
	for testutil.CollectAndCount(m.outboxRows) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("no first poll")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if n := testutil.CollectAndCount(m.slotLag); n != 0 {
		t.Fatalf("slot_lag_bytes before the slot exists: %d series", n)
	}
	if _, err := pool.Exec(ctx, "SELECT pg_create_logical_replication_slot($1, 'pgoutput')", slot); err != nil {
		t.Fatal(err)
	}
	defer pool.Exec(context.Background(), "SELECT pg_drop_replication_slot($1)", slot) //nolint:errcheck // cleanup
	p.PollNow()
	for testutil.CollectAndCount(m.slotLag) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("PollNow did not poll within 30 s (the interval is an hour)")
		}
		time.Sleep(20 * time.Millisecond)
	}
}
