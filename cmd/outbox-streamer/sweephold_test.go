package main

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/fixture"
	"github.com/outbox-streamer/outbox-streamer/internal/harness/localsvc"
	"github.com/outbox-streamer/outbox-streamer/internal/harness/testenv"
)

// TestSweepWithStandbyHoldWaitsForTheStandby: `run --sweep` with
// STANDBY_HOLD delivers failed rows only once the named standby has every
// commit made before the sweep began — here, the rows' own, committed while
// the standby's WAL receiver was stopped.
func TestSweepWithStandbyHoldWaitsForTheStandby(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	pg := testenv.PrivatePostgres(t)
	e := fixture.NewOn(t, pg.DSN(), testenv.ModernClickHouse(t))
	const slot = "sweep_standby"
	sb, err := pg.StartStandby(ctx, localsvc.StandbyOptions{Slot: slot})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sb.Stop() })
	pctx, pcancel := context.WithTimeout(ctx, time.Minute)
	resume, err := sb.PauseWALReceiver(pctx)
	pcancel()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(resume)
	if _, err := e.Pool.Exec(ctx, `INSERT INTO event_outbox (event_type, event_date_time, status, attempts, last_error, next_attempt_at)
		SELECT 'sweep.hold', now() AT TIME ZONE 'UTC', 'failed', 1, 'test', now() - interval '1 minute'
		FROM generate_series(1, 50)`); err != nil {
		t.Fatal(err)
	}

	cmd, out := startStreamerArgs(t, envFor(e, "STANDBY_HOLD="+slot), "run", "--sweep")
	fixture.WaitFor(t, time.Minute, "the sweep held for the standby", func() bool {
		return strings.Contains(out.String(), "delivery held: waiting for the standby to flush the commit")
	})
	if c, _ := e.CHCounts(t); c != 0 {
		t.Fatalf("ClickHouse holds %d rows the standby lacks, want 0", c)
	}
	resume()
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("run --sweep: %v\n%s", err, out)
		}
	case <-ctx.Done():
		t.Fatalf("run --sweep did not finish after the standby resumed:\n%s", out)
	}
	if c, u := e.CHCounts(t); c != 50 || u != 50 {
		t.Fatalf("ClickHouse holds %d rows (%d distinct) after the sweep, want 50", c, u)
	}
	if total, processed := e.Committed(t); processed != total {
		t.Fatalf("%d of %d outbox rows processed after the sweep", processed, total)
	}
}
