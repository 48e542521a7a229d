package pipeline_test

// Tests for the delivery holes of issue 11: each failed on the main of
// 2026-12-01 and passes since.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/jackc/pgx/v5"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/fixture"
	"github.com/outbox-streamer/outbox-streamer/internal/harness/testenv"
	"github.com/outbox-streamer/outbox-streamer/internal/outboxstore"
	"github.com/outbox-streamer/outbox-streamer/internal/pipeline"
	"github.com/outbox-streamer/outbox-streamer/internal/record"
	"github.com/outbox-streamer/outbox-streamer/internal/retry"
	"github.com/outbox-streamer/outbox-streamer/internal/sweep"
	"github.com/outbox-streamer/outbox-streamer/sink"
)

// waitCaughtUp waits until the slot confirmed the WAL position of now.
func waitCaughtUp(t *testing.T, e *fixture.Env, timeout time.Duration) {
	t.Helper()
	pos := e.CurrentWAL(t)
	fixture.WaitFor(t, timeout, "slot confirmed past the last commit", func() bool { return e.ConfirmedFlush(t) >= pos })
}

// TestVanishedRowDoesNotStall (item 1): a transaction inserts an event and
// deletes it again. pgoutput carries the insert, never the delete; the
// streamer must settle the row that no longer exists instead of waiting for
// it for ever, and the slot must keep moving — also after a restart.
func TestVanishedRowDoesNotStall(t *testing.T) {
	e := fixture.New(t, testenv.ModernClickHouse(t))
	stop := startWith(t, e, nil)
	e.WaitStreaming(t)
	ctx := context.Background()
	e.InsertTx(t, func(tx pgx.Tx) error {
		var id int64
		if err := tx.QueryRow(ctx, `INSERT INTO event_outbox (event_type, event_date_time)
			VALUES ('vanishing', now() AT TIME ZONE 'UTC') RETURNING id`).Scan(&id); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, "DELETE FROM event_outbox WHERE id = $1", id)
		return err
	})
	e.Insert(t, 100, false)
	// Well inside the 30 s that the visibility wait used to take before it
	// failed (and was retried for ever).
	waitCaughtUp(t, e, 15*time.Second)
	fixture.WaitFor(t, 15*time.Second, "the 100 events processed", func() bool { return e.StatusCounts(t)["processed"] == 100 })

	// The same after a restart that replays the row (a delete of a row in
	// flight while the streamer is down).
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	e.InsertTx(t, func(tx pgx.Tx) error {
		_, err := tx.Exec(ctx, `INSERT INTO event_outbox (event_type, event_date_time)
			SELECT 'vanishing', now() AT TIME ZONE 'UTC' FROM generate_series(1, 10)`)
		if err != nil {
			return err
		}
		_, err = tx.Exec(ctx, "DELETE FROM event_outbox WHERE event_type = 'vanishing'")
		return err
	})
	e.Insert(t, 50, false)
	startWith(t, e, nil)
	waitCaughtUp(t, e, 15*time.Second)
	fixture.WaitFor(t, 15*time.Second, "150 events processed", func() bool { return e.StatusCounts(t)["processed"] == 150 })
}

// TestSweepSurvivesPoisonedRow (item 5): a failed row the sweep cannot even
// read into Go (event_date_time = 'infinity') must become failed or dead with
// its reason; the 20 due rows behind it are delivered.
func TestSweepSurvivesPoisonedRow(t *testing.T) {
	e := fixture.New(t, testenv.ModernClickHouse(t))
	ctx := context.Background()
	if _, err := e.Pool.Exec(ctx, `INSERT INTO event_outbox (event_type, event_date_time, status, next_attempt_at)
		VALUES ('poison', 'infinity', 'failed', now() - interval '1 hour')`); err != nil {
		t.Fatal(err)
	}
	if _, err := e.Pool.Exec(ctx, `INSERT INTO event_outbox (event_type, event_date_time, status, next_attempt_at)
		SELECT 'ok', now() AT TIME ZONE 'UTC', 'failed', now() FROM generate_series(1, 20)`); err != nil {
		t.Fatal(err)
	}
	res, err := sweepOnce(t, e)
	if err != nil {
		t.Fatalf("sweep: %v", err)
	}
	if res.Delivered != 20 {
		t.Errorf("sweep delivered %d rows, want the 20 good ones", res.Delivered)
	}
	var reason string
	if err := e.Pool.QueryRow(ctx, "SELECT coalesce(last_error, '') FROM event_outbox WHERE event_type = 'poison' AND status IN ('failed', 'dead')").Scan(&reason); err != nil {
		t.Fatalf("poisoned row not failed: %v", err)
	}
	if !strings.Contains(reason, "infinity") {
		t.Errorf("poisoned row's reason %q does not say what is wrong", reason)
	}
}

func sweepOnce(t *testing.T, e *fixture.Env) (sweep.Result, error) { return sweepOnceBy(t, e, 100) }

func sweepOnceBy(t *testing.T, e *fixture.Env, batchSize int) (sweep.Result, error) {
	t.Helper()
	ctx := context.Background()
	log := zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel))
	w, err := sink.Open(ctx, e.Sink, log)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	s := sweep.New(sweep.Config{BatchSize: batchSize}, e.Pool, w, outboxstore.New(e.Pool, outboxstore.RetryConfig{}), log)
	return s.Run(ctx)
}

// TestFailedRowWithoutNextAttemptIsDelivered (item 6): a row inserted as failed
// without next_attempt_at is due, not forgotten.
func TestFailedRowWithoutNextAttemptIsDelivered(t *testing.T) {
	e := fixture.New(t, testenv.ModernClickHouse(t))
	if _, err := e.Pool.Exec(context.Background(), `INSERT INTO event_outbox (event_type, event_date_time, status)
		SELECT 'ok', now() AT TIME ZONE 'UTC', 'failed' FROM generate_series(1, 5)`); err != nil {
		t.Fatal(err)
	}
	res, err := sweepOnce(t, e)
	if err != nil {
		t.Fatal(err)
	}
	if res.Delivered != 5 {
		t.Fatalf("sweep delivered %d rows, want 5", res.Delivered)
	}
}

// TestStrandedRowsAreRescued (items 2 and 6): rows the stream will never carry
// — committed before a slot that was created by hand (the state a crash
// during the backfill leaves too), published while the table was dropped from
// the publication, or moved back to pending by hand — are delivered by the
// sweep's safety net, exactly once, while the stream goes on.
func TestStrandedRowsAreRescued(t *testing.T) {
	e := fixture.New(t, testenv.ModernClickHouse(t))
	ctx := context.Background()
	e.Insert(t, 300, false) // before the slot
	if _, err := e.Pool.Exec(ctx, "SELECT pg_create_logical_replication_slot($1, 'pgoutput')", e.Slot); err != nil {
		t.Fatal(err)
	}
	startWith(t, e, func(c *pipeline.Config) { c.SweepInterval = 300 * time.Millisecond })
	e.WaitStreaming(t)
	e.Insert(t, 200, false) // streamed
	fixture.WaitFor(t, time.Minute, "pre-slot and streamed rows processed", func() bool { return e.StatusCounts(t)["processed"] == 500 })

	// Rows while the table is not in the publication.
	if _, err := e.Pool.Exec(ctx, "ALTER PUBLICATION "+pgx.Identifier{e.Publication}.Sanitize()+" DROP TABLE event_outbox"); err != nil {
		t.Fatal(err)
	}
	e.Insert(t, 50, false)
	if _, err := e.Pool.Exec(ctx, "ALTER PUBLICATION "+pgx.Identifier{e.Publication}.Sanitize()+" ADD TABLE event_outbox"); err != nil {
		t.Fatal(err)
	}
	e.Insert(t, 50, false)
	// Rows moved back to pending by hand.
	if _, err := e.Pool.Exec(ctx, "UPDATE event_outbox SET status = 'pending' WHERE id IN (SELECT id FROM event_outbox ORDER BY id LIMIT 10)"); err != nil {
		t.Fatal(err)
	}
	e.AssertExactlyDelivered(t, time.Minute, e.CurrentWAL(t))
}

// ambiguousOnce lets an insert reach ClickHouse and then reports the failure
// a dropped connection gives (the answer lost), once: the outcome of the
// insert is unknown to the writer.
type ambiguousOnce struct {
	pipeline.Sink
	fired atomic.Bool
}

func (a *ambiguousOnce) Insert(ctx context.Context, events []record.Event) error {
	if err := a.Sink.Insert(ctx, events); err != nil {
		return err
	}
	if len(events) >= 100 && a.fired.CompareAndSwap(false, true) {
		return fmt.Errorf("insert %d rows: read: %w", len(events), io.ErrUnexpectedEOF)
	}
	return nil
}

// TestAmbiguousInsertIsNotRepeated (item 3): ClickHouse accepted an insert
// but the answer was lost. Re-sending blindly writes every row twice; the
// writer must find out what ClickHouse holds first.
func TestAmbiguousInsertIsNotRepeated(t *testing.T) {
	for _, srv := range testenv.ClickHouseServers(t) {
		t.Run(srv.Name, func(t *testing.T) {
			e := fixture.New(t, srv)
			amb := &ambiguousOnce{}
			startWith(t, e, func(c *pipeline.Config) {
				c.WrapSink = func(s pipeline.Sink) pipeline.Sink { amb.Sink = s; return amb }
			})
			e.WaitStreaming(t)
			e.Insert(t, 2000, false)
			e.AssertExactlyDelivered(t, time.Minute, e.CurrentWAL(t))
			if !amb.fired.Load() {
				t.Fatal("the fault was never injected")
			}
		})
	}
}

// TestLostAnswerIsNotRepeated (item 3, at the network level): a forwarder lets
// ClickHouse receive and commit whole inserts and then resets the streamer's
// connection instead of passing on the answer. The writer must find out what
// ClickHouse holds before it sends again: every event exactly once, on both
// server versions.
func TestLostAnswerIsNotRepeated(t *testing.T) {
	for _, srv := range testenv.ClickHouseServers(t) {
		t.Run(srv.Name, func(t *testing.T) {
			e := fixture.New(t, srv)
			drop := newAnswerDropper(t, srv.Addr)
			drop.armed.Store(3)
			startWith(t, e, func(c *pipeline.Config) { c.Sink.Addr = drop.Addr() })
			e.WaitStreaming(t)
			for i := 0; i < 5; i++ {
				e.Insert(t, 2000, false)
			}
			e.AssertExactlyDelivered(t, 2*time.Minute, e.CurrentWAL(t))
			if n := drop.dropped.Load(); n == 0 {
				t.Fatal("no answer was dropped: the fault never fired")
			} else {
				t.Logf("%d insert answers dropped after ClickHouse took the insert", n)
			}
		})
	}
}

// TestStartDuringClickHouseOutage (item 4): started while ClickHouse is down,
// the streamer streams anyway: after the outage bound rows become failed with
// a next attempt, the slot moves, and the sweep delivers once ClickHouse is
// back.
func TestStartDuringClickHouseOutage(t *testing.T) {
	ch := testenv.PrivateClickHouse(t, false)
	e := fixture.New(t, testenv.CHServerOf(ch))
	if err := ch.Halt(); err != nil {
		t.Fatal(err)
	}
	stop := startWith(t, e, func(c *pipeline.Config) {
		c.Writer.OutageFailAfter = time.Second
		c.SweepInterval = 300 * time.Millisecond
		c.Sink.DialTimeout = time.Second
		c.Sink.ReadTimeout = 2 * time.Second
	})
	e.WaitStreaming(t)
	e.Insert(t, 300, false)
	after := e.CurrentWAL(t)
	fixture.WaitFor(t, time.Minute, "rows marked failed during the outage", func() bool { return e.StatusCounts(t)["failed"] == 300 })
	fixture.WaitFor(t, time.Minute, "slot acknowledged past the failed rows", func() bool { return e.ConfirmedFlush(t) >= after })
	if err := ch.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	e.StopMerges(t) // a restart forgets it
	e.AssertExactlyDelivered(t, 2*time.Minute, after)
	if err := stop(); err != nil {
		t.Fatalf("pipeline: %v", err)
	}
}

// TestTimeEdgesRoundTrip (item 8): the first and last times the sink accepts
// come back from ClickHouse unchanged on both server versions, and one
// microsecond (or second) beyond them is refused, never wrapped
// (2290-01-01 used to be stored as 1705-06-13).
func TestTimeEdgesRoundTrip(t *testing.T) {
	for _, srv := range testenv.ClickHouseServers(t) {
		t.Run(srv.Name, func(t *testing.T) {
			e := fixture.New(t, srv)
			ctx := context.Background()
			w, err := sink.Open(ctx, e.Sink, zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel)))
			if err != nil {
				t.Fatal(err)
			}
			defer w.Close()
			lo, hi := sink.TimeRange(srv.Legacy)
			step := time.Microsecond
			if srv.Legacy {
				step = time.Second
			}
			for _, bad := range []time.Time{lo.Add(-step), hi.Add(step), time.Date(2290, 1, 1, 0, 0, 0, 0, time.UTC)} {
				if err := w.Validate(&record.Event{Type: "x", Time: bad, CreatedAt: lo}); err == nil {
					t.Errorf("Validate accepted %s, outside %s..%s", bad, lo, hi)
				}
			}
			events := []record.Event{
				{ID: 1, Type: "lo", Time: lo, CreatedAt: lo, Context: "{}"},
				{ID: 2, Type: "hi", Time: hi, CreatedAt: hi, Context: "{}"},
			}
			for i := range events {
				if err := w.Validate(&events[i]); err != nil {
					t.Fatalf("Validate(%s): %v", events[i].Time, err)
				}
			}
			if err := w.Insert(ctx, events); err != nil {
				t.Fatal(err)
			}
			for _, ev := range events {
				var got, gotCreated time.Time
				if err := e.CHConn.QueryRow(ctx, "SELECT event_date_time, created_at FROM "+e.Table+" WHERE event_id = ?", uint64(ev.ID)).Scan(&got, &gotCreated); err != nil {
					t.Fatal(err)
				}
				if !got.Equal(ev.Time) || !gotCreated.Equal(ev.CreatedAt) {
					t.Errorf("%s: wrote %s, ClickHouse holds %s / %s", ev.Type, ev.Time.Format(time.RFC3339Nano),
						got.UTC().Format(time.RFC3339Nano), gotCreated.UTC().Format(time.RFC3339Nano))
				}
			}
			// The in-doubt lookup searches by time: it must find the edge rows.
			found, err := w.ExistingIDs(ctx, events)
			if err != nil || len(found) != 2 {
				t.Errorf("ExistingIDs found %v (%v), want both edge rows", found, err)
			}
		})
	}
}

// truncatedOnce fails the first inserts as a stream cut off in the middle
// does on the server side (ATTEMPT_TO_READ_AFTER_EOF), without sending them:
// as many times as bisecting a 500-row batch down to one row takes.
type truncatedOnce struct {
	pipeline.Sink
	failures atomic.Int32
}

const truncations = 10

func (s *truncatedOnce) Insert(ctx context.Context, events []record.Event) error {
	if s.failures.Add(1) <= truncations {
		return &clickhouse.Exception{Code: 32, Name: "ATTEMPT_TO_READ_AFTER_EOF", Message: "Attempt to read after eof"}
	}
	return s.Sink.Insert(ctx, events)
}

// TestTruncatedInsertIsRetriedNotBisected (item 10): a cut-off insert stream
// is a transient failure; it used to count as a row error, so the batch was
// bisected and rows' attempts were spent.
func TestTruncatedInsertIsRetriedNotBisected(t *testing.T) {
	e := fixture.New(t, testenv.ModernClickHouse(t))
	tr := &truncatedOnce{}
	startWith(t, e, func(c *pipeline.Config) {
		c.WrapSink = func(s pipeline.Sink) pipeline.Sink { tr.Sink = s; return tr }
		c.Writer.Retry = retry.Policy{Initial: 10 * time.Millisecond, Max: 50 * time.Millisecond}
	})
	e.WaitStreaming(t)
	e.Insert(t, 500, false)
	e.AssertExactlyDelivered(t, time.Minute, e.CurrentWAL(t))
	var spent int
	if err := e.Pool.QueryRow(context.Background(), "SELECT count(*) FROM event_outbox WHERE attempts > 0").Scan(&spent); err != nil || spent != 0 {
		t.Fatalf("%d rows had an attempt counted against them (%v)", spent, err)
	}
	if tr.failures.Load() < truncations {
		t.Fatal("the faults were not all injected")
	}
}

// TestTableThatRejectsEveryRowStops (item 10): a ClickHouse table that
// refuses every row the same way — here a column whose default fails to
// parse every event's type — is a table error: the pipeline stops with one
// clear error and no event becomes failed or dead (it used to bisect each
// batch to single rows and dead-letter every event).
func TestTableThatRejectsEveryRowStops(t *testing.T) {
	for _, srv := range testenv.ClickHouseServers(t) {
		t.Run(srv.Name, func(t *testing.T) {
			e := fixture.New(t, srv)
			if err := e.CHConn.Exec(context.Background(), "ALTER TABLE "+e.Table+" ADD COLUMN broken UInt8 DEFAULT toUInt8(event_type)"); err != nil {
				t.Fatal(err)
			}
			stop := startWith(t, e, nil)
			e.WaitStreaming(t)
			e.Insert(t, 50, false)
			var err error
			fixture.WaitFor(t, time.Minute, "the pipeline to stop", func() bool {
				var n int
				_ = e.Pool.QueryRow(context.Background(), "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1 AND active", e.Slot).Scan(&n)
				return n == 0
			})
			err = stop()
			if !errors.Is(err, pipeline.ErrTableRejectsRows) || !strings.Contains(err.Error(), "migrate up") {
				t.Fatalf("pipeline returned %v, want ErrTableRejectsRows with a hint", err)
			}
			if st := e.StatusCounts(t); st["pending"] != 50 {
				t.Fatalf("rows by status %v, want all 50 still pending", st)
			}
		})
	}
}

// TestSweepSplitsInsertOverTooManyPartitions (item 5): failed rows whose
// times span more than 100 months make one insert fail with TOO_MANY_PARTS
// (252) — retryable by code, but the same insert fails the same way for
// ever. The sweep must split it and deliver every row.
func TestSweepSplitsInsertOverTooManyPartitions(t *testing.T) {
	e := fixture.New(t, testenv.ModernClickHouse(t))
	if _, err := e.Pool.Exec(context.Background(), `INSERT INTO event_outbox (event_type, event_date_time, status, next_attempt_at)
		SELECT 'spread', timestamp '2000-01-15' + g * interval '1 month', 'failed', now() FROM generate_series(1, 150) AS g`); err != nil {
		t.Fatal(err)
	}
	res, err := sweepOnceBy(t, e, 1000) // one round: one insert over 150 partitions
	if err != nil {
		t.Fatalf("sweep: %v", err)
	}
	if res.Delivered != 150 {
		t.Fatalf("sweep delivered %d of 150 rows spread over 150 months", res.Delivered)
	}
	if c, u := e.CHCounts(t); c != 150 || u != 150 {
		t.Fatalf("ClickHouse holds count=%d uniq=%d, want 150", c, u)
	}
}
