package sink

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"

	"github.com/outbox-streamer/outbox-streamer/internal/record"
)

// On a cluster (Config.Cluster, CLICKHOUSE_CLUSTER) the event table is a
// Distributed table over LocalTable(Table) on every node (see the
// migrations' cluster flavours), and the client keeps exactly-once delivery
// as follows (docs/clickhouse-cluster.md has the argument and the
// measurements):
//
//   - Inserts go through the Distributed table, synchronously
//     (insert_distributed_sync / distributed_foreground_insert = 1): an
//     acknowledged insert is on every shard. The server routes rows by the
//     sharding key, so an event always lands on the same shard and the
//     client needs no topology for inserting.
//   - On replicated shards, with insert_quorum = the replicas per shard: an
//     acknowledged insert is on every replica. insert_quorum_timeout is below
//     the request timeout, so a quorum that cannot be reached ends as the
//     server's error rather than as a client timeout.
//   - A lookup (ExistingIDs: the reconcile after a restart and the lookup
//     after an insert of unknown outcome) must see every row that is, or may
//     later become, visible anywhere. On 18.16 a quorum insert that timed out
//     is not rolled back: its part stays on the replica that wrote it and
//     shows up everywhere once the others fetch it. A read through the
//     Distributed table reads one replica per shard, and a sequentially
//     consistent read does not show a part whose quorum is incomplete; so
//     the lookup does not read through it. It waits until no node runs an
//     insert into the table (system.processes of every node: the
//     cluster() table function reads one replica per shard, and 18.16 has no
//     clusterAllReplicas), then reads every node's local table without
//     sequential consistency and takes the union. A node that is down fails
//     the lookup (a part may live only there): the delivery engine retries
//     it as it retries any unavailable server.
//   - A committed part is not always kept: when its quorum fails (no active
//     replica has it when another one tries to fetch it, e.g. its writer's
//     ZooKeeper session expired), 18.16 lists it in <zk>/quorum/failed_parts
//     and the writer detaches it ("noquorum_") when it reactivates. Before
//     reading, the lookup therefore waits until no quorum insert is in
//     progress and no node still holds a part of a failed quorum
//     (awaitQuorumsSettled): then every part it reads stays.
//
// The client learns the nodes from system.clusters of the server it is
// connected to and connects to each by the host and port named there.

// LocalTable is the name of the event table's local table on every node of
// a cluster: table + "_local".
func LocalTable(table string) string { return table + "_local" }

// clusterInfo is what the client knows of its cluster.
type clusterInfo struct {
	name             string
	shards, replicas int // replicas: the fewest of any shard
	nodes            []*clusterNode
	local            string // quoted db.<table>_local
	// database, table and localName are the unquoted names matched in
	// system.processes and system.parts.
	database, table, localName string
	// major is the server's major version: which settings exist.
	major int
	// zkMu guards the nodes' zkPath (lookups run concurrently).
	zkMu sync.Mutex
}

type clusterNode struct {
	shard, replica int
	addr           string
	conn           driver.Conn
	// zkPath is the local table's ZooKeeper path (system.replicas), read
	// once by the first lookup that needs it.
	zkPath string
}

// ErrUnknownCluster means CLICKHOUSE_CLUSTER names no cluster of the server.
var ErrUnknownCluster = errors.New("cluster not in system.clusters")

// loadCluster reads the cluster's nodes from system.clusters and connects
// to each.
func loadCluster(ctx context.Context, conn driver.Conn, cfg Config, version string) (*clusterInfo, error) {
	rows, err := conn.Query(ctx, "SELECT shard_num, replica_num, host_name, port FROM system.clusters WHERE cluster = "+
		quoteString(cfg.Cluster)+" ORDER BY shard_num, replica_num")
	if err != nil {
		return nil, fmt.Errorf("read cluster %q from system.clusters at %s: %w", cfg.Cluster, cfg.Addr, err)
	}
	defer rows.Close()
	ci := &clusterInfo{name: cfg.Cluster, database: cfg.Database, table: cfg.Table, localName: LocalTable(cfg.Table),
		local: QuoteIdent(cfg.Database) + "." + QuoteIdent(LocalTable(cfg.Table))}
	ci.major, _ = strconv.Atoi(strings.SplitN(version, ".", 2)[0])
	perShard := map[uint32]int{}
	for rows.Next() {
		var shard, replica uint32
		var host string
		var port uint16
		if err := rows.Scan(&shard, &replica, &host, &port); err != nil {
			return nil, fmt.Errorf("read cluster %q from system.clusters: %w", cfg.Cluster, err)
		}
		perShard[shard]++
		ci.nodes = append(ci.nodes, &clusterNode{shard: int(shard), replica: int(replica), addr: net.JoinHostPort(host, strconv.Itoa(int(port)))})
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("read cluster %q from system.clusters: %w", cfg.Cluster, err)
	}
	if len(ci.nodes) == 0 {
		return nil, fmt.Errorf("CLICKHOUSE_CLUSTER %q: %w of %s (check <remote_servers> in the server's configuration)", cfg.Cluster, ErrUnknownCluster, cfg.Addr)
	}
	ci.shards = len(perShard)
	for _, n := range perShard {
		if ci.replicas == 0 || n < ci.replicas {
			ci.replicas = n
		}
	}
	for _, n := range ci.nodes {
		ncfg := cfg
		ncfg.Addr = n.addr
		if n.conn, err = Connect(ncfg); err != nil {
			ci.close()
			return nil, err
		}
	}
	return ci, nil
}

func (ci *clusterInfo) close() {
	for _, n := range ci.nodes {
		if n.conn != nil {
			_ = n.conn.Close()
		}
	}
}

func (ci *clusterInfo) addrs() []string {
	out := make([]string, len(ci.nodes))
	for i, n := range ci.nodes {
		out[i] = n.addr
	}
	return out
}

// quorum is the insert_quorum sent: every replica of a shard (0: none, on
// shards without replicas).
func (ci *clusterInfo) quorum() int {
	if ci.replicas > 1 {
		return ci.replicas
	}
	return 0
}

// insertSettings adds the settings of an insert on the cluster.
func (ci *clusterInfo) insertSettings(s clickhouse.Settings, timeout time.Duration) {
	// The same setting under its new name since 23.x; the old one stays an
	// alias, but the new one says what is meant.
	if ci.major >= 23 {
		s["distributed_foreground_insert"] = 1
	} else {
		s["insert_distributed_sync"] = 1
	}
	if q := ci.quorum(); q > 0 {
		s["insert_quorum"] = q
		// Below the request timeout: a quorum that is not reached is the
		// server's error (UNKNOWN_STATUS_OF_INSERT), not a client timeout
		// with the insert still running.
		s["insert_quorum_timeout"] = int((timeout * 3 / 4).Milliseconds())
		if ci.major >= 22 {
			// Sequential quorum inserts (the 18.16 behaviour, and what the
			// docs require of select_sequential_consistency); the writer
			// inserts one batch at a time anyway.
			s["insert_quorum_parallel"] = 0
		}
	}
}

// runningInserts counts the inserts into the event table or its local table
// running on any node. A Distributed insert runs as an insert into the
// local table on the other shards, with the query text the initiator
// builds: the names are matched unquoted, anywhere in an INSERT.
func (ci *clusterInfo) runningInserts(ctx context.Context) (uint64, error) {
	q := "SELECT count() FROM system.processes WHERE positionCaseInsensitive(query, 'INSERT') = 1 AND position(query, " +
		quoteString(ci.table) + ") > 0"
	var total uint64
	for _, n := range ci.nodes {
		var c uint64
		if err := n.conn.QueryRow(ctx, q).Scan(&c); err != nil {
			return 0, fmt.Errorf("list inserts on cluster node %s: %w", n.addr, err)
		}
		total += c
	}
	return total, nil
}

// quorumSettlePoll is how often awaitQuorumsSettled asks the nodes again.
const quorumSettlePoll = 200 * time.Millisecond

// awaitQuorumsSettled waits until no node has a quorum insert into the local
// table in progress or still holds a part whose quorum failed: until every
// part a lookup can read is one the cluster keeps. A quorum in progress may
// still fail, and a failed part is visible on its writer until that replica
// reactivates and detaches it; a lookup that counted either as delivered
// would lose its rows. The wait is bounded (three request timeouts; the
// failure of a quorum can wait for a ZooKeeper session to expire), after
// which the lookup fails as a transient error and is retried.
func (ci *clusterInfo) awaitQuorumsSettled(ctx context.Context, timeout time.Duration) error {
	if ci.quorum() == 0 {
		return nil // no quorum inserts, so no failed quorums
	}
	deadline := time.Now().Add(timeout)
	for {
		pending, err := ci.unsettledQuorums(ctx)
		if err != nil || pending == "" {
			return err
		}
		if time.Now().After(deadline) {
			// DeadlineExceeded: transient for the delivery engine's classifier.
			return fmt.Errorf("look up ids on cluster %q: %s after %v: %w", ci.name, pending, timeout, context.DeadlineExceeded)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(quorumSettlePoll):
		}
	}
}

// unsettledQuorums describes what is unsettled on the first node where
// something is ("" when nothing is).
func (ci *clusterInfo) unsettledQuorums(ctx context.Context) (string, error) {
	for _, n := range ci.nodes {
		zk, err := ci.zkPathOf(ctx, n)
		if err != nil {
			return "", err
		}
		// <zk>/quorum/status exists while a quorum insert waits for its
		// replicas (sequential quorums: insert_quorum_parallel=0).
		q := "SELECT (SELECT count() FROM system.zookeeper WHERE path = " + quoteString(zk+"/quorum") + " AND name = 'status'), " +
			"(SELECT count() FROM system.parts WHERE database = " + quoteString(ci.database) + " AND table = " + quoteString(ci.localName) +
			" AND active AND name IN (SELECT name FROM system.zookeeper WHERE path = " + quoteString(zk+"/quorum/failed_parts") + "))"
		var inProgress, failed uint64
		if err := n.conn.QueryRow(ctx, q).Scan(&inProgress, &failed); err != nil {
			return "", fmt.Errorf("read the quorum state of %s on %s: %w", ci.local, n.addr, err)
		}
		if inProgress > 0 || failed > 0 {
			return fmt.Sprintf("node %s: a quorum insert in progress (%d), parts of failed quorums not yet detached (%d)", n.addr, inProgress, failed), nil
		}
	}
	return "", nil
}

// zkPathOf returns the local table's ZooKeeper path on n, read from
// system.replicas the first time.
func (ci *clusterInfo) zkPathOf(ctx context.Context, n *clusterNode) (string, error) {
	ci.zkMu.Lock()
	defer ci.zkMu.Unlock()
	if n.zkPath != "" {
		return n.zkPath, nil
	}
	err := n.conn.QueryRow(ctx, "SELECT zookeeper_path FROM system.replicas WHERE database = "+quoteString(ci.database)+
		" AND table = "+quoteString(ci.localName)).Scan(&n.zkPath)
	if err != nil {
		return "", fmt.Errorf("read the ZooKeeper path of %s on %s: %w", ci.local, n.addr, err)
	}
	return n.zkPath, nil
}

// clusterExistingIDs is ExistingIDs on a cluster: see the comment at the top.
func (c *Client) clusterExistingIDs(ctx context.Context, ci *clusterInfo, events []record.Event) (map[int64]struct{}, error) {
	c.awaitInsertsDone(ctx)
	if err := ci.awaitQuorumsSettled(ctx, 3*c.cfg.ReadTimeout); err != nil {
		c.noteFailure(err)
		return nil, err
	}
	// No SYSTEM SYNC REPLICA first: it waits for the replica's whole queue,
	// merges and fetches from a replica that is down included, and hung here
	// for minutes after a replica came back (docs/clickhouse-cluster.md). It
	// is not needed either: a committed part is on the replica that wrote it,
	// where a plain read sees it (quorum reached or not), until every
	// replica has it; reading every node covers every part.
	found := make(map[int64]struct{})
	q := c.lookupQuery(events, ci.local)
	for _, n := range ci.nodes {
		rows, err := n.conn.Query(ctx, q)
		if err != nil {
			c.noteFailure(err)
			return nil, fmt.Errorf("look up %d event ids in %s on %s: %w", len(events), ci.local, n.addr, err)
		}
		err = scanIDs(rows, found)
		rows.Close()
		if err != nil {
			return nil, fmt.Errorf("look up event ids in %s on %s: %w", ci.local, n.addr, err)
		}
	}
	return found, nil
}

// clusterInfo returns the cluster Ready learnt, or nil on a single server.
func (c *Client) clusterInfo() *clusterInfo {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.cluster
}

// QuoteString quotes s as a ClickHouse string literal.
func QuoteString(s string) string { return quoteString(s) }
