package testenv

import (
	"context"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

func TestMain(m *testing.M) { Main(m) }

func TestNewDatabaseCleansUpSlots(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	server := Postgres(t)

	var dbName string
	var repl *pgconn.PgConn
	t.Run("use", func(t *testing.T) {
		dsn := NewDatabase(t)
		conn, err := pgx.Connect(ctx, dsn)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close(ctx)
		if err := conn.QueryRow(ctx, "SELECT current_database()").Scan(&dbName); err != nil {
			t.Fatal(err)
		}
		for _, q := range []string{
			"CREATE TABLE outbox (id bigint primary key)",
			"CREATE PUBLICATION p FOR ALL TABLES",
			"SELECT pg_create_logical_replication_slot('s_active', 'pgoutput')",
			"SELECT pg_create_logical_replication_slot('s_idle', 'pgoutput')",
		} {
			if _, err := conn.Exec(ctx, q); err != nil {
				t.Fatalf("%s: %v", q, err)
			}
		}
		// An active walsender on one slot: cleanup must terminate it
		// before the slot can be dropped.
		repl, err = pgconn.Connect(ctx, dsn+"&replication=database")
		if err != nil {
			t.Fatal(err)
		}
		err = pglogrepl.StartReplication(ctx, repl, "s_active", 0, pglogrepl.StartReplicationOptions{
			PluginArgs: []string{"proto_version '1'", "publication_names 'p'"},
		})
		if err != nil {
			t.Fatalf("start replication: %v", err)
		}
	})
	if repl != nil {
		defer repl.Close(context.Background())
	}
	if dbName == "" {
		t.Fatal("subtest did not create a database")
	}

	conn, err := pgx.Connect(ctx, server)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var slots, dbs int
	if err := conn.QueryRow(ctx, "SELECT count(*) FROM pg_replication_slots WHERE database = $1", dbName).Scan(&slots); err != nil {
		t.Fatal(err)
	}
	if err := conn.QueryRow(ctx, "SELECT count(*) FROM pg_database WHERE datname = $1", dbName).Scan(&dbs); err != nil {
		t.Fatal(err)
	}
	if slots != 0 || dbs != 0 {
		t.Errorf("after cleanup: %d slots, %d databases named %s remain", slots, dbs, dbName)
	}
	var wal string
	if err := conn.QueryRow(ctx, "SHOW wal_level").Scan(&wal); err != nil || wal != "logical" {
		t.Errorf("wal_level = %q (%v), want logical", wal, err)
	}
}

func TestPostgresHandleRestart(t *testing.T) {
	pg := PostgresHandle(t)
	if pg == nil {
		t.Skip("PostgreSQL comes from " + EnvPGDSN)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := pg.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	conn, err := pgx.Connect(ctx, NewDatabase(t))
	if err != nil {
		t.Fatalf("connect after restart: %v", err)
	}
	conn.Close(ctx)
}

func TestClickHouseServers(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for _, srv := range ClickHouseServers(t) {
		t.Run(srv.Name, func(t *testing.T) {
			var db string
			t.Run("use", func(t *testing.T) {
				db = NewCHDatabase(t, srv)
				conn, err := clickhouse.Open(srv.Options(db))
				if err != nil {
					t.Fatal(err)
				}
				defer conn.Close()
				if err := conn.Exec(ctx, "CREATE TABLE events (id UInt64) ENGINE = MergeTree ORDER BY id"); err != nil {
					t.Fatal(err)
				}
				// Not Exec("INSERT ... VALUES"): with 18.16 that never returns.
				batch, err := conn.PrepareBatch(ctx, "INSERT INTO events (id)")
				if err != nil {
					t.Fatal(err)
				}
				if err := batch.Append(uint64(7)); err != nil {
					t.Fatal(err)
				}
				if err := batch.Send(); err != nil {
					t.Fatal(err)
				}
				var id uint64
				if err := conn.QueryRow(ctx, "SELECT id FROM events").Scan(&id); err != nil || id != 7 {
					t.Fatalf("read back id = %d, %v", id, err)
				}
				var version string
				if err := conn.QueryRow(ctx, "SELECT version()").Scan(&version); err != nil {
					t.Fatal(err)
				}
				t.Logf("%s ClickHouse %s at %s", srv.Name, version, srv.Addr)
				if h := ClickHouseHandle(t, srv); h != nil && h.Version != version {
					t.Errorf("handle version %q, server says %q", h.Version, version)
				}
			})
			conn, err := clickhouse.Open(srv.Options("default"))
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			var n uint64
			if err := conn.QueryRow(ctx, "SELECT count() FROM system.databases WHERE name = ?", db).Scan(&n); err != nil {
				t.Fatal(err)
			}
			if n != 0 {
				t.Errorf("database %s not dropped", db)
			}
		})
	}
}

func TestWithDatabase(t *testing.T) {
	for in, want := range map[string]string{
		"postgres://postgres@127.0.0.1:5/postgres?sslmode=disable": "postgres://postgres@127.0.0.1:5/t_x?sslmode=disable",
		"host=h port=5 user=postgres dbname=postgres":              "host=h port=5 user=postgres dbname=postgres dbname=t_x",
	} {
		got, err := withDatabase(in, "t_x")
		if err != nil || got != want {
			t.Errorf("withDatabase(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
}
