package migrations_test

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/zap"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/testenv"
	"github.com/outbox-streamer/outbox-streamer/internal/record"
	"github.com/outbox-streamer/outbox-streamer/migrations"
	"github.com/outbox-streamer/outbox-streamer/sink"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// TestHostileIdentifiers (issue 11 item 9): every identifier that comes from
// configuration stays inside its quoting. PUBLICATION_NAME used to be pasted
// into a DO $$ ... $$ block, where a name holding $$ ran as SQL.
func TestHostileIdentifiers(t *testing.T) {
	publications := []string{
		`p$$; CREATE TABLE pwned (x int); DO $$BEGIN END`,
		`p$outbox$; CREATE TABLE pwned (x int); --`,
		`p"; CREATE TABLE pwned (x int); --`,
		`p'; CREATE TABLE pwned (x int); --`,
	}
	chNames := []string{"db`; DROP DATABASE system; --", `db\'"x`}
	for _, srv := range testenv.ClickHouseServers(t) {
		for i, pub := range publications {
			t.Run(srv.Name+"/"+pub, func(t *testing.T) {
				ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
				defer cancel()
				dsn := testenv.NewDatabase(t)
				chdb := chNames[i%len(chNames)]
				table := "event`log" + chdb
				if srv.Legacy {
					// 18.16 keeps databases in directories named after them.
					chdb, table = testenv.NewCHDatabase(t, srv), "event_log"
				} else {
					t.Cleanup(func() { dropCH(t, srv, chdb) })
				}
				cfg := migrations.Config{PostgresDSN: dsn, Publication: pub,
					ClickHouse: sink.Config{Addr: srv.Addr, User: "default", Database: chdb, Table: table}}
				if err := migrations.Up(ctx, cfg); err != nil {
					t.Fatalf("migrate up: %v", err)
				}
				conn, err := pgx.Connect(ctx, dsn)
				if err != nil {
					t.Fatal(err)
				}
				defer conn.Close(ctx)
				var pwned bool
				if err := conn.QueryRow(ctx, "SELECT to_regclass('pwned') IS NOT NULL").Scan(&pwned); err != nil || pwned {
					t.Fatalf("the publication name ran as SQL (table pwned exists: %v, %v)", pwned, err)
				}
				var inserts bool
				if err := conn.QueryRow(ctx, "SELECT pubinsert FROM pg_publication WHERE pubname = $1", pub).Scan(&inserts); err != nil || !inserts {
					t.Fatalf("publication %q not created as named: %v", pub, err)
				}
				// The ClickHouse table is usable under its hostile name.
				w, err := sink.Open(ctx, cfg.ClickHouse, zap.NewNop())
				if err != nil {
					t.Fatal(err)
				}
				defer w.Close()
				now := time.Now().UTC().Truncate(time.Second)
				evs := []record.Event{{ID: 7, Type: "t", Time: now, CreatedAt: now, Context: "{}"}}
				if err := w.Insert(ctx, evs); err != nil {
					t.Fatalf("insert into %q.%q: %v", chdb, table, err)
				}
				if found, err := w.ExistingIDs(ctx, evs); err != nil || len(found) != 1 {
					t.Fatalf("look up in %q.%q: %v %v", chdb, table, found, err)
				}
				if err := migrations.Down(ctx, cfg, 0); err != nil {
					t.Fatalf("migrate down: %v", err)
				}
			})
		}
	}
}

func dropCH(t *testing.T, srv testenv.CHServer, db string) {
	w, err := sink.Connect(sink.Config{Addr: srv.Addr, User: "default", Database: "system"})
	if err != nil {
		return
	}
	defer w.Close()
	_ = w.Exec(context.Background(), "DROP DATABASE IF EXISTS "+sink.QuoteIdent(db))
}
