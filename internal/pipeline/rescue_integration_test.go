package pipeline_test

// The rescue of stranded rows and the in-doubt window against what old
// production databases do (issue 24): a transaction-ID epoch of 1 and the
// 32-bit counter wrapping, rows inserted under a savepoint and committed
// late, and a commit record that starts exactly at the confirmed position.

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/fixture"
	"github.com/outbox-streamer/outbox-streamer/internal/harness/localsvc"
	"github.com/outbox-streamer/outbox-streamer/internal/harness/testenv"
	"github.com/outbox-streamer/outbox-streamer/internal/pipeline"
	"github.com/outbox-streamer/outbox-streamer/internal/record"
)

// strandedRows counts the rows the sweep's rescue took.
func strandedRows(t *testing.T, e *fixture.Env) int64 {
	t.Helper()
	var n int64
	if err := e.Pool.QueryRow(context.Background(),
		"SELECT count(*) FROM "+e.Outbox.Ident()+" WHERE last_error LIKE 'stranded%'").Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

func txidNow(t *testing.T, e *fixture.Env) int64 {
	t.Helper()
	var x int64
	if err := e.Pool.QueryRow(context.Background(), "SELECT txid_snapshot_xmax(txid_current_snapshot())").Scan(&x); err != nil {
		t.Fatal(err)
	}
	return x
}

// produceSingleRows commits one row per transaction every interval until
// stop is closed.
func produceSingleRows(t *testing.T, e *fixture.Env, interval time.Duration, stop <-chan struct{}) (wait func() int) {
	t.Helper()
	var n atomic.Int64
	var wg sync.WaitGroup
	errc := make(chan error, 1)
	wg.Add(1)
	go func() {
		defer wg.Done()
		tick := time.NewTicker(interval)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			if _, err := e.Pool.Exec(context.Background(), `INSERT INTO event_outbox (event_type, event_date_time)
				VALUES ('single', now() AT TIME ZONE 'UTC')`); err != nil {
				errc <- err
				return
			}
			n.Add(1)
		}
	}()
	return func() int {
		wg.Wait()
		select {
		case err := <-errc:
			t.Fatalf("producer: %v", err)
		default:
		}
		return int(n.Load())
	}
}

// TestRescueOnOldCluster: on a cluster whose xid epoch is 1 and whose 32-bit
// counter wraps during the test, sweeps every 300 ms while single-row
// transactions stream must rescue nothing and duplicate nothing (each sweep
// used to take the rows committed after its mark, and every one reached
// ClickHouse twice).
func TestRescueOnOldCluster(t *testing.T) {
	pg := testenv.PrivatePostgresWith(t, localsvc.PostgresOptions{XIDEpoch: 1, NextXID: 1<<32 - 700})
	e := fixture.NewOn(t, pg.DSN(), testenv.ModernClickHouse(t))
	before := txidNow(t, e)
	if before < 1<<32 || before >= 2<<32 {
		t.Fatalf("precondition: txid %d, want epoch 1", before)
	}
	startWith(t, e, func(c *pipeline.Config) { c.SweepInterval = 300 * time.Millisecond })
	e.WaitStreaming(t)
	stop := make(chan struct{})
	wait := produceSingleRows(t, e, 5*time.Millisecond, stop)
	fixture.WaitFor(t, 2*time.Minute, "the xid counter past its 32-bit wraparound and 1,200 rows", func() bool {
		n, _ := e.Committed(t)
		return txidNow(t, e) > 2<<32+100 && n >= 1200
	})
	close(stop)
	rows := wait()
	e.AssertExactlyDelivered(t, 2*time.Minute, e.CurrentWAL(t))
	if n := strandedRows(t, e); n != 0 {
		t.Fatalf("the sweep rescued %d of %d rows the stream was delivering", n, rows)
	}
	t.Logf("%d single-row transactions, txid %d -> %d, nothing rescued, each delivered once", rows, before, txidNow(t, e))
}

// TestSavepointRowsCommittedLateAreNotRescued: a transaction inserts under a
// released savepoint (its rows' xmin is the subtransaction's xid), stays open
// across sweeps while other commits move the confirmed position past their
// marks, and commits right behind a large transaction that keeps the stream
// busy. Its rows belong to the stream: the rescue must not take them.
func TestSavepointRowsCommittedLateAreNotRescued(t *testing.T) {
	e := fixture.New(t, testenv.ModernClickHouse(t))
	startWith(t, e, func(c *pipeline.Config) { c.SweepInterval = 200 * time.Millisecond })
	e.WaitStreaming(t)
	ctx := context.Background()

	tx, err := e.Pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx)
	for _, q := range []string{
		"SAVEPOINT a",
		`INSERT INTO event_outbox (event_type, event_date_time)
			SELECT 'under-savepoint', now() AT TIME ZONE 'UTC' FROM generate_series(1, 5000)`,
		"RELEASE SAVEPOINT a",
	} {
		if _, err := tx.Exec(ctx, q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	// Sweeps take marks while the transaction is open; side commits carry
	// the confirmed position past them.
	stop := make(chan struct{})
	wait := produceSingleRows(t, e, 10*time.Millisecond, stop)
	for range 3 {
		pos := e.CurrentWAL(t)
		fixture.WaitFor(t, time.Minute, "slot confirmed past the side commits", func() bool { return e.ConfirmedFlush(t) >= pos })
		time.Sleep(300 * time.Millisecond) // at least one sweep, whose mark the next round passes
	}
	e.Insert(t, 100000, false) // keeps the stream busy while the savepoint rows wait behind it
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second) // sweeps run while the stream works through both
	close(stop)
	wait()
	e.AssertExactlyDelivered(t, 2*time.Minute, e.CurrentWAL(t))
	if n := strandedRows(t, e); n != 0 {
		t.Fatalf("the sweep rescued %d rows of a transaction the stream delivered", n)
	}
}

// crashOnType lets the first insert holding an event of type typ reach
// ClickHouse and then stops the writer, as a crash after the insert would.
// Before that insert it calls before, if set.
type crashOnType struct {
	pipeline.Sink
	typ     string
	before  func()
	crashed atomic.Bool
}

func (c *crashOnType) Insert(ctx context.Context, events []record.Event) error {
	hit := false
	for i := range events {
		hit = hit || events[i].Type == c.typ
	}
	if !hit || c.crashed.Load() {
		return c.Sink.Insert(ctx, events)
	}
	if c.before != nil {
		c.before()
	}
	if err := c.Sink.Insert(ctx, events); err != nil {
		return err
	}
	c.crashed.Store(true)
	return errCrash
}

// TestReplayAtTheConfirmedPosition: transaction Y's commit record ends
// exactly where X's begins. Y is delivered and confirmed, X reaches
// ClickHouse and the streamer dies before X's status is written. The next
// session resumes at Y's end, which is X's commit position, and PostgreSQL
// sends X again: X is in doubt and must be looked up, not inserted twice.
func TestReplayAtTheConfirmedPosition(t *testing.T) {
	const attempts = 5
	for attempt := 1; ; attempt++ {
		err := replayAtConfirmed(t)
		if err == nil {
			return
		}
		if !errors.Is(err, errNotAdjacent) || attempt == attempts {
			t.Fatal(err)
		}
		t.Logf("attempt %d: %v; again", attempt, err)
	}
}

var errNotAdjacent = errors.New("precondition: other WAL records came between the two commits")

func replayAtConfirmed(t *testing.T) error {
	e := fixture.New(t, testenv.ModernClickHouse(t))
	ctx := context.Background()
	// The slot first, with nothing to stream.
	stop := startWith(t, e, nil)
	e.WaitStreaming(t)
	if err := stop(); err != nil {
		return err
	}

	// X inserts first and commits second, so nothing of it lies between
	// Y's commit record and its own.
	x, err := e.Pool.Begin(ctx)
	if err != nil {
		return err
	}
	defer x.Rollback(ctx)
	if _, err := x.Exec(ctx, `INSERT INTO event_outbox (event_type, event_date_time)
		SELECT 'x', now() AT TIME ZONE 'UTC' FROM generate_series(1, 10)`); err != nil {
		return err
	}
	e.Insert(t, 1000, false) // Y: one full batch
	if err := x.Commit(ctx); err != nil {
		return err
	}

	// Y settled and confirmed before X goes in: the state a crash then leaves.
	// (The writer's goroutine: no t.Fatal here; the checks below tell.)
	crash := &crashOnType{typ: "x", before: func() {
		for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
			var processed int
			if err := e.Pool.QueryRow(ctx, "SELECT count(*) FROM event_outbox WHERE status = 'processed'").Scan(&processed); err == nil && processed == 1000 {
				break
			}
		}
		time.Sleep(500 * time.Millisecond) // five status intervals: Y's end confirmed
	}}
	stop = startWith(t, e, func(c *pipeline.Config) {
		c.Writer.MaxInsertRows = 1000 // Y and X in inserts of their own
		c.WrapSink = func(s pipeline.Sink) pipeline.Sink { crash.Sink = s; return crash }
	})
	fixture.WaitFor(t, 2*time.Minute, "X inserted and the writer stopped", crash.crashed.Load)
	err = stop()
	if !errors.Is(err, errCrash) {
		return fmt.Errorf("pipeline stopped with %v, want the simulated crash", err)
	}
	var xCommit uint64
	if err := e.CHConn.QueryRow(ctx, "SELECT min(commit_lsn) FROM "+e.Table+" WHERE event_type = 'x'").Scan(&xCommit); err != nil {
		return err
	}
	if confirmed := e.ConfirmedFlush(t); confirmed != xCommit {
		return fmt.Errorf("%w: the slot confirmed %s, X's commit starts at %s", errNotAdjacent, pglogrepl.LSN(confirmed), pglogrepl.LSN(xCommit))
	}

	startWith(t, e, nil)
	e.AssertExactlyDelivered(t, time.Minute, e.CurrentWAL(t))
	return nil
}

// TestReplayAfterTheInflightRecordWasLost: a batch reaches ClickHouse, the
// streamer dies before its status, and the in-flight record is gone too — as
// after a failover to a standby the record had not reached. What ClickHouse
// holds bounds the replay: the rows are looked up, not inserted twice.
func TestReplayAfterTheInflightRecordWasLost(t *testing.T) {
	for _, srv := range testenv.ClickHouseServers(t) {
		t.Run(srv.Name, func(t *testing.T) {
			e := fixture.New(t, srv)
			stop := startWith(t, e, nil)
			e.WaitStreaming(t)
			e.Insert(t, 100, false)
			e.AssertExactlyDelivered(t, time.Minute, e.CurrentWAL(t))
			if err := stop(); err != nil {
				t.Fatal(err)
			}
			e.Insert(t, 1000, false)
			crash := &crashOnType{typ: "type.0"}
			stop = startWith(t, e, func(c *pipeline.Config) {
				c.WrapSink = func(s pipeline.Sink) pipeline.Sink { crash.Sink = s; return crash }
			})
			fixture.WaitFor(t, time.Minute, "the batch inserted and the writer stopped", crash.crashed.Load)
			if err := stop(); !errors.Is(err, errCrash) {
				t.Fatalf("pipeline stopped with %v, want the simulated crash", err)
			}
			if _, err := e.Pool.Exec(context.Background(), "UPDATE outbox_checkpoint SET inflight_lsn = '0/0'"); err != nil {
				t.Fatal(err)
			}
			startWith(t, e, nil)
			e.AssertExactlyDelivered(t, time.Minute, e.CurrentWAL(t))
		})
	}
}
