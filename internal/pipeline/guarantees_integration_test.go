package pipeline_test

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

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

// startWith runs the pipeline with cfg adjusted by tweak until stop (see
// fixture.StoppablePipeline) or the test's end.
func startWith(t *testing.T, e *fixture.Env, tweak func(*pipeline.Config)) (stop func() error) {
	t.Helper()
	cfg := pipeline.Config{
		Replication: replication.Config{DSN: e.DSN, Slot: e.Slot, Publication: e.Publication, StatusInterval: 100 * time.Millisecond},
		Run:         replication.RunConfig{BatchSize: 1000, BatchTimeout: 50 * time.Millisecond},
		Sink:        e.Sink,
		Retry:       outboxstore.RetryConfig{BaseDelay: 200 * time.Millisecond, MaxDelay: time.Second},
		// Rows that land in the slot's creation snapshot are backfilled; the sweep
		// delivers them.
		SweepInterval: time.Second,
	}
	if tweak != nil {
		tweak(&cfg)
	}
	return fixture.StoppablePipeline(t, cfg, zaptest.NewLogger(t, zaptest.Level(zap.InfoLevel)))
}

// crashAfterInsert lets the first insert reach ClickHouse and then fails the writer
// as a crash between the insert and the status update would.
type crashAfterInsert struct {
	pipeline.Sink
	once sync.Once
}

var errCrash = errors.New("simulated crash after the ClickHouse insert")

func (c *crashAfterInsert) Insert(ctx context.Context, events []record.Event) error {
	if err := c.Sink.Insert(ctx, events); err != nil {
		return err
	}
	crashed := false
	c.once.Do(func() { crashed = true })
	if crashed {
		return errCrash
	}
	return nil
}

// TestInDoubtBatchIsReconciled: the first batch reaches ClickHouse, then the writer
// dies before marking rows processed or acknowledging. On restart the replayed rows
// are found in ClickHouse (thanks to the in-flight record) and not inserted again.
func TestInDoubtBatchIsReconciled(t *testing.T) {
	for _, srv := range testenv.ClickHouseServers(t) {
		t.Run(srv.Name, func(t *testing.T) {
			e := fixture.New(t, srv)
			stop := startWith(t, e, func(c *pipeline.Config) {
				c.WrapSink = func(s pipeline.Sink) pipeline.Sink { return &crashAfterInsert{Sink: s} }
			})
			e.WaitStreaming(t)
			e.Insert(t, 3000, false)
			fixture.WaitFor(t, time.Minute, "the first batch in ClickHouse", func() bool { c, _ := e.CHCounts(t); return c > 0 })
			if err := stop(); !errors.Is(err, errCrash) {
				t.Fatalf("pipeline returned %v, want the simulated crash", err)
			}
			if _, processed := e.Committed(t); processed != 0 {
				t.Fatalf("%d rows processed although the crash came before the status update", processed)
			}
			startWith(t, e, nil)
			e.AssertExactlyDelivered(t, time.Minute, e.CurrentWAL(t))
		})
	}
}

// TestOutageMarksFailedThenSweepDelivers: with ClickHouse down past the bound, the
// rows become failed with a next attempt, the slot is acknowledged past them (the
// outbox, not the slot, buffers), and once ClickHouse is back the sweep delivers.
func TestOutageMarksFailedThenSweepDelivers(t *testing.T) {
	ch := testenv.PrivateClickHouse(t, false)
	e := fixture.New(t, testenv.CHServerOf(ch))
	startWith(t, e, func(c *pipeline.Config) {
		c.Writer.OutageFailAfter = time.Second
		c.SweepInterval = 300 * time.Millisecond
		c.Sink.DialTimeout = time.Second
		c.Sink.ReadTimeout = 2 * time.Second
	})
	e.WaitStreaming(t)
	if err := ch.Halt(); err != nil {
		t.Fatal(err)
	}
	e.Insert(t, 300, false)
	after := e.CurrentWAL(t)
	fixture.WaitFor(t, time.Minute, "rows marked failed during the outage", func() bool {
		var failed int
		_ = e.Pool.QueryRow(context.Background(), `SELECT count(*) FROM event_outbox
			WHERE status = 'failed' AND next_attempt_at IS NOT NULL AND last_error LIKE 'clickhouse unavailable%'`).Scan(&failed)
		return failed == 300
	})
	fixture.WaitFor(t, time.Minute, "slot acknowledged past the failed rows", func() bool { return e.ConfirmedFlush(t) >= after })
	if err := ch.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	e.StopMerges(t) // a restart forgets it
	e.AssertExactlyDelivered(t, 2*time.Minute, after)
}

// TestBadRowIsolated: a row whose time ClickHouse cannot hold is a dead letter at
// once (no retry can deliver it) with a reason; the rest of its batch is delivered.
func TestBadRowIsolated(t *testing.T) {
	for _, srv := range testenv.ClickHouseServers(t) {
		t.Run(srv.Name, func(t *testing.T) {
			e := fixture.New(t, srv)
			startWith(t, e, nil)
			e.WaitStreaming(t)
			bad := "2300-01-01 00:00:00" // past DateTime64's 2299 and DateTime's 2106
			if srv.Legacy {
				bad = "1960-01-01 00:00:00" // DateTime would wrap it to 2096
			}
			ctx := context.Background()
			if _, err := e.Pool.Exec(ctx, `INSERT INTO event_outbox (event_type, event_date_time)
				SELECT 'ok', now() AT TIME ZONE 'UTC' FROM generate_series(1, 50)
				UNION ALL SELECT 'bad', $1::timestamp
				UNION ALL SELECT 'ok', now() AT TIME ZONE 'UTC' FROM generate_series(1, 50)`, bad); err != nil {
				t.Fatal(err)
			}
			fixture.WaitFor(t, time.Minute, "good rows delivered and the bad one dead", func() bool {
				var processed, dead int
				_ = e.Pool.QueryRow(ctx, `SELECT count(*) FILTER (WHERE status = 'processed'),
					count(*) FILTER (WHERE status = 'dead' AND attempts = 1 AND last_error LIKE '%outside what ClickHouse stores%')
					FROM event_outbox`).Scan(&processed, &dead)
				return processed == 100 && dead == 1
			})
			if c, u := e.CHCounts(t); c != 100 || u != 100 {
				t.Fatalf("ClickHouse holds count=%d uniq=%d, want 100 good rows", c, u)
			}
			var wrapped uint64
			if err := e.CHConn.QueryRow(ctx, "SELECT count() FROM "+e.Table+" WHERE event_type = 'bad'").Scan(&wrapped); err != nil || wrapped != 0 {
				t.Fatalf("bad row reached ClickHouse (%d rows, err %v)", wrapped, err)
			}
		})
	}
}

// TestRowsOlderThanTheSlotAreBackfilled: rows committed before the first start (no
// slot yet) are delivered through the sweep, exactly once, beside streamed ones.
func TestRowsOlderThanTheSlotAreBackfilled(t *testing.T) {
	e := fixture.New(t, testenv.ModernClickHouse(t))
	e.Insert(t, 2500, false)                                                  // before the slot exists
	startWith(t, e, func(c *pipeline.Config) { c.SweepInterval = time.Hour }) // the start-up sweep must do it
	e.WaitStreaming(t)
	e.Insert(t, 700, false)
	e.AssertExactlyDelivered(t, time.Minute, e.CurrentWAL(t))
}

// TestConcurrentSweepersDeliverEachRowOnce runs four sweepers over the same failed
// rows at once.
func TestConcurrentSweepersDeliverEachRowOnce(t *testing.T) {
	e := fixture.New(t, testenv.ModernClickHouse(t))
	e.Insert(t, 5000, false)
	ctx := context.Background()
	if _, err := e.Pool.Exec(ctx, `UPDATE event_outbox SET status = 'failed', next_attempt_at = now()`); err != nil {
		t.Fatal(err)
	}
	log := zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel))
	var wg sync.WaitGroup
	results := make([]sweep.Result, 4)
	errs := make([]error, 4)
	for i := range results {
		w, err := sink.Open(ctx, e.Sink, log)
		if err != nil {
			t.Fatal(err)
		}
		defer w.Close()
		s := sweep.New(sweep.Config{BatchSize: 200}, e.Pool, w, outboxstore.New(e.Pool, outboxstore.RetryConfig{}), log)
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i], errs[i] = s.Run(ctx)
		}()
	}
	wg.Wait()
	var delivered int64
	busy := 0
	for i, r := range results {
		if errs[i] != nil {
			t.Fatalf("sweeper %d: %v", i, errs[i])
		}
		delivered += r.Delivered
		if r.Delivered > 0 {
			busy++
		}
	}
	if delivered != 5000 {
		t.Fatalf("sweepers delivered %d rows together, want 5000", delivered)
	}
	t.Logf("%d of 4 sweepers took part", busy)
	if c, u := e.CHCounts(t); c != 5000 || u != 5000 {
		t.Fatalf("ClickHouse holds count=%d uniq=%d, want 5000", c, u)
	}
}

// TestSchemaChangeWhileStreaming adds and reorders columns mid-stream: every event
// keeps flowing (columns are mapped by name; unknown columns are ignored).
func TestSchemaChangeWhileStreaming(t *testing.T) {
	e := fixture.New(t, testenv.ModernClickHouse(t))
	startWith(t, e, nil)
	e.WaitStreaming(t)
	ctx := context.Background()
	e.Insert(t, 500, false)
	if _, err := e.Pool.Exec(ctx, `ALTER TABLE event_outbox ADD COLUMN tenant TEXT DEFAULT 'acme'`); err != nil {
		t.Fatal(err)
	}
	e.Insert(t, 500, false)
	if _, err := e.Pool.Exec(ctx, `INSERT INTO event_outbox (tenant, event_type, event_date_time) VALUES ('x', 'with.tenant', now() AT TIME ZONE 'UTC')`); err != nil {
		t.Fatal(err)
	}
	if _, err := e.Pool.Exec(ctx, `ALTER TABLE event_outbox DROP COLUMN tenant`); err != nil {
		t.Fatal(err)
	}
	e.Insert(t, 500, false)
	e.AssertExactlyDelivered(t, time.Minute, e.CurrentWAL(t))
}

// TestQuietOutboxDoesNotPinWAL: another table is busy while the outbox is quiet; the
// slot's confirmed position must follow the server's WAL end (keepalives), so the
// WAL the slot holds back stays small.
func TestQuietOutboxDoesNotPinWAL(t *testing.T) {
	e := fixture.New(t, testenv.ModernClickHouse(t))
	startWith(t, e, nil)
	e.WaitStreaming(t)
	ctx := context.Background()
	if _, err := e.Pool.Exec(ctx, "CREATE TABLE busy (id bigserial, payload text)"); err != nil {
		t.Fatal(err)
	}
	start := e.CurrentWAL(t)
	for i := 0; i < 100; i++ {
		if _, err := e.Pool.Exec(ctx, "INSERT INTO busy (payload) SELECT repeat('x', 200) FROM generate_series(1, 1000)"); err != nil {
			t.Fatal(err)
		}
	}
	end := e.CurrentWAL(t)
	if end-start < 16<<20 {
		t.Fatalf("the busy table wrote only %d bytes of WAL; the test needs more", end-start)
	}
	fixture.WaitFor(t, time.Minute, "confirmed LSN following the WAL end of the busy table", func() bool {
		return e.ConfirmedFlush(t) >= end
	})
	t.Logf("busy table wrote %d MiB of WAL; the quiet outbox's slot confirmed past all of it", (end-start)>>20)
}
