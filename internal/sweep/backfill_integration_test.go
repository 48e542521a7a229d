package sweep_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/fixture"
	"github.com/outbox-streamer/outbox-streamer/internal/harness/testenv"
	"github.com/outbox-streamer/outbox-streamer/internal/outboxstore"
	"github.com/outbox-streamer/outbox-streamer/internal/pipeline"
	"github.com/outbox-streamer/outbox-streamer/internal/record"
	"github.com/outbox-streamer/outbox-streamer/internal/sweep"
	"github.com/outbox-streamer/outbox-streamer/replication"
	"github.com/outbox-streamer/outbox-streamer/sink"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// pipelineApp is the application_name of the pipeline's PostgreSQL sessions
// in these tests, so a test can wait for them to end (and so to have
// flushed their statistics).
const pipelineApp = "sweep-backfill-test"

// startPipeline runs the streaming pipeline on e (sessions named pipelineApp)
// and returns a stop func that drains it and returns Stream's result.
func startPipeline(t *testing.T, e *fixture.Env, sweepInterval time.Duration) (stop func() error) {
	t.Helper()
	cfg := pipeline.Config{
		Replication: replication.Config{DSN: withAppName(t, e.DSN, pipelineApp), Slot: e.Slot, Publication: e.Publication,
			StatusInterval: 100 * time.Millisecond},
		Run:           replication.RunConfig{BatchSize: 1000, BatchTimeout: 50 * time.Millisecond},
		Writer:        pipeline.WriterConfig{MaxInsertRows: 5000},
		Sink:          e.Sink,
		Retry:         outboxstore.RetryConfig{BaseDelay: 200 * time.Millisecond, MaxDelay: time.Second},
		SweepInterval: sweepInterval,
	}
	return fixture.StoppablePipeline(t, cfg, zaptest.NewLogger(t, zaptest.Level(zap.InfoLevel)))
}

// withAppName returns dsn with application_name set (URL or keyword/value form).
func withAppName(t *testing.T, dsn, name string) string {
	t.Helper()
	if !strings.Contains(dsn, "://") {
		return dsn + " application_name=" + name
	}
	u, err := url.Parse(dsn)
	if err != nil {
		t.Fatal(err)
	}
	q := u.Query()
	q.Set("application_name", name)
	u.RawQuery = q.Encode()
	return u.String()
}

// tableUpdates waits until no session named app is left (a backend flushes
// its statistics before it leaves pg_stat_activity) and returns the outbox's
// n_tup_upd and n_tup_hot_upd from pg_stat_user_tables.
func tableUpdates(t *testing.T, e *fixture.Env, app string) (upd, hot int64) {
	t.Helper()
	ctx := context.Background()
	fixture.WaitFor(t, time.Minute, "the pipeline's sessions to end", func() bool {
		var n int
		if err := e.Pool.QueryRow(ctx, "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", app).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n == 0
	})
	// Each statement outside a transaction reads a fresh statistics snapshot;
	// clear it anyway in case the connection had cached one.
	err := pgx.BeginFunc(ctx, e.Pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SELECT pg_stat_clear_snapshot()"); err != nil {
			return err
		}
		return tx.QueryRow(ctx, "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relid = $1::regclass",
			e.Outbox.Ident()).Scan(&upd, &hot)
	})
	if err != nil {
		t.Fatalf("read the outbox's table statistics: %v", err)
	}
	return upd, hot
}

// TestBackfillUpdatesEachRowOnce: the first start over a backlog committed
// before the slot delivers every row exactly once and writes each outbox row
// once (its status, pending → processed). Marking the backlog failed for the
// sweep first updated every row twice (and the sweep's claim locked it in
// between).
func TestBackfillUpdatesEachRowOnce(t *testing.T) {
	const rows = 20000
	e := fixture.New(t, testenv.ModernClickHouse(t))
	e.Insert(t, rows, false) // before the slot exists
	stop := startPipeline(t, e, time.Hour)
	e.AssertExactlyDelivered(t, 2*time.Minute, e.CurrentWAL(t))
	if err := stop(); err != nil {
		t.Fatalf("pipeline: %v", err)
	}
	upd, hot := tableUpdates(t, e, pipelineApp)
	t.Logf("outbox n_tup_upd %d (HOT %d) for %d backfilled rows", upd, hot, rows)
	if upd != rows {
		t.Fatalf("the backfill updated outbox rows %d times for %d rows, want once each", upd, rows)
	}
}

// cancelAfterInserts lets inserts through and cancels the backfill's context
// right after the after-th one succeeded: that page is in ClickHouse, and its
// transaction can no longer commit — a process dying between the two.
type cancelAfterInserts struct {
	sweep.Sink
	after  int32
	n      atomic.Int32
	cancel context.CancelFunc
}

func (c *cancelAfterInserts) Insert(ctx context.Context, events []record.Event) error {
	if err := c.Sink.Insert(ctx, events); err != nil {
		return err
	}
	if c.n.Add(1) == c.after {
		c.cancel()
	}
	return nil
}

// openSlot creates e's slot as a first start does and returns the stream
// (closed when the test ends) and its exported snapshot.
func openSlot(t *testing.T, e *fixture.Env) (*replication.Stream, string) {
	t.Helper()
	stream, err := replication.Open(context.Background(), replication.Config{DSN: e.DSN, Slot: e.Slot, Publication: e.Publication},
		zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = stream.Close() })
	created, snapshot := stream.SlotCreated()
	if !created {
		t.Fatal("the slot existed already")
	}
	return stream, snapshot
}

func openSink(t *testing.T, e *fixture.Env) *sink.Client {
	t.Helper()
	w, err := sink.Open(context.Background(), e.Sink, zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { w.Close() })
	return w
}

// TestInterruptedBackfillIsRescuedOnce: the backfill stops part-way with a
// page in ClickHouse but not committed (its context ends right after the
// insert). The restarted pipeline finds the slot (no second backfill); the
// sweep's rescue takes the rows still pending, the interrupted page's
// included, and delivers each exactly once.
func TestInterruptedBackfillIsRescuedOnce(t *testing.T) {
	const rows = 20000
	e := fixture.New(t, testenv.ModernClickHouse(t))
	e.Insert(t, rows, false)
	stream, snapshot := openSlot(t, e)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	cut := &cancelAfterInserts{Sink: openSink(t, e), after: 3, cancel: cancel}
	log := zaptest.NewLogger(t, zaptest.Level(zap.InfoLevel))
	s := sweep.New(sweep.Config{BatchSize: 1000}, e.Pool, cut, outboxstore.New(e.Pool, outboxstore.RetryConfig{}), log)
	res, err := s.Backfill(ctx, snapshot)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("interrupted backfill returned %v (%+v), want context.Canceled", err, res)
	}
	_ = stream.Close() // the slot stays, as after a crash
	inCH, _ := e.CHCounts(t)
	_, processed := e.Committed(t)
	t.Logf("interrupted: %d rows in ClickHouse, %d processed, statuses %v", inCH, processed, e.StatusCounts(t))
	if processed >= rows || int64(inCH) <= processed {
		t.Fatalf("want an interrupted page in ClickHouse but pending: %d rows in ClickHouse, %d of %d processed", inCH, processed, rows)
	}

	startPipeline(t, e, 300*time.Millisecond)
	e.AssertExactlyDelivered(t, 2*time.Minute, e.CurrentWAL(t))
}

// slowInserts delays each insert and closes first when the first one is done.
type slowInserts struct {
	sweep.Sink
	delay time.Duration
	once  sync.Once
	first chan struct{}
}

func (s *slowInserts) Insert(ctx context.Context, events []record.Event) error {
	time.Sleep(s.delay)
	err := s.Sink.Insert(ctx, events)
	s.once.Do(func() { close(s.first) })
	return err
}

// TestBackfillRacesRescue: a sweeper with the rescue (`run --sweep`) took its
// mark before the slot existed, so as soon as the slot is created its rescue
// may take the backlog's pending rows — while the backfill delivers them.
// Each row must reach ClickHouse once: the backfill's pages are locked until
// they commit (the rescue skips them), and it takes only rows still pending.
func TestBackfillRacesRescue(t *testing.T) {
	const rows = 5000
	e := fixture.New(t, testenv.ModernClickHouse(t))
	e.Insert(t, rows, false)
	ctx := context.Background()
	log := zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel))
	store := outboxstore.New(e.Pool, outboxstore.RetryConfig{})
	rescuer := sweep.New(sweep.Config{BatchSize: 500, Slot: e.Slot}, e.Pool, openSink(t, e), store, log)
	if _, err := rescuer.Run(ctx); err != nil { // no slot yet: only a mark
		t.Fatal(err)
	}
	_, snapshot := openSlot(t, e)

	// The delay is the window between a page's read and its insert: longer
	// than a rescue, a claim and a lookup, so a page read without a lock
	// would be delivered by the rescue's sweep as well.
	slow := &slowInserts{Sink: openSink(t, e), delay: 300 * time.Millisecond, first: make(chan struct{})}
	backfiller := sweep.New(sweep.Config{BatchSize: 500}, e.Pool, slow, store, log)
	var bres sweep.Result
	var berr error
	done := make(chan struct{})
	go func() { defer close(done); bres, berr = backfiller.Backfill(ctx, snapshot) }()
	<-slow.first
	var sres sweep.Result
	for finished := false; !finished; {
		select {
		case <-done:
			finished = true // one more sweep for rows rescued last
		default:
		}
		r, err := rescuer.Run(ctx)
		if err != nil {
			t.Fatalf("sweep beside the backfill: %v", err)
		}
		sres = sres.Add(r)
	}
	if berr != nil {
		t.Fatalf("backfill: %v", berr)
	}
	t.Logf("backfill delivered %d; the rescue took %d, its sweeps delivered %d (%d found in ClickHouse)",
		bres.Delivered, sres.Rescued, sres.Delivered, sres.AlreadyPresent)
	if bres.Delivered == 0 || sres.Rescued == 0 {
		t.Fatalf("the race did not happen: backfill delivered %d, rescue took %d", bres.Delivered, sres.Rescued)
	}
	if c, u := e.CHCounts(t); c != rows || u != rows {
		t.Fatalf("ClickHouse holds count()=%d uniqExact(event_id)=%d, want %d\n%s", c, u, rows, e.DescribeDuplicates(t))
	}
	if counts := e.StatusCounts(t); counts["processed"] != rows {
		t.Fatalf("statuses %v, want all %d processed", counts, rows)
	}
}

// lostAfterInserts passes inserts until the after-th, which reaches
// ClickHouse but answers as a dropped connection does; every later insert
// fails without reaching it.
type lostAfterInserts struct {
	sweep.Sink
	after int32
	n     atomic.Int32
}

func (l *lostAfterInserts) Insert(ctx context.Context, events []record.Event) error {
	n := l.n.Add(1)
	if n > l.after {
		return fmt.Errorf("insert %d rows: dial: %w", len(events), io.ErrUnexpectedEOF)
	}
	if err := l.Sink.Insert(ctx, events); err != nil {
		return err
	}
	if n == l.after {
		return fmt.Errorf("insert %d rows: read: %w", len(events), io.ErrUnexpectedEOF)
	}
	return nil
}

// TestBackfillLeavesTheRestToTheSweepWhenClickHouseFails: ClickHouse takes a
// page but the answer is lost and it stays unreachable; the backfill rolls
// that page back and hands it, with the rest of the backlog, to the sweep
// instead of holding up the start. The sweep delivers each row once (the
// lost page is found in ClickHouse).
func TestBackfillLeavesTheRestToTheSweepWhenClickHouseFails(t *testing.T) {
	const rows = 5000
	e := fixture.New(t, testenv.ModernClickHouse(t))
	e.Insert(t, rows, false)
	_, snapshot := openSlot(t, e)
	ctx := context.Background()
	log := zaptest.NewLogger(t, zaptest.Level(zap.InfoLevel))
	store := outboxstore.New(e.Pool, outboxstore.RetryConfig{})
	lost := &lostAfterInserts{Sink: openSink(t, e), after: 3}
	res, err := sweep.New(sweep.Config{BatchSize: 500, Workers: 1}, e.Pool, lost, store, log).Backfill(ctx, snapshot)
	if err != nil {
		t.Fatalf("backfill: %v", err)
	}
	if res.Delivered != 1000 || res.HandedOver != rows-1000 || res.Backfilled != rows {
		t.Fatalf("backfill %+v, want 1000 delivered and %d handed to the sweep", res, rows-1000)
	}
	if counts := e.StatusCounts(t); counts["failed"] != rows-1000 {
		t.Fatalf("statuses %v, want %d failed (due, for the sweep)", counts, rows-1000)
	}
	sres, err := sweep.New(sweep.Config{BatchSize: 500}, e.Pool, openSink(t, e), store, log).Run(ctx)
	if err != nil {
		t.Fatalf("sweep: %v", err)
	}
	if sres.AlreadyPresent != 500 || sres.Delivered != rows-1500 {
		t.Fatalf("sweep %+v, want the lost page (500) found in ClickHouse and %d delivered", sres, rows-1500)
	}
	if c, u := e.CHCounts(t); c != rows || u != rows {
		t.Fatalf("ClickHouse holds count()=%d uniqExact(event_id)=%d, want %d\n%s", c, u, rows, e.DescribeDuplicates(t))
	}
	if counts := e.StatusCounts(t); counts["processed"] != rows {
		t.Fatalf("statuses %v, want all %d processed", counts, rows)
	}
}
