package migrations_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/testenv"
	"github.com/outbox-streamer/outbox-streamer/migrations"
	"github.com/outbox-streamer/outbox-streamer/sink"
)

// TestClusterMigrations (issue 16): with CLICKHOUSE_CLUSTER the migrations
// create the database and the local table ON CLUSTER, on every node, with a
// replicated engine, and the event table as a Distributed table over it;
// down drops both everywhere; status names the cluster flavour.
func TestClusterMigrations(t *testing.T) {
	c := testenv.Cluster(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	db := testenv.NewCHClusterDatabase(t, c)
	cfg := migrations.Config{PostgresDSN: testenv.NewDatabase(t), Publication: "outbox_publication",
		ClickHouse: sink.Config{Addr: c.First().Addr, User: "default", Database: db, Table: "event_log", Cluster: c.Name}}
	if err := migrations.Up(ctx, cfg); err != nil {
		t.Fatalf("migrate up: %v", err)
	}
	engines := func(n testenv.CHServer) map[string]string {
		conn, err := clickhouse.Open(n.Options("default"))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		rows, err := conn.Query(ctx, "SELECT name, engine_full FROM system.tables WHERE database = '"+db+"'")
		if err != nil {
			t.Fatal(err)
		}
		defer rows.Close()
		out := map[string]string{}
		for rows.Next() {
			var name, engine string
			if err := rows.Scan(&name, &engine); err != nil {
				t.Fatal(err)
			}
			out[name] = engine
		}
		return out
	}
	for _, n := range c.Nodes {
		got := engines(n)
		if e := got["event_log_local"]; !strings.HasPrefix(e, "ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/"+db+"/event_log_local', '{replica}')") {
			t.Errorf("node %s: event_log_local engine %q", n.Addr, e)
		}
		if e := got["event_log"]; !strings.HasPrefix(e, "Distributed('"+c.Name+"', '"+db+"', 'event_log_local', cityHash64(event_id))") {
			t.Errorf("node %s: event_log engine %q", n.Addr, e)
		}
	}
	st, err := migrations.Statuses(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if len(st) != 2 || st[1].Flavour == "" || !strings.HasSuffix(st[1].Flavour, "-cluster") || st[1].State != "up to date" {
		t.Fatalf("statuses %+v", st)
	}
	t.Logf("%s", st[1])
	if err := migrations.Down(ctx, cfg, 1); err != nil {
		t.Fatalf("migrate down: %v", err)
	}
	for _, n := range c.Nodes {
		got := engines(n)
		if _, ok := got["event_log"]; ok {
			t.Errorf("node %s: event_log left after down", n.Addr)
		}
		if _, ok := got["event_log_local"]; ok {
			t.Errorf("node %s: event_log_local left after down", n.Addr)
		}
	}
	if err := migrations.Up(ctx, cfg); err != nil {
		t.Fatalf("migrate up again: %v", err)
	}
}
