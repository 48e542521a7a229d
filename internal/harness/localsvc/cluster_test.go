package localsvc_test

import (
	"context"
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/localsvc"
)

// envRequireCluster, set to 1, makes a missing package (zookeeper, java,
// clickhouse-server) fail the cluster tests instead of skipping them.
const envRequireCluster = "OUTBOX_TEST_REQUIRE_CLUSTER"

func startTestCluster(t *testing.T, ctx context.Context, opts localsvc.ClusterOptions) *localsvc.Cluster {
	t.Helper()
	start := time.Now()
	c, err := localsvc.StartCluster(ctx, opts)
	if errors.Is(err, localsvc.ErrNotInstalled) {
		if os.Getenv(envRequireCluster) == "1" {
			t.Fatalf("%v (required: %s=1)", err, envRequireCluster)
		}
		t.Skipf("cluster %s cannot start: %v (set %s=1 to fail instead)", opts.Kind, err, envRequireCluster)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := c.Stop(); err != nil {
			t.Errorf("stop cluster: %v", err)
		}
		for _, n := range c.Nodes {
			if !localsvc.PortFree(n.TCPPort) {
				t.Errorf("node %s still listening after Stop", n.Addr())
			}
		}
		if c.ZooKeeper != nil && !localsvc.PortFree(c.ZooKeeper.Port) {
			t.Errorf("zookeeper %s still listening after Stop", c.ZooKeeper.Addr())
		}
	})
	var zk string
	if c.ZooKeeper != nil {
		zk = " + zookeeper " + c.ZooKeeper.Addr()
	}
	t.Logf("cluster %q %s: %d shards × %d replicas %v%s, started in %v (version %s)",
		c.Name, c.Kind, c.Shards, c.Replicas, c.Addrs(), zk, time.Since(start).Round(time.Millisecond), c.Nodes[0].Version)
	return c
}

func dial(t *testing.T, addr string) driver.Conn {
	t.Helper()
	conn, err := clickhouse.Open(&clickhouse.Options{Addr: []string{addr}, Protocol: clickhouse.Native, DialTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}

// insertRows inserts ids [from, from+n) through PrepareBatch (with the
// explicit column list 18.16 needs).
func insertRows(ctx context.Context, conn driver.Conn, table string, from, n uint64) error {
	b, err := conn.PrepareBatch(ctx, "INSERT INTO "+table+" (event_id, payload)")
	if err != nil {
		return err
	}
	ids := make([]uint64, n)
	payloads := make([]string, n)
	for i := range ids {
		ids[i] = from + uint64(i)
		payloads[i] = strings.Repeat("p", 200)
	}
	if err := b.Column(0).Append(ids); err != nil {
		return err
	}
	if err := b.Column(1).Append(payloads); err != nil {
		return err
	}
	return b.Send()
}

func count(t *testing.T, ctx context.Context, conn driver.Conn, q string) uint64 {
	t.Helper()
	var n uint64
	if err := conn.QueryRow(ctx, q).Scan(&n); err != nil {
		t.Fatalf("%s: %v", q, err)
	}
	return n
}

// TestClusterReplicated: 1 shard × 2 replicas of 18.16 with ZooKeeper. DDL ON
// CLUSTER, a ReplicatedReplacingMergeTree and a Distributed table over it,
// a synchronous quorum insert through the Distributed table, read back from
// every node with sequential consistency.
func TestClusterReplicated(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	c := startTestCluster(t, ctx, localsvc.ClusterOptions{Kind: localsvc.ClusterReplicated})
	conn := dial(t, c.Nodes[0].Addr())
	on := " ON CLUSTER " + c.Name
	for _, q := range []string{
		"CREATE DATABASE IF NOT EXISTS ev" + on,
		"CREATE TABLE ev.event_log_local" + on + " (event_id UInt64, payload String, inserted_at DateTime DEFAULT now())" +
			" ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/ev/event_log_local', '{replica}') ORDER BY event_id",
		"CREATE TABLE ev.event_log" + on + " AS ev.event_log_local ENGINE = Distributed(" + c.Name + ", ev, event_log_local, cityHash64(event_id))",
	} {
		if err := conn.Exec(ctx, q); err != nil {
			logTail(t, c.Nodes[0].LogPath, c.Nodes[0].Dir+"/clickhouse.err.log")
			t.Fatalf("%s: %v", q, err)
		}
	}
	const n = 100000
	sync := clickhouse.Context(ctx, clickhouse.WithSettings(clickhouse.Settings{
		"insert_distributed_sync": 1, "insert_quorum": len(c.Nodes), "insert_quorum_timeout": 60000,
	}))
	start := time.Now()
	if err := insertRows(sync, conn, "ev.event_log", 0, n); err != nil {
		t.Fatalf("insert through Distributed (sync, quorum %d): %v", len(c.Nodes), err)
	}
	t.Logf("%d rows through Distributed, insert_distributed_sync=1, insert_quorum=%d: %v", n, len(c.Nodes), time.Since(start).Round(time.Millisecond))
	// No waiting: a quorum insert returned, so every replica in the quorum
	// (here all of them) already has the rows.
	seq := clickhouse.Context(ctx, clickhouse.WithSettings(clickhouse.Settings{"select_sequential_consistency": 1}))
	for _, node := range c.Nodes {
		nc := dial(t, node.Addr())
		if got := count(t, seq, nc, "SELECT count() FROM ev.event_log_local"); got != n {
			t.Errorf("node %s (shard %d replica %d): local table has %d rows, want %d", node.Addr(), node.Shard, node.Replica, got, n)
		}
		if got := count(t, seq, nc, "SELECT count() FROM ev.event_log"); got != n {
			t.Errorf("node %s: Distributed table has %d rows, want %d", node.Addr(), got, n)
		}
	}
	// A lost answer re-sent to the other replica is deduplicated (the same
	// block, within the same second because of the DEFAULT now() column).
	quorum := clickhouse.Context(ctx, clickhouse.WithSettings(clickhouse.Settings{"insert_quorum": len(c.Nodes)}))
	for _, node := range c.Nodes {
		if err := insertRows(quorum, dial(t, node.Addr()), "ev.event_log_local", n, 10); err != nil {
			t.Fatalf("insert into %s: %v", node.Addr(), err)
		}
	}
	got := count(t, seq, conn, "SELECT count() FROM ev.event_log")
	t.Logf("the same 10-row block sent to each replica: %d rows now (want %d if deduplicated)", got, n+10)
	if got != n+10 && got != n+20 {
		t.Errorf("after re-sent block: %d rows", got)
	}

	// Comparison: the same rows straight into the local replicated table.
	if err := conn.Exec(ctx, "TRUNCATE TABLE ev.event_log_local"+on); err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	if err := insertRows(quorum, conn, "ev.event_log_local", 0, n); err != nil {
		t.Fatal(err)
	}
	t.Logf("%d rows into the local replicated table, insert_quorum=%d: %v", n, len(c.Nodes), time.Since(start).Round(time.Millisecond))
}

// TestClusterSharded: 2 shards of 26.7 (chDB) without replication or
// coordination: a Distributed table over plain MergeTree tables.
func TestClusterSharded(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	c := startTestCluster(t, ctx, localsvc.ClusterOptions{Kind: localsvc.ClusterSharded})
	// No DDL worker in clickhouse-local: create the tables on every node.
	for _, node := range c.Nodes {
		nc := dial(t, node.Addr())
		for _, q := range []string{
			"CREATE DATABASE IF NOT EXISTS ev",
			"CREATE TABLE ev.event_log_local (event_id UInt64, payload String, inserted_at DateTime64(6) DEFAULT now64(6))" +
				" ENGINE = ReplacingMergeTree ORDER BY event_id SETTINGS non_replicated_deduplication_window = 1000",
			"CREATE TABLE ev.event_log AS ev.event_log_local ENGINE = Distributed(" + c.Name + ", ev, event_log_local, cityHash64(event_id))",
		} {
			if err := nc.Exec(ctx, q); err != nil {
				t.Fatalf("%s on %s: %v", q, node.Addr(), err)
			}
		}
	}
	conn := dial(t, c.Nodes[0].Addr())
	const n = 100000
	sync := clickhouse.Context(ctx, clickhouse.WithSettings(clickhouse.Settings{"distributed_foreground_insert": 1}))
	start := time.Now()
	if err := insertRows(sync, conn, "ev.event_log", 0, n); err != nil {
		t.Fatalf("insert through Distributed (foreground): %v", err)
	}
	t.Logf("%d rows through Distributed, distributed_foreground_insert=1: %v", n, time.Since(start).Round(time.Millisecond))
	var sum uint64
	for _, node := range c.Nodes {
		nc := dial(t, node.Addr())
		local := count(t, ctx, nc, "SELECT count() FROM ev.event_log_local")
		if local == 0 || local == n {
			t.Errorf("node %s holds %d of %d rows: not sharded", node.Addr(), local, n)
		}
		sum += local
		if got := count(t, ctx, nc, "SELECT count() FROM ev.event_log"); got != n {
			t.Errorf("node %s: Distributed table has %d rows, want %d", node.Addr(), got, n)
		}
		t.Logf("shard %d (%s): %d rows", node.Shard, node.Addr(), local)
	}
	if sum != n {
		t.Errorf("shards hold %d rows together, want %d", sum, n)
	}
	for _, node := range c.Nodes {
		if err := dial(t, node.Addr()).Exec(ctx, "TRUNCATE TABLE ev.event_log_local"); err != nil {
			t.Fatal(err)
		}
	}
	start = time.Now()
	if err := insertRows(ctx, conn, "ev.event_log_local", 0, n); err != nil {
		t.Fatal(err)
	}
	t.Logf("%d rows into one node's local table: %v", n, time.Since(start).Round(time.Millisecond))
}

// logTail logs the last lines of each file, for failures.
func logTail(t *testing.T, paths ...string) {
	t.Helper()
	for _, p := range paths {
		data, err := os.ReadFile(p)
		if err != nil {
			t.Logf("%s: %v", p, err)
			continue
		}
		lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
		// A crash's stack trace, if any, rather than the last lines.
		var crash []string
		for _, l := range lines {
			if strings.Contains(l, "BaseDaemon") {
				crash = append(crash, l)
			}
		}
		if len(crash) > 0 {
			lines = crash
		}
		if len(lines) > 15 {
			lines = lines[len(lines)-15:]
		}
		t.Logf("--- %s ---\n%s", p, strings.Join(lines, "\n"))
	}
}
