package pipeline_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/fixture"
	"github.com/outbox-streamer/outbox-streamer/internal/harness/localsvc"
	"github.com/outbox-streamer/outbox-streamer/internal/harness/testenv"
	"github.com/outbox-streamer/outbox-streamer/internal/metrics"
	"github.com/outbox-streamer/outbox-streamer/internal/pipeline"
	"github.com/outbox-streamer/outbox-streamer/internal/standby"
	"github.com/outbox-streamer/outbox-streamer/replication"
)

// standbyPair is a private primary with a migrated fixture and a physical
// standby streaming from it through the physical slot standbySlot.
type standbyPair struct {
	e       *fixture.Env
	primary *localsvc.Postgres
	standby *localsvc.Postgres
}

const standbySlot = "hold_standby"

func startStandbyPair(ctx context.Context, t *testing.T, settings map[string]string) standbyPair {
	t.Helper()
	pg := testenv.PrivatePostgres(t)
	e := fixture.NewOn(t, pg.DSN(), testenv.ModernClickHouse(t))
	sb, err := pg.StartStandby(ctx, localsvc.StandbyOptions{Slot: standbySlot, Settings: settings})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sb.Stop() })
	return standbyPair{e: e, primary: pg, standby: sb}
}

// startStandbyByApp is startStandbyPair with the standby connecting as
// application_name app, once pg_stat_replication shows its flush position.
func startStandbyByApp(ctx context.Context, t *testing.T, app string) standbyPair {
	t.Helper()
	pg := testenv.PrivatePostgres(t)
	e := fixture.NewOn(t, pg.DSN(), testenv.ModernClickHouse(t))
	sb, err := pg.StartStandby(ctx, localsvc.StandbyOptions{Slot: standbySlot, Settings: map[string]string{
		"primary_conninfo": fmt.Sprintf("host=127.0.0.1 port=%d user=postgres dbname=postgres application_name=%s", pg.Port, app)}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sb.Stop() })
	fixture.WaitFor(t, time.Minute, "the standby in pg_stat_replication", func() bool {
		var n int
		_ = e.Pool.QueryRow(ctx, "SELECT count(*) FROM pg_stat_replication WHERE application_name = $1 AND flush_lsn IS NOT NULL", app).Scan(&n)
		return n == 1
	})
	return standbyPair{e: e, primary: pg, standby: sb}
}

// pauseWALReceiver stops the standby's WAL receiver (localsvc's
// PauseWALReceiver) and returns what resumes it; the test's end resumes it too.
func (p standbyPair) pauseWALReceiver(ctx context.Context, t *testing.T) (resume func()) {
	t.Helper()
	wctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	resume, err := p.standby.PauseWALReceiver(wctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(resume)
	return resume
}

// standbyReceived is the end of the WAL the standby has received (and so at
// least what it flushed), read on the standby itself.
func (p standbyPair) standbyReceived(ctx context.Context, t *testing.T) uint64 {
	t.Helper()
	conn, err := pgx.Connect(ctx, p.standby.DSN())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	var s string
	if err := conn.QueryRow(ctx, "SELECT COALESCE(pg_last_wal_receive_lsn(), '0/0')::text").Scan(&s); err != nil {
		t.Fatal(err)
	}
	lsn, err := pglogrepl.ParseLSN(s)
	if err != nil {
		t.Fatal(err)
	}
	return uint64(lsn)
}

func (p standbyPair) insertLSN(ctx context.Context, t *testing.T) uint64 {
	t.Helper()
	var s string
	if err := p.e.Pool.QueryRow(ctx, "SELECT pg_current_wal_insert_lsn()::text").Scan(&s); err != nil {
		t.Fatal(err)
	}
	lsn, err := pglogrepl.ParseLSN(s)
	if err != nil {
		t.Fatal(err)
	}
	return uint64(lsn)
}

func (p standbyPair) pipelineConfig(hold string, m *metrics.Metrics) pipeline.Config {
	e := p.e
	return pipeline.Config{
		Replication: replication.Config{DSN: e.DSN, Slot: e.Slot, Publication: e.Publication, StatusInterval: 100 * time.Millisecond},
		Run:         replication.RunConfig{BatchSize: 1000, BatchTimeout: 50 * time.Millisecond},
		Sink:        e.Sink,
		Metrics:     m,
		StandbyHold: hold,
	}
}

// observed is a logger for the test's output whose entries the test can
// also read.
func observed(t *testing.T) (*zap.Logger, *observer.ObservedLogs) {
	core, logs := observer.New(zapcore.InfoLevel)
	return zap.New(zapcore.NewTee(core, zaptest.NewLogger(t, zaptest.Level(zap.InfoLevel)).Core())), logs
}

// gaugeOr is the streamer's gauge name's sample with label=value, or -1
// when there is none.
func gaugeOr(t *testing.T, m *metrics.Metrics, name, label, value string) float64 {
	t.Helper()
	if v, ok := gauge(t, m, metrics.Namespace+"_"+name, label, value); ok {
		return v
	}
	return -1
}

func counter(t *testing.T, m *metrics.Metrics, name string) float64 {
	t.Helper()
	fams, err := m.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fams {
		if f.GetName() == metrics.Namespace+"_"+name && len(f.GetMetric()) == 1 {
			return f.GetMetric()[0].GetCounter().GetValue()
		}
	}
	return -1
}

// TestStandbyHoldDeliversNothingTheStandbyLacks: with STANDBY_HOLD naming
// a physical standby, rows committed on the primary while the standby's WAL
// receiver is stopped (its received position checked to be short of their
// commit) are decoded by the streamer but do not reach ClickHouse; the
// waiting gauge says so. Once the standby resumes, every row is delivered
// exactly once. A name that is no standby fails the start.
func TestStandbyHoldDeliversNothingTheStandbyLacks(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	p := startStandbyPair(ctx, t, nil)
	e := p.e

	bad := p.pipelineConfig("no_such_standby", nil)
	err := pipeline.Stream(ctx, ctx, bad, zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel)))
	if err == nil || !strings.Contains(err.Error(), `STANDBY_HOLD="no_such_standby"`) {
		t.Fatalf("start with an unknown standby: err = %v, want one naming STANDBY_HOLD", err)
	}

	m := metrics.New()
	log, logs := observed(t)
	fixture.RunPipeline(t, p.pipelineConfig(standbySlot, m), log)
	e.WaitStreaming(t)
	e.Insert(t, 200, false)
	fixture.WaitFor(t, time.Minute, "rows delivered while the standby follows", func() bool { c, _ := e.CHCounts(t); return c == 200 })

	resume := p.pauseWALReceiver(ctx, t)
	before := p.insertLSN(ctx, t)
	received0 := counter(t, m, "rows_received_total")
	e.Insert(t, 300, false)
	e.Insert(t, 1, false)
	if total, _ := e.Committed(t); total != 501 {
		t.Fatalf("%d rows committed on the primary, want 501", total)
	}
	// The standby lacks the commits: what it received ends before them.
	if got := p.standbyReceived(ctx, t); got > before {
		t.Fatalf("the paused standby received up to %s, past %s where the new commits start", pglogrepl.LSN(got), pglogrepl.LSN(before))
	}
	fixture.WaitFor(t, time.Minute, "the streamer decoded the new rows", func() bool {
		return counter(t, m, "rows_received_total")-received0 >= 301
	})
	// The writer has them: it either waits (the fix) or delivers them.
	fixture.WaitFor(t, time.Minute, "the writer waiting for the standby, or the rows in ClickHouse", func() bool {
		c, _ := e.CHCounts(t)
		return gaugeOr(t, m, "standby_hold_waiting", "standby", standbySlot) == 1 || c > 200
	})
	if c, _ := e.CHCounts(t); c != 200 {
		t.Fatalf("ClickHouse holds %d rows while the standby lacks the commits of 301 of them; want the 200 it has", c)
	}
	if got := p.standbyReceived(ctx, t); got > before {
		t.Fatalf("the paused standby received up to %s", pglogrepl.LSN(got))
	}
	if gaugeOr(t, m, "standby_hold_behind_bytes", "standby", standbySlot) <= 0 {
		t.Error("standby_hold_behind_bytes is not positive while the standby lags")
	}

	resume()
	e.AssertExactlyDelivered(t, 2*time.Minute, e.CurrentWAL(t))
	held, caughtUp := logs.FilterMessageSnippet("delivery held: waiting for the standby").All(), logs.FilterMessageSnippet("the standby caught up").Len()
	if len(held) != 1 || caughtUp != 1 {
		t.Errorf("the wait was logged %d times and its end %d times, want once each", len(held), caughtUp)
	} else if held[0].ContextMap()["standby"] != standbySlot {
		t.Errorf("the wait's log names standby %v, want %s", held[0].ContextMap()["standby"], standbySlot)
	}
	fixture.WaitFor(t, time.Minute, "standby_hold_waiting back at 0", func() bool {
		e.Insert(t, 1, false) // a batch after the wait sets the gauge
		return gaugeOr(t, m, "standby_hold_waiting", "standby", standbySlot) == 0
	})
	e.AssertExactlyDelivered(t, 2*time.Minute, e.CurrentWAL(t))
}

// TestStandbyHoldByApplicationNameHoldsWhileTheStandbyIsGone: STANDBY_HOLD
// names the standby by its application_name (it streams through a slot of
// another name); when the standby dies, pg_stat_replication no longer lists
// it: delivery stays held, and that is logged at error level, until it is
// started again; then every row arrives once.
func TestStandbyHoldByApplicationNameHoldsWhileTheStandbyIsGone(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	const app = "hold_by_app"
	p := startStandbyByApp(ctx, t, app)
	e, sb := p.e, p.standby

	m := metrics.New()
	log, logs := observed(t)
	fixture.RunPipeline(t, p.pipelineConfig(app, m), log)
	e.WaitStreaming(t)
	if found := logs.FilterMessageSnippet("delivery waits until the standby").All(); len(found) != 1 || found[0].ContextMap()["found_by"] != "application_name" {
		t.Error("the hold did not find the standby by its application_name")
	}
	e.Insert(t, 100, false)
	fixture.WaitFor(t, time.Minute, "rows delivered while the standby follows", func() bool { c, _ := e.CHCounts(t); return c == 100 })

	if err := sb.Kill(); err != nil {
		t.Fatal(err)
	}
	fixture.WaitFor(t, time.Minute, "the standby gone from pg_stat_replication", func() bool {
		var n int
		_ = e.Pool.QueryRow(ctx, "SELECT count(*) FROM pg_stat_replication WHERE application_name = $1", app).Scan(&n)
		return n == 0
	})
	e.Insert(t, 50, false)
	fixture.WaitFor(t, time.Minute, "the missing standby logged, or the rows in ClickHouse", func() bool {
		c, _ := e.CHCounts(t)
		return logs.FilterMessageSnippet("the standby named by STANDBY_HOLD is gone").Len() > 0 || c > 100
	})
	if c, _ := e.CHCounts(t); c != 100 {
		t.Fatalf("ClickHouse holds %d rows while the standby is gone, want 100", c)
	}
	if got := gaugeOr(t, m, "standby_hold_waiting", "standby", app); got != 1 {
		t.Errorf("standby_hold_waiting = %v while the standby is gone, want 1", got)
	}

	if err := sb.Start(ctx); err != nil {
		t.Fatal(err)
	}
	e.AssertExactlyDelivered(t, 2*time.Minute, e.CurrentWAL(t))
	if logs.FilterMessageSnippet("the standby is back").Len() != 1 {
		t.Error("the standby's return was not logged once")
	}
}

// TestWaitForStandbyConfirmationIsReported (17+): with the standby's
// physical slot in the primary's synchronized_standby_slots and its WAL
// receiver stopped, PostgreSQL holds the slot's changes back; the streamer
// logs a warning naming the standby slot and sets
// standby_confirmation_waiting, and once the standby resumes it says so,
// clears the gauge, and every row is delivered once.
func TestWaitForStandbyConfirmationIsReported(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	major, err := localsvc.PostgresMajor(ctx, localsvc.PostgresOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if major < 17 {
		t.Skipf("PostgreSQL %d has no synchronized_standby_slots (17 and newer)", major)
	}
	p := startStandbyPair(ctx, t, nil)
	e := p.e
	for _, q := range []string{"ALTER SYSTEM SET synchronized_standby_slots = '" + standbySlot + "'", "SELECT pg_reload_conf()"} {
		if _, err := e.Pool.Exec(ctx, q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	m := metrics.New()
	log, logs := observed(t)
	fixture.RunPipeline(t, p.pipelineConfig("", m), log)
	e.WaitStreaming(t)
	e.Insert(t, 100, false)
	fixture.WaitFor(t, time.Minute, "rows delivered while the standby follows", func() bool { c, _ := e.CHCounts(t); return c == 100 })
	if n := logs.FilterMessageSnippet("holds this slot's changes back until the standbys").Len(); n != 0 {
		t.Fatalf("logged %d waits while the standby follows", n)
	}

	if got := gaugeOr(t, m, "slot_failover_wanted", "slot", e.Slot); got != 1 {
		t.Errorf("slot_failover_wanted = %v with synchronized_standby_slots set, want 1", got)
	}
	resume := p.pauseWALReceiver(ctx, t)
	e.Insert(t, 100, false)
	fixture.WaitFor(t, time.Minute, "the wait for the standby logged", func() bool {
		return logs.FilterMessageSnippet("holds this slot's changes back until the standbys").Len() > 0
	})
	entry := logs.FilterMessageSnippet("holds this slot's changes back until the standbys").All()[0]
	if names, ok := entry.ContextMap()["standby_slots"].([]any); !ok || len(names) != 1 || names[0] != standbySlot {
		t.Errorf("the warning names %v, want [%s]", entry.ContextMap()["standby_slots"], standbySlot)
	}
	if got := gaugeOr(t, m, "standby_confirmation_waiting", "slot", e.Slot); got != 1 {
		t.Errorf("standby_confirmation_waiting = %v while the walsender waits, want 1", got)
	}
	if c, _ := e.CHCounts(t); c != 100 {
		t.Fatalf("ClickHouse holds %d rows while PostgreSQL holds the slot back, want 100", c)
	}

	resume()
	e.AssertExactlyDelivered(t, 2*time.Minute, e.CurrentWAL(t))
	fixture.WaitFor(t, time.Minute, "the end of the wait logged", func() bool {
		return logs.FilterMessageSnippet("no longer waits for synchronized_standby_slots").Len() > 0
	})
	if got := gaugeOr(t, m, "standby_confirmation_waiting", "slot", e.Slot); got != 0 {
		t.Errorf("standby_confirmation_waiting = %v after the standby resumed, want 0", got)
	}
	if n := logs.FilterMessageSnippet("holds this slot's changes back until the standbys").Len(); n != 1 {
		t.Errorf("the wait was logged %d times, want once", n)
	}
}

// TestStandbyHoldByApplicationNameNeedsPgMonitor: pg_stat_replication hides a
// standby's flush_lsn from a role without pg_monitor (or pg_read_all_stats),
// so a hold by application_name could never see the standby catch up; the
// start is refused with what to grant, and accepted once it is granted.
func TestStandbyHoldByApplicationNameNeedsPgMonitor(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	const app = "hold_unprivileged"
	e := startStandbyByApp(ctx, t, app).e
	if _, err := e.Pool.Exec(ctx, "CREATE ROLE hold_reader LOGIN"); err != nil {
		t.Fatal(err)
	}
	cfg, err := pgxpool.ParseConfig(e.DSN)
	if err != nil {
		t.Fatal(err)
	}
	cfg.ConnConfig.User = "hold_reader"
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()

	_, err = standby.Open(ctx, standby.Config{Name: app}, pool, zap.NewNop(), nil)
	if err == nil || !strings.Contains(err.Error(), "pg_monitor") || !strings.Contains(err.Error(), app) {
		t.Fatalf("hold by application_name without pg_monitor: got %v, want a refusal that names the standby and pg_monitor", err)
	}
	if _, err := e.Pool.Exec(ctx, "GRANT pg_monitor TO hold_reader"); err != nil {
		t.Fatal(err)
	}
	if _, err := standby.Open(ctx, standby.Config{Name: app}, pool, zap.NewNop(), nil); err != nil {
		t.Fatalf("hold by application_name with pg_monitor: %v", err)
	}
}
