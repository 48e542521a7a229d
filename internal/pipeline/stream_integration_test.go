package pipeline_test

import (
	"context"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/fixture"
	"github.com/outbox-streamer/outbox-streamer/internal/harness/testenv"
	"github.com/outbox-streamer/outbox-streamer/internal/pipeline"
	"github.com/outbox-streamer/outbox-streamer/internal/record"
	"github.com/outbox-streamer/outbox-streamer/replication"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// running is a pipeline started in the background.
type running struct {
	cancel context.CancelFunc
	done   chan error
}

func start(t *testing.T, e *fixture.Env, wrap func(pipeline.Sink) pipeline.Sink, opts ...func(*pipeline.Config)) *running {
	t.Helper()
	cfg := pipeline.Config{
		Replication: replication.Config{DSN: e.DSN, Slot: e.Slot, Publication: e.Publication, StatusInterval: 100 * time.Millisecond},
		Run:         replication.RunConfig{BatchSize: 1000, BatchTimeout: 50 * time.Millisecond},
		Sink:        e.Sink,
		WrapSink:    wrap,
		// Rows that land in the slot's creation snapshot are backfilled; the sweep
		// delivers them.
		SweepInterval: time.Second,
	}
	for _, o := range opts {
		o(&cfg)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{cancel: cancel, done: make(chan error, 1)}
	log := zaptest.NewLogger(t, zaptest.Level(zap.InfoLevel))
	go func() { r.done <- pipeline.Stream(ctx, context.Background(), cfg, log) }()
	t.Cleanup(func() { r.stop(t) })
	return r
}

// stop cancels the pipeline (as SIGTERM does) and waits for its drain.
func (r *running) stop(t *testing.T) {
	t.Helper()
	if r.cancel == nil {
		return
	}
	r.cancel()
	r.cancel = nil
	select {
	case err := <-r.done:
		if err != nil {
			t.Errorf("pipeline returned %v", err)
		}
	case <-time.After(time.Minute):
		t.Error("pipeline did not stop within a minute")
	}
}

// TestStreamDeliversExactlyTheCommittedEvents streams 100,000 events in transactions
// of 1, 100 and 10,000 rows, with rolled-back transactions, savepoints and
// concurrent interleaved transactions committing out of id order, into each
// ClickHouse version.
func TestStreamDeliversExactlyTheCommittedEvents(t *testing.T) {
	for _, srv := range testenv.ClickHouseServers(t) {
		t.Run(srv.Name, func(t *testing.T) {
			e := fixture.New(t, srv)
			r := start(t, e, nil)
			e.WaitStreaming(t)
			began := time.Now()

			// 2,000 single-row transactions, with a rollback every tenth.
			for i := 0; i < 2000; i++ {
				e.Insert(t, 1, false)
				if i%10 == 0 {
					e.Insert(t, 1, true)
				}
			}
			// 380 transactions of 100 rows, 20 more rolled back.
			for i := 0; i < 400; i++ {
				e.Insert(t, 100, i%20 == 7)
			}
			// 6 transactions of 10,000 rows (larger than a batch), one rolled back.
			for i := 0; i < 6; i++ {
				e.Insert(t, 10000, i == 2)
			}
			// Savepoints: keep 30 of 50 rows.
			e.InsertTx(t, func(tx pgx.Tx) error {
				ctx := context.Background()
				if _, err := tx.Exec(ctx, insertN, 30); err != nil {
					return err
				}
				if _, err := tx.Exec(ctx, "SAVEPOINT sp"); err != nil {
					return err
				}
				if _, err := tx.Exec(ctx, insertN, 20); err != nil {
					return err
				}
				_, err := tx.Exec(ctx, "ROLLBACK TO SAVEPOINT sp")
				return err
			})
			// Interleaved concurrent transactions: ids are taken in one order and
			// committed in the reverse one.
			interleave(t, e, 8, 9970)

			walPos := e.CurrentWAL(t)
			total, _ := e.Committed(t)
			if total != 100000 {
				t.Fatalf("test set-up committed %d rows, want 100000", total)
			}
			e.AssertExactlyDelivered(t, 3*time.Minute, walPos)
			elapsed := time.Since(began)
			t.Logf("%s: %d committed events delivered in %s (%.0f rows/s, producer included)",
				srv.Name, total, elapsed.Round(time.Millisecond), float64(total)/elapsed.Seconds())
			r.stop(t)
		})
	}
}

// insertSizes records the rows of every ClickHouse insert.
type insertSizes struct {
	pipeline.Sink
	mu    sync.Mutex
	sizes []int
}

func (s *insertSizes) Insert(ctx context.Context, events []record.Event) error {
	s.mu.Lock()
	s.sizes = append(s.sizes, len(events))
	s.mu.Unlock()
	return s.Sink.Insert(ctx, events)
}

// TestFullBatchesWaitForOneInsert: batches that arrive full mean rows are
// flowing, and the writer waits for the ones behind them instead of sending
// each as it comes: a 5,000-row transaction cut into ten full batches of
// 500 goes to ClickHouse as one insert of 5,000 rows, exactly once.
func TestFullBatchesWaitForOneInsert(t *testing.T) {
	e := fixture.New(t, testenv.ModernClickHouse(t))
	sizes := &insertSizes{}
	start(t, e, func(s pipeline.Sink) pipeline.Sink { sizes.Sink = s; return sizes }, func(c *pipeline.Config) {
		// The timeout bounds the wait; long, so that only the batches' arrival ends it.
		c.Run = replication.RunConfig{BatchSize: 500, BatchTimeout: time.Minute}
		c.Writer.MaxInsertRows = 5000
	})
	e.WaitStreaming(t)
	e.Insert(t, 5000, false)
	e.AssertExactlyDelivered(t, 2*time.Minute, e.CurrentWAL(t))
	sizes.mu.Lock()
	defer sizes.mu.Unlock()
	if len(sizes.sizes) != 1 || sizes.sizes[0] != 5000 {
		t.Fatalf("rows per ClickHouse insert %v, want [5000]: the writer sent full batches without waiting for those behind them", sizes.sizes)
	}
}

// TestStopWhileIdleIsPrompt: a stop interrupts a receive that waits for the
// next message, however far off the next status update is (an hour here):
// the pipeline drains, acknowledges and returns, and what it delivered stays
// delivered once.
func TestStopWhileIdleIsPrompt(t *testing.T) {
	e := fixture.New(t, testenv.ModernClickHouse(t))
	r := start(t, e, nil, func(c *pipeline.Config) {
		c.Replication.StatusInterval = time.Hour
		// No keepalives either: nothing but the stop may wake the receive.
		c.Replication.DSN = withParam(c.Replication.DSN, "options", "-c wal_sender_timeout=0")
	})
	e.WaitStreaming(t)
	e.Insert(t, 10, false)
	walPos := e.CurrentWAL(t)
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(50 * time.Millisecond) {
		if _, processed := e.Committed(t); processed == 10 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the 10 rows were not processed within a minute")
		}
	}
	r.stop(t) // fails the test if the pipeline has not returned within a minute
	// The stop's acknowledgement confirmed the rows: nothing to replay.
	e.AssertExactlyDelivered(t, time.Minute, walPos)
}

// withParam adds a query parameter to a URL DSN.
func withParam(dsn, key, value string) string {
	sep := "?"
	if strings.Contains(dsn, "?") {
		sep = "&"
	}
	return dsn + sep + url.QueryEscape(key) + "=" + strings.ReplaceAll(url.QueryEscape(value), "+", "%20")
}

const insertN = `INSERT INTO event_outbox (event_type, event_date_time, event_context)
	SELECT 'sp', now() AT TIME ZONE 'UTC', '{}' FROM generate_series(1, $1)`

// interleave opens n transactions, inserts rows round-robin into them, and commits
// them in reverse order.
func interleave(t *testing.T, e *fixture.Env, n, rows int) {
	t.Helper()
	ctx := context.Background()
	txs := make([]pgx.Tx, n)
	for i := range txs {
		tx, err := e.Pool.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		txs[i] = tx
	}
	for i := 0; i < rows; i++ {
		if _, err := txs[i%n].Exec(ctx, insertN, 1); err != nil {
			t.Fatal(err)
		}
	}
	for i := n - 1; i >= 0; i-- {
		if err := txs[i].Commit(ctx); err != nil {
			t.Fatal(err)
		}
	}
}

// gatedSink holds inserts until released.
type gatedSink struct {
	pipeline.Sink
	entered chan struct{}
	release chan struct{}
	once    sync.Once
}

func (g *gatedSink) Insert(ctx context.Context, events []record.Event) error {
	g.once.Do(func() { close(g.entered) })
	select {
	case <-g.release:
	case <-ctx.Done():
		return ctx.Err()
	}
	return g.Sink.Insert(ctx, events)
}

// TestAcknowledgeOnlyAfterClickHouseAccepted holds the ClickHouse insert back and
// checks that meanwhile the slot's confirmed LSN does not pass the transaction and no
// row turns processed; after the release both happen.
func TestAcknowledgeOnlyAfterClickHouseAccepted(t *testing.T) {
	e := fixture.New(t, testenv.ModernClickHouse(t))
	gate := &gatedSink{entered: make(chan struct{}), release: make(chan struct{})}
	start(t, e, func(s pipeline.Sink) pipeline.Sink { gate.Sink = s; return gate })
	e.WaitStreaming(t)

	e.Insert(t, 500, false)
	after := e.CurrentWAL(t)
	select {
	case <-gate.entered:
	case <-time.After(time.Minute):
		t.Fatal("the insert never reached the sink")
	}
	// Several status intervals (100 ms) pass while the insert is held.
	for i := 0; i < 10; i++ {
		if got := e.ConfirmedFlush(t); got >= after {
			t.Fatalf("confirmed LSN %X passed the held transaction (ends before %X)", got, after)
		}
		if _, processed := e.Committed(t); processed != 0 {
			t.Fatalf("%d rows processed while the insert is held", processed)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if c, _ := e.CHCounts(t); c != 0 {
		t.Fatalf("ClickHouse has %d rows before the release", c)
	}
	close(gate.release)
	e.AssertExactlyDelivered(t, time.Minute, after)
}

// TestRestartMidTransactionIsExactlyOnce stops the pipeline (the SIGTERM path) while a
// transaction larger than a batch is half delivered, then starts it again: the
// replayed rows already in ClickHouse are recognised, nothing is lost or doubled.
func TestRestartMidTransactionIsExactlyOnce(t *testing.T) {
	for _, srv := range testenv.ClickHouseServers(t) {
		t.Run(srv.Name, func(t *testing.T) {
			e := fixture.New(t, srv)
			var inserts int
			var mu sync.Mutex
			stopped := make(chan struct{})
			var r *running
			// Stop after the second batch of the big transaction is in ClickHouse.
			r = start(t, e, func(s pipeline.Sink) pipeline.Sink {
				return &countingSink{Sink: s, after: func() {
					mu.Lock()
					defer mu.Unlock()
					inserts++
					if inserts == 2 {
						close(stopped)
					}
				}}
			})
			e.WaitStreaming(t)
			// Far larger than what the stream buffers (a batch being built, one
			// queued, one held), so the stop lands inside the transaction.
			e.Insert(t, 20000, false)
			<-stopped
			r.stop(t)
			c, _ := e.CHCounts(t)
			if c == 0 || c >= 20000 {
				t.Fatalf("after the stop ClickHouse has %d rows; the test needs a partly delivered transaction", c)
			}
			if got, want := e.ConfirmedFlush(t), e.CurrentWAL(t); got >= want {
				t.Fatalf("slot acknowledged %X, past the partly delivered transaction", got)
			}
			e.Insert(t, 1000, false)
			walPos := e.CurrentWAL(t)
			start(t, e, nil)
			e.AssertExactlyDelivered(t, 2*time.Minute, walPos)
		})
	}
}

type countingSink struct {
	pipeline.Sink
	after func()
}

func (c *countingSink) Insert(ctx context.Context, events []record.Event) error {
	err := c.Sink.Insert(ctx, events)
	if err == nil {
		c.after()
	}
	return err
}
