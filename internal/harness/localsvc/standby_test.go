package localsvc_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/localsvc"
)

// TestPhysicalStandbyPromotion: a standby made by StartStandby follows its
// primary (read-only, every committed row replayed), and after the primary
// is killed, Promote makes it a primary that holds those rows and accepts
// writes. The major comes from OUTBOX_PG_VERSION (make test-pg-compat runs
// it on each).
func TestPhysicalStandbyPromotion(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	primary, standby := startPair(ctx, t, nil, nil)
	execOn(ctx, t, primary, "INSERT INTO t SELECT g FROM generate_series(101, 200) g")
	waitCount(ctx, t, standby, "SELECT count(*) FROM t", 200)
	if !inRecovery(ctx, t, standby) {
		t.Fatal("the standby is not in recovery")
	}
	var pgErr *pgconn.PgError
	if err := tryExec(ctx, standby, "INSERT INTO t VALUES (0)"); !errors.As(err, &pgErr) || pgErr.Code != "25006" {
		t.Fatalf("a write on the standby: err = %v, want read_only_sql_transaction", err)
	}

	if err := primary.Kill(); err != nil {
		t.Fatal(err)
	}
	if err := standby.Promote(ctx); err != nil {
		t.Fatal(err)
	}
	if inRecovery(ctx, t, standby) {
		t.Fatal("still in recovery after Promote")
	}
	execOn(ctx, t, standby, "INSERT INTO t VALUES (201)")
	waitCount(ctx, t, standby, "SELECT count(*) FROM t", 201)
}

// TestPhysicalStandbySyncsFailoverSlots (17+): a logical slot created with
// failover on the primary is synchronised to a standby with
// sync_replication_slots, and after the primary is killed and the standby
// promoted, the slot decodes what the new primary commits and nothing it
// had confirmed before.
func TestPhysicalStandbySyncsFailoverSlots(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	major, err := localsvc.PostgresMajor(ctx, localsvc.PostgresOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if major < 17 {
		t.Skipf("PostgreSQL %d has no failover slots (17 and newer)", major)
	}
	primary, standby := startPair(ctx, t, nil, map[string]string{"sync_replication_slots": "on"})
	execOn(ctx, t, primary, "CREATE PUBLICATION p FOR TABLE t")
	execOn(ctx, t, primary, "SELECT pg_create_logical_replication_slot('ls', 'pgoutput', false, false, true)")
	// A logical walsender may not send past what the standby flushed.
	execOn(ctx, t, primary, "ALTER SYSTEM SET synchronized_standby_slots = 'standby'")
	execOn(ctx, t, primary, "SELECT pg_reload_conf()")
	execOn(ctx, t, primary, "INSERT INTO t VALUES (1000)")
	// The standby keeps a synced slot temporary until the primary's slot has
	// moved past the standby's own horizon: consume, as a streamer would,
	// with a running-transactions record logged each time so that the
	// slot's catalog xmin advances too.
	for !slotSynced(ctx, t, standby, "ls") {
		execOn(ctx, t, primary, "SELECT pg_log_standby_snapshot()")
		execOn(ctx, t, primary, "SELECT pg_replication_slot_advance('ls', pg_current_wal_lsn())")
		if ctx.Err() != nil {
			t.Fatal("the failover slot was not synchronised to the standby")
		}
		time.Sleep(200 * time.Millisecond)
	}

	if err := primary.Kill(); err != nil {
		t.Fatal(err)
	}
	if err := standby.Promote(ctx); err != nil {
		t.Fatal(err)
	}
	execOn(ctx, t, standby, "INSERT INTO t VALUES (1001)")
	// 'I': the insert of 1001 only; 1000 was confirmed on the old primary.
	waitCount(ctx, t, standby, `SELECT count(*) FROM pg_logical_slot_peek_binary_changes('ls', NULL, NULL,
		'proto_version', '1', 'publication_names', 'p') WHERE get_byte(data, 0) = 73`, 1)
}

// slotSynced reports whether the standby holds slot as a synchronised,
// persistent failover slot.
func slotSynced(ctx context.Context, t *testing.T, standby *localsvc.Postgres, slot string) bool {
	t.Helper()
	conn, err := pgx.Connect(ctx, standby.DSN())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	var n int
	err = conn.QueryRow(ctx, `SELECT count(*) FROM pg_replication_slots
		WHERE slot_name = $1 AND synced AND failover AND NOT temporary`, slot).Scan(&n)
	if err != nil {
		t.Fatal(err)
	}
	return n == 1
}

// startPair starts a primary with table t (rows 1..100) and a standby of it.
func startPair(ctx context.Context, t *testing.T, primarySettings, standbySettings map[string]string) (primary, standby *localsvc.Postgres) {
	t.Helper()
	primary, err := localsvc.StartPostgres(ctx, localsvc.PostgresOptions{Settings: primarySettings})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = primary.Stop() })
	execOn(ctx, t, primary, "CREATE TABLE t (id int PRIMARY KEY)")
	execOn(ctx, t, primary, "INSERT INTO t SELECT g FROM generate_series(1, 100) g")
	standby, err = primary.StartStandby(ctx, localsvc.StandbyOptions{Settings: standbySettings})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = standby.Stop() })
	if standby.Major != primary.Major {
		t.Fatalf("standby runs %s, primary %s", standby.Version, primary.Version)
	}
	return primary, standby
}

func tryExec(ctx context.Context, pg *localsvc.Postgres, sql string) error {
	conn, err := pgx.Connect(ctx, pg.DSN())
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	_, err = conn.Exec(ctx, sql)
	return err
}

func execOn(ctx context.Context, t *testing.T, pg *localsvc.Postgres, sql string) {
	t.Helper()
	if err := tryExec(ctx, pg, sql); err != nil {
		t.Fatalf("%s on port %d: %v", sql, pg.Port, err)
	}
}

func inRecovery(ctx context.Context, t *testing.T, pg *localsvc.Postgres) bool {
	t.Helper()
	conn, err := pgx.Connect(ctx, pg.DSN())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	var r bool
	if err := conn.QueryRow(ctx, "SELECT pg_is_in_recovery()").Scan(&r); err != nil {
		t.Fatal(err)
	}
	return r
}

// waitCount waits until query (a count) returns want on pg, failing when
// ctx ends first.
func waitCount(ctx context.Context, t *testing.T, pg *localsvc.Postgres, query string, want int) {
	t.Helper()
	var got int
	var err error
	for ctx.Err() == nil {
		var conn *pgx.Conn
		if conn, err = pgx.Connect(ctx, pg.DSN()); err == nil {
			err = conn.QueryRow(ctx, query).Scan(&got)
			conn.Close(context.Background())
			if err == nil && got == want {
				return
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("%s on port %d: got %d (err %v), want %d", query, pg.Port, got, err, want)
}
