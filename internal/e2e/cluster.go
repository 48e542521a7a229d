package e2e

import (
	"context"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-streamer/outbox-streamer/internal/outboxstore"
	"github.com/outbox-streamer/outbox-streamer/internal/testenv"
	"github.com/outbox-streamer/outbox-streamer/migrations"
	"github.com/outbox-streamer/outbox-streamer/sink"
)

// Migrate applies the migrations of e (both databases); NewCluster calls it
// once e's databases are named.
type Migrate func(ctx context.Context, e *Env) error

// MigrateInProcess runs migrations.Up with e's configuration.
func MigrateInProcess(ctx context.Context, e *Env) error {
	return migrations.Up(ctx, migrations.Config{PostgresDSN: e.DSN, Publication: e.Publication, ClickHouse: e.Sink})
}

// NewCluster is NewOn with the event table on the ClickHouse cluster c: the
// migrations (migrate, or MigrateInProcess if nil) run with CLICKHOUSE_CLUSTER,
// e.Table is the Distributed event table (what the assertions count, without
// FINAL), e.CHConn reads it through c's first node, and merges are stopped
// on every node's local table (a merge would hide a duplicate).
func NewCluster(t *testing.T, serverDSN string, c *testenv.CHCluster, migrate Migrate) *Env {
	t.Helper()
	if migrate == nil {
		migrate = MigrateInProcess
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	db := testenv.NewCHClusterDatabase(t, c)
	e := &Env{
		DSN: testenv.NewDatabaseOn(t, serverDSN), Slot: "s_cluster_" + randomHex(t), Publication: "outbox_publication",
		CH:     c.First(),
		Sink:   sink.Config{Addr: c.First().Addr, User: "default", Database: db, Table: "event_log", Cluster: c.Name},
		Outbox: outboxstore.DefaultName,
	}
	if err := e.Sink.Validate(); err != nil {
		t.Fatal(err)
	}
	if err := migrate(ctx, e); err != nil {
		t.Fatalf("migrate on cluster %q: %v%s", c.Name, err, testenv.CrashNote())
	}
	pcfg, err := pgxpool.ParseConfig(e.DSN)
	if err != nil {
		t.Fatal(err)
	}
	pcfg.MaxConns = 8
	if e.Pool, err = pgxpool.NewWithConfig(ctx, pcfg); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Pool.Close)
	conn, err := clickhouse.Open(c.First().Options(db))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	e.CHConn = conn
	e.Table = sink.QuoteIdent(db) + "." + sink.QuoteIdent("event_log")
	e.StopClusterMerges(t, c)
	return e
}

// StopClusterMerges stops merges of the local event table on every node of c
// (see StopMerges). A restarted node forgets it: call it again after one.
func (e *Env) StopClusterMerges(t testing.TB, c *testenv.CHCluster) {
	t.Helper()
	for _, n := range c.Nodes {
		e.onNode(t, n, func(ctx context.Context, conn clickhouse.Conn) error {
			return conn.Exec(ctx, "SYSTEM STOP MERGES "+sink.QuoteIdent(sink.LocalTable(e.Sink.Table)))
		})
	}
}

// nodeCounts is what one node's local event table holds.
type nodeCounts struct{ count, unique, sum uint64 }

// localCounts reads count(), uniqExact(event_id) and sum(event_id) of n's
// local event table, without FINAL.
func (e *Env) localCounts(t testing.TB, n testenv.CHServer) nodeCounts {
	t.Helper()
	var nc nodeCounts
	e.onNode(t, n, func(ctx context.Context, conn clickhouse.Conn) error {
		return conn.QueryRow(ctx, "SELECT count(), uniqExact(event_id), sum(event_id) FROM "+
			sink.QuoteIdent(sink.LocalTable(e.Sink.Table))).Scan(&nc.count, &nc.unique, &nc.sum)
	})
	return nc
}

// AssertShardsAgree checks where the rows are on the cluster: within each
// shard every replica's local table holds the same rows once each (count,
// distinct ids and sum of ids equal), the shards together hold every
// committed outbox row once (the same count and sum of ids as PostgreSQL),
// and with several shards each shard holds some. Replicas still behind (a
// part to fetch after a fault) are waited for. It returns the rows per shard.
func (e *Env) AssertShardsAgree(t testing.TB, c *testenv.CHCluster) []uint64 {
	t.Helper()
	var total, sumPG int64
	if err := e.Pool.QueryRow(context.Background(), "SELECT count(*), COALESCE(sum(id), 0) FROM "+e.Outbox.Ident()).Scan(&total, &sumPG); err != nil {
		t.Fatal(err)
	}
	var counts []nodeCounts // as c.Nodes
	WaitFor(t, 2*time.Minute, "every replica caught up with its shard", func() bool {
		counts = counts[:0]
		for _, n := range c.Nodes {
			counts = append(counts, e.localCounts(t, n))
		}
		var rows uint64
		for s := 0; s < c.Shards; s++ {
			shard := counts[s*c.Replicas : (s+1)*c.Replicas]
			for _, r := range shard[1:] {
				if r.count != shard[0].count {
					return false
				}
			}
			rows += shard[0].count
		}
		return rows >= uint64(total)
	})
	perShard := make([]uint64, c.Shards)
	var all nodeCounts
	for s := 0; s < c.Shards; s++ {
		shard := counts[s*c.Replicas : (s+1)*c.Replicas]
		for r, got := range shard {
			if got != shard[0] || got.count != got.unique {
				t.Errorf("shard %d replica %d: count()=%d uniqExact(event_id)=%d sum(event_id)=%d; replica 1: %d, %d, %d",
					s+1, r+1, got.count, got.unique, got.sum, shard[0].count, shard[0].unique, shard[0].sum)
			}
		}
		perShard[s] = shard[0].count
		all.count += shard[0].count
		all.unique += shard[0].unique
		all.sum += shard[0].sum
		if c.Shards > 1 && shard[0].count == 0 {
			t.Errorf("shard %d holds no rows: the Distributed table did not spread them", s+1)
		}
	}
	if all.count != uint64(total) || all.unique != uint64(total) || all.sum != uint64(sumPG) {
		t.Errorf("the shards hold count()=%d uniqExact(event_id)=%d sum(event_id)=%d together, want %d rows with id sum %d",
			all.count, all.unique, all.sum, total, sumPG)
	}
	return perShard
}

// onNode runs f on a connection to node n's copy of e's ClickHouse database.
func (e *Env) onNode(t testing.TB, n testenv.CHServer, f func(context.Context, clickhouse.Conn) error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := clickhouse.Open(n.Options(e.Sink.Database))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if err := f(ctx, conn); err != nil {
		t.Fatalf("node %s: %v%s", n.Addr, err, testenv.CrashNote())
	}
}
