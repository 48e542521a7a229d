package migrations_test

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/testenv"
	"github.com/outbox-streamer/outbox-streamer/internal/record"
	"github.com/outbox-streamer/outbox-streamer/migrations"
	"github.com/outbox-streamer/outbox-streamer/sink"
)

// TestContextTypeJSON (issue 18): CLICKHOUSE_CONTEXT_TYPE=JSON creates
// event_context as ClickHouse's JSON type on a modern server; the streamer's
// insert and lookup work unchanged, and a query reads one field as a
// subcolumn. The legacy server refuses it with a clear line; String stays
// the default everywhere.
func TestContextTypeJSON(t *testing.T) {
	ctx := context.Background()
	for _, srv := range testenv.ClickHouseServers(t) {
		t.Run(srv.Name, func(t *testing.T) {
			cfg := migrations.Config{PostgresDSN: testenv.NewDatabase(t), Publication: "outbox_publication", ContextType: "JSON",
				ClickHouse: sink.Config{Addr: srv.Addr, User: "default", Database: testenv.NewCHDatabase(t, srv), Table: "event_log"}}
			err := migrations.Up(ctx, cfg)
			if srv.Legacy {
				if err == nil || !strings.Contains(err.Error(), "CLICKHOUSE_CONTEXT_TYPE=JSON needs ClickHouse 25.3") {
					t.Fatalf("JSON on %s: %v, want a clear refusal", srv.Name, err)
				}
				cfg.ContextType = ""
				if err := migrations.Up(ctx, cfg); err != nil {
					t.Fatalf("String (the default) on %s: %v", srv.Name, err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			w, err := sink.Open(ctx, cfg.ClickHouse, zap.NewNop())
			if err != nil {
				t.Fatal(err)
			}
			defer w.Close()
			now := time.Now().UTC().Truncate(time.Microsecond)
			evs := []record.Event{
				{ID: 1, Type: "user.signed_in", Time: now, CreatedAt: now, Context: `{"user_id": "u-42", "ip": "10.0.0.1"}`},
				{ID: 2, Type: "user.signed_in", Time: now, CreatedAt: now, Context: `{"user_id": "u-7"}`},
				{ID: 3, Type: "order.paid", Time: now, CreatedAt: now, Context: `{}`},
			}
			if err := w.Insert(ctx, evs); err != nil {
				t.Fatalf("insert into a JSON event_context: %v", err)
			}
			if found, err := w.ExistingIDs(ctx, evs); err != nil || len(found) != 3 {
				t.Fatalf("lookup: %v %v", found, err)
			}
			conn, err := sink.Connect(cfg.ClickHouse)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			var typ string
			if err := conn.QueryRow(ctx, "SELECT type FROM system.columns WHERE database = ? AND table = 'event_log' AND name = 'event_context'",
				cfg.ClickHouse.Database).Scan(&typ); err != nil || typ != "JSON" {
				t.Fatalf("event_context type %q (%v), want JSON", typ, err)
			}
			var n uint64
			if err := conn.QueryRow(ctx, "SELECT count() FROM "+w.Table()+" WHERE event_context.user_id = 'u-42'").Scan(&n); err != nil || n != 1 {
				t.Fatalf("subcolumn filter: %d rows (%v), want 1", n, err)
			}
		})
	}
}

// TestAnalysisDocSQL runs the SQL of docs/analysis.md, in order, on a fresh
// event table of the modern server: the per-type table gets every sign-in
// once, those inserted before its view by the backfill and those after by
// the view.
func TestAnalysisDocSQL(t *testing.T) {
	raw, err := os.ReadFile("../docs/analysis.md")
	if err != nil {
		t.Fatal(err)
	}
	var blocks []string
	for _, part := range strings.Split(string(raw), "```sql\n")[1:] {
		blocks = append(blocks, part[:strings.Index(part, "```")])
	}
	if len(blocks) != 4 {
		t.Fatalf("docs/analysis.md has %d sql blocks, the test knows 4 (count, view, backfill, query)", len(blocks))
	}
	ctx := context.Background()
	srv := testenv.ModernClickHouse(t)
	db := testenv.NewCHDatabase(t, srv)
	cfg := migrations.Config{PostgresDSN: testenv.NewDatabase(t), Publication: "outbox_publication",
		ClickHouse: sink.Config{Addr: srv.Addr, User: "default", Database: db, Table: "event_log"}}
	if err := migrations.Up(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	w, err := sink.Open(ctx, cfg.ClickHouse, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	conn, err := sink.Connect(cfg.ClickHouse)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	run := func(i int) {
		t.Helper()
		for _, stmt := range strings.Split(strings.ReplaceAll(blocks[i], "analytics", db), ";") {
			if strings.TrimSpace(stmt) == "" {
				continue
			}
			if err := conn.Exec(ctx, stmt); err != nil {
				t.Fatalf("docs/analysis.md block %d: %v\n%s", i, err, stmt)
			}
		}
	}
	now := time.Now().UTC().Truncate(time.Microsecond)
	signIn := func(id int64, user string, mfa bool) record.Event {
		return record.Event{ID: id, Type: "user.signed_in", Time: now, CreatedAt: now,
			Context: fmt.Sprintf(`{"user_id": %q, "ip": "10.0.0.%d", "session": {"mfa": %t}}`, user, id, mfa)}
	}
	if err := w.Insert(ctx, []record.Event{signIn(1, "u-1", true), signIn(2, "u-1", false), signIn(3, "u-2", false),
		{ID: 4, Type: "order.paid", Time: now, CreatedAt: now, Context: `{"user_id": "u-1"}`}}); err != nil {
		t.Fatal(err)
	}
	run(0) // the String filter
	run(1) // the per-type table and its view
	if err := w.Insert(ctx, []record.Event{signIn(5, "u-2", true), signIn(6, "u-1", true)}); err != nil {
		t.Fatal(err)
	}
	run(2) // the backfill
	var rows, ids uint64
	var mfa uint64
	if err := conn.QueryRow(ctx, "SELECT count(), uniqExact(event_id), countIf(mfa) FROM "+db+".user_sign_ins").Scan(&rows, &ids, &mfa); err != nil {
		t.Fatal(err)
	}
	if rows != 5 || ids != 5 || mfa != 3 {
		t.Fatalf("user_sign_ins holds %d rows, %d ids, %d with mfa; want 5, 5, 3", rows, ids, mfa)
	}
	run(3) // the query on the per-type table
}
