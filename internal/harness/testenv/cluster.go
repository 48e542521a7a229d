package testenv

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"

	"github.com/ClickHouse/clickhouse-go/v2"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/localsvc"
)

// Environment variables of a ClickHouse cluster (set by
// `outbox-devenv --cluster replicated|sharded`).
const (
	// EnvCHClusterAddrs lists every node of a cluster (native host:port,
	// comma-separated, shard by shard, replica by replica).
	EnvCHClusterAddrs = "OUTBOX_TEST_CH_CLUSTER_ADDRS"
	// EnvCHCluster is the cluster's name (<remote_servers>), as the
	// streamer's CLICKHOUSE_CLUSTER.
	EnvCHCluster = "CLICKHOUSE_CLUSTER"
	// EnvRequireCluster, set to "1", makes a cluster that cannot start (a
	// missing zookeeper, java or clickhouse-server) a test failure instead
	// of a skip.
	EnvRequireCluster = "OUTBOX_TEST_REQUIRE_CLUSTER"
)

// CHCluster is a ClickHouse cluster tests can use.
type CHCluster struct {
	// Name is the cluster's name for CLICKHOUSE_CLUSTER.
	Name string
	// Nodes are its servers, shard by shard, replica by replica; Nodes[0]
	// is the one the streamer connects to.
	Nodes []CHServer
	// Handle is the cluster when this binary started it (for chaos tests);
	// nil when it was named by environment variables.
	Handle *localsvc.Cluster
	// Shards and Replicas (per shard) give the layout: Nodes[i] is shard
	// i/Replicas+1, replica i%Replicas+1.
	Shards, Replicas int
}

// First is the node the streamer connects to.
func (c *CHCluster) First() CHServer { return c.Nodes[0] }

// clusterLayout is a topology of a local replicated cluster.
type clusterLayout struct{ shards, replicas int }

var (
	// clusterMu guards clusterSvcs, one shared cluster per layout.
	clusterMu   sync.Mutex
	clusterSvcs = map[clusterLayout]*service[*localsvc.Cluster]{}
)

// Cluster returns a replicated ClickHouse cluster shared by this test
// binary: the one named by OUTBOX_TEST_CH_CLUSTER_ADDRS and
// CLICKHOUSE_CLUSTER if set, else ZooKeeper and one shard of two 18.16
// replicas started once (localsvc.StartCluster). Missing packages skip the
// test unless OUTBOX_TEST_REQUIRE_CLUSTER=1. Tests that stop or kill nodes
// must use PrivateCluster.
func Cluster(t testing.TB) *CHCluster {
	t.Helper()
	if c := envCluster(t); c != nil {
		return c
	}
	return ClusterOf(t, 1, 2)
}

// ClusterOf returns a cluster of shards × replicas 18.16 servers (with
// ZooKeeper) shared by this test binary: the one named by the environment
// (as in Cluster) when it has this layout, else one started once per layout.
// Missing packages skip the test unless OUTBOX_TEST_REQUIRE_CLUSTER=1.
func ClusterOf(t testing.TB, shards, replicas int) *CHCluster {
	t.Helper()
	if c := envCluster(t); c != nil && c.Shards == shards && c.Replicas == replicas {
		return c
	}
	skipWithoutCluster(t)
	l := clusterLayout{shards, replicas}
	clusterMu.Lock()
	svc := clusterSvcs[l]
	if svc == nil {
		svc = &service[*localsvc.Cluster]{}
		clusterSvcs[l] = svc
	}
	clusterMu.Unlock()
	what := fmt.Sprintf("ClickHouse cluster (%d shards × %d replicas)", shards, replicas)
	h := startShared(t, svc, what, func(ctx context.Context) (*localsvc.Cluster, error) {
		return localsvc.StartCluster(ctx, localsvc.ClusterOptions{Shards: shards, Replicas: replicas, OnCrash: recordCrash})
	})
	return clusterOf(h)
}

// envCluster is the cluster named by OUTBOX_TEST_CH_CLUSTER_ADDRS and
// CLICKHOUSE_CLUSTER, its layout read from system.clusters; nil when unset.
func envCluster(t testing.TB) *CHCluster {
	t.Helper()
	addrs := os.Getenv(EnvCHClusterAddrs)
	if addrs == "" {
		return nil
	}
	name := os.Getenv(EnvCHCluster)
	if name == "" {
		t.Fatalf("testenv: %s is set but %s is not", EnvCHClusterAddrs, EnvCHCluster)
	}
	c := &CHCluster{Name: name}
	for _, a := range strings.Split(addrs, ",") {
		c.Nodes = append(c.Nodes, CHServer{Name: "node", Addr: a, Legacy: isLegacy(t, a)})
	}
	c.Shards, c.Replicas = layoutOf(t, c.First(), name)
	return c
}

// layoutOf reads a cluster's shards and replicas per shard (the fewest of
// any shard) from the server's system.clusters.
func layoutOf(t testing.TB, srv CHServer, name string) (shards, replicas int) {
	t.Helper()
	conn, err := clickhouse.Open(srv.Options("default"))
	if err != nil {
		t.Fatalf("testenv: cluster node %s: %v", srv.Addr, err)
	}
	defer conn.Close()
	var s, r uint64
	err = conn.QueryRow(context.Background(), "SELECT uniqExact(shard_num), min(n) FROM (SELECT shard_num, count() AS n FROM system.clusters WHERE cluster = ? GROUP BY shard_num)", name).Scan(&s, &r)
	if err != nil {
		t.Fatalf("testenv: layout of cluster %q on %s: %v", name, srv.Addr, err)
	}
	return int(s), int(r)
}

// PrivateCluster starts a replicated cluster (ZooKeeper, 1 shard × 2
// replicas of 18.16) for this test alone and stops it when the test ends.
func PrivateCluster(t testing.TB) *CHCluster {
	t.Helper()
	skipWithoutCluster(t)
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	h, err := localsvc.StartCluster(ctx, localsvc.ClusterOptions{OnCrash: reportCrashesTo(t)})
	if err != nil {
		t.Fatalf("testenv: start private cluster: %v", err)
	}
	registerStop(h.Stop)
	t.Cleanup(func() { _ = h.Stop() })
	return clusterOf(h)
}

func clusterOf(h *localsvc.Cluster) *CHCluster {
	c := &CHCluster{Name: h.Name, Handle: h, Shards: h.Shards, Replicas: h.Replicas}
	for _, n := range h.Nodes {
		c.Nodes = append(c.Nodes, CHServer{Name: fmt.Sprintf("s%dr%d", n.Shard, n.Replica), Addr: n.Addr(), HTTPAddr: n.HTTPAddr(), Legacy: n.Legacy})
	}
	return c
}

// skipWithoutCluster skips t (or fails it, with EnvRequireCluster=1) when
// the packages of a replicated cluster are missing.
func skipWithoutCluster(t testing.TB) {
	t.Helper()
	_, err := localsvc.FindZooKeeper("")
	if err == nil {
		_, err = localsvc.FindClickHouseLegacy("")
	}
	if err == nil {
		return
	}
	if errors.Is(err, localsvc.ErrNotInstalled) && os.Getenv(EnvRequireCluster) != "1" {
		t.Skipf("testenv: no ClickHouse cluster here: %v (set %s=1 to fail instead)", err, EnvRequireCluster)
	}
	t.Fatalf("testenv: ClickHouse cluster required (%s=1): %v", EnvRequireCluster, err)
}

func isLegacy(t testing.TB, addr string) bool {
	t.Helper()
	conn, err := clickhouse.Open(CHServer{Addr: addr}.Options("default"))
	if err != nil {
		t.Fatalf("testenv: cluster node %s: %v", addr, err)
	}
	defer conn.Close()
	var v string
	if err := conn.QueryRow(context.Background(), "SELECT version()").Scan(&v); err != nil {
		t.Fatalf("testenv: cluster node %s: %v", addr, err)
	}
	return !strings.HasPrefix(v, "2") || strings.HasPrefix(v, "20.") || strings.HasPrefix(v, "21.")
}

// NewCHClusterDatabase returns a fresh database name t_<random hex> for a
// test on c and drops it ON CLUSTER (the migrations create it) when the
// test ends.
func NewCHClusterDatabase(t testing.TB, c *CHCluster) string {
	t.Helper()
	name := "t_" + randomHex(t)
	t.Cleanup(func() {
		// Each node on its own: a node a chaos test left down must not fail
		// the cleanup of the others.
		for _, n := range c.Nodes {
			if err := chExec(n, "DROP DATABASE IF EXISTS "+name); err != nil {
				t.Logf("testenv: cleanup of ClickHouse database %s on %s: %v", name, n.Addr, err)
			}
		}
	})
	return name
}
