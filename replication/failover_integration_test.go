package replication_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/zap/zaptest"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/fixture"
	"github.com/outbox-streamer/outbox-streamer/internal/harness/localsvc"
	"github.com/outbox-streamer/outbox-streamer/internal/harness/testenv"
	"github.com/outbox-streamer/outbox-streamer/replication"
)

// TestFailoverSlot (REPLICATION_SLOT_FAILOVER): before PostgreSQL 17 "on"
// is refused and "auto" creates an ordinary slot. On 17+: "auto" creates an
// ordinary slot while synchronized_standby_slots is empty; "on" turns that
// existing slot into a failover slot, and creates new ones as such; "auto"
// with a standby named in synchronized_standby_slots creates a failover slot,
// which the standby (sync_replication_slots) then holds as synced.
func TestFailoverSlot(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	pg := testenv.PrivatePostgres(t)
	e := fixture.NewOn(t, pg.DSN(), testenv.ModernClickHouse(t))
	open := func(mode string) (replication.SlotInfo, error) {
		t.Helper()
		cfg := replication.Config{DSN: e.DSN, Slot: e.Slot, Publication: e.Publication, SlotFailover: mode}
		s, err := replication.Open(ctx, cfg, zaptest.NewLogger(t))
		if err != nil {
			return replication.SlotInfo{}, err
		}
		_ = s.Close()
		info, err := replication.ReadSlot(ctx, e.Pool, e.Slot)
		if err != nil {
			t.Fatal(err)
		}
		return info, nil
	}
	mustOpen := func(mode string) replication.SlotInfo {
		t.Helper()
		info, err := open(mode)
		if err != nil {
			t.Fatalf("REPLICATION_SLOT_FAILOVER=%s: %v", mode, err)
		}
		return info
	}
	drop := func() {
		t.Helper()
		fixture.WaitFor(t, 30*time.Second, "slot released", func() bool {
			_, err := e.Pool.Exec(ctx, "SELECT pg_drop_replication_slot($1)", e.Slot)
			return err == nil
		})
	}

	if pg.Major < 17 {
		var pe *replication.PreconditionError
		if _, err := open("on"); !errors.As(err, &pe) {
			t.Fatalf("REPLICATION_SLOT_FAILOVER=on on PostgreSQL %d: err = %v, want a precondition error", pg.Major, err)
		}
		if info := mustOpen("auto"); !info.Exists || (info.Failover != nil && *info.Failover) {
			t.Fatalf("auto on PostgreSQL %d: slot %+v, want an ordinary slot", pg.Major, info)
		}
		return
	}
	if info := mustOpen("auto"); info.Failover == nil || *info.Failover {
		t.Fatalf("auto without synchronized_standby_slots: failover = %v, want false", info.Failover)
	}
	if info := mustOpen("on"); !*info.Failover {
		t.Fatal("on: the existing slot was not made a failover slot")
	}
	drop()
	if info := mustOpen("on"); !*info.Failover {
		t.Fatal("on: the new slot is not a failover slot")
	}
	drop()

	standby, err := pg.StartStandby(ctx, localsvc.StandbyOptions{Settings: map[string]string{"sync_replication_slots": "on"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = standby.Stop() })
	for _, q := range []string{"ALTER SYSTEM SET synchronized_standby_slots = 'standby'", "SELECT pg_reload_conf()"} {
		if _, err := e.Pool.Exec(ctx, q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	fixture.WaitFor(t, 10*time.Second, "synchronized_standby_slots in effect", func() bool {
		var v string
		_ = e.Pool.QueryRow(ctx, "SELECT current_setting('synchronized_standby_slots')").Scan(&v)
		return v == "standby"
	})
	if info := mustOpen("auto"); !*info.Failover {
		t.Fatal("auto with synchronized_standby_slots: the new slot is not a failover slot")
	}
	// The standby keeps a synced slot temporary until the primary's slot
	// moves past the standby's horizon; a streamer's confirmations would,
	// here an advance (after a running-transactions record) does.
	sbPool, err := pgxpool.New(ctx, standby.DSN())
	if err != nil {
		t.Fatal(err)
	}
	defer sbPool.Close()
	fixture.WaitFor(t, time.Minute, "the slot synced to the standby", func() bool {
		_, _ = e.Pool.Exec(ctx, "SELECT pg_log_standby_snapshot()")
		_, _ = e.Pool.Exec(ctx, "SELECT pg_replication_slot_advance($1, pg_current_wal_lsn())", e.Slot)
		var n int
		err := sbPool.QueryRow(ctx, `SELECT count(*) FROM pg_replication_slots
			WHERE slot_name = $1 AND synced AND failover AND NOT temporary`, e.Slot).Scan(&n)
		return err == nil && n == 1
	})
}
