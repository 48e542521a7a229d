package localsvc_test

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/localsvc"
)

// An old cluster: epoch 1, the 32-bit counter a few thousand xids before its
// wraparound, catalog and data usable across it.
func TestPostgresOldCluster(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	const next = 1<<32 - 3000
	pg, err := localsvc.StartPostgres(ctx, localsvc.PostgresOptions{XIDEpoch: 1, NextXID: next})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pg.Stop() })
	conn, err := pgx.Connect(ctx, pg.DSN())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)

	var first int64
	var version string
	if err := conn.QueryRow(ctx, "SELECT txid_current(), current_setting('server_version')").Scan(&first, &version); err != nil {
		t.Fatal(err)
	}
	t.Logf("PostgreSQL %s, txid_current() = %d", version, first)
	if lo, hi := int64(1)<<32+next-1, int64(1)<<32+next+1000; first < lo || first > hi {
		t.Fatalf("txid_current() = %d, want about epoch 1, xid %d (%d)", first, next, int64(1)<<32+next)
	}
	if _, err := conn.Exec(ctx, "CREATE TABLE t (id int)"); err != nil {
		t.Fatal(err)
	}
	// Cross the 32-bit wraparound: one transaction per insert.
	for i := range 3500 {
		if _, err := conn.Exec(ctx, "INSERT INTO t VALUES ($1)", i); err != nil {
			t.Fatalf("insert %d: %v", i, err)
		}
	}
	var last int64
	var rows int
	if err := conn.QueryRow(ctx, "SELECT txid_current(), (SELECT count(*) FROM t)").Scan(&last, &rows); err != nil {
		t.Fatal(err)
	}
	if last < int64(2)<<32 || rows != 3500 {
		t.Fatalf("after 3,500 transactions: txid_current() = %d (want epoch 2), %d rows (want 3500)", last, rows)
	}
	// Every database still usable, template0 closed again.
	var dbs int
	var template0Open bool
	if err := conn.QueryRow(ctx, "SELECT count(*), bool_or(datallowconn AND datname = 'template0') FROM pg_database").Scan(&dbs, &template0Open); err != nil {
		t.Fatal(err)
	}
	if dbs < 3 || template0Open {
		t.Fatalf("pg_database: %d databases, template0 open %v", dbs, template0Open)
	}
	if _, err := conn.Exec(ctx, "CREATE DATABASE fromtemplate"); err != nil {
		t.Fatalf("create a database from template1 after aging: %v", err)
	}
}
