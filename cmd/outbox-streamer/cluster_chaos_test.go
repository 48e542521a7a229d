package main

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"reflect"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/fixture"
	"github.com/outbox-streamer/outbox-streamer/internal/harness/loadgen"
	"github.com/outbox-streamer/outbox-streamer/internal/harness/localsvc"
	"github.com/outbox-streamer/outbox-streamer/internal/harness/testenv"
)

// TestClusterChaosSIGKILL drives the real binary (`outbox-streamer run`,
// restarted by a supervisor) against a private cluster: ZooKeeper and one
// shard of two 18.16 replicas, CLICKHOUSE_CLUSTER set and the migrations run
// by the binary with it. While a producer commits transactions (some rolled
// back) for the whole test, the streamer is SIGKILLed six times at seeded
// random moments, around two replica outages (see clusterChaos.run): the
// streamer's node SIGKILLed and restarted, then the other frozen past the
// streamer's receive timeout (quorum inserts of unknown outcome, some of
// which fail for good and have their part detached), then the other
// SIGKILLed and restarted. At the end the Distributed table holds, without
// FINAL, every committed event once (count() = uniqExact(event_id) = the
// producer's commits, the same sum of ids as the outbox), every row is
// processed, and each replica's local table holds the same rows. Merges are
// stopped on every local table (again after each restart) so that no
// duplicate is merged away. OUTBOX_CHAOS_SEED replays a run's moments.
func TestClusterChaosSIGKILL(t *testing.T) {
	if testing.Short() {
		t.Skip("chaos test skipped in -short mode")
	}
	c := testenv.PrivateCluster(t) // skips without the packages, unless required
	seed, rng := chaosSeed(t)
	e := fixture.NewCluster(t, testenv.Postgres(t), c, func(ctx context.Context, e *fixture.Env) error {
		return migrateWithBinary(t, clusterEnvFor(e))
	})
	sup := superviseStreamer(t, clusterEnvFor(e))
	sup.keepLogsOnFailure(fmt.Sprintf("cluster-chaos-%d.log", seed))
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("outbox rows by status: %v", e.StatusCounts(t))
			logClusterState(t, c, e.Sink.Database)
			logMissing(t, c, e)
		}
	})
	e.WaitStreaming(t)

	stopLoad := startLoad(t, e, seed)
	ch := clusterChaos{t: t, rng: rng, sup: sup, c: c, e: e}
	ch.run()
	st := stopLoad()
	t.Logf("producer: %d events committed, %d rolled back; chaos: %d streamer SIGKILLs, replicas SIGKILLed: %v, one frozen; %d streamer starts, exits %v",
		st.Committed, st.RolledBack, ch.kills, ch.outages, sup.starts(), sup.exitStatuses())

	fixture.WaitFor(t, 3*time.Minute, "every outbox row processed", func() bool {
		_, processed := e.Committed(t)
		return processed == st.Committed
	})
	// Processed rows are in ClickHouse (a replica may still be fetching
	// them): a row missing a minute later is lost.
	e.AssertExactlyDelivered(t, time.Minute, e.CurrentWAL(t))
	if total, _ := e.Committed(t); total != st.Committed {
		t.Fatalf("the outbox holds %d rows, the producer committed %d", total, st.Committed)
	}
	perShard := e.AssertShardsAgree(t, c)
	t.Logf("cluster chaos survived: %d committed events delivered exactly once (%v on each replica)", st.Committed, perShard)
	logs := sup.logs()
	for _, ev := range []string{"insert into clickhouse failed, retrying", "clickhouse unavailable: batch marked failed",
		"rows found in clickhouse are not sent again", "a quorum insert in progress"} {
		t.Logf("streamer log lines %q: %d", ev, strings.Count(logs, ev))
	}
	t.Logf("parts of failed quorums the nodes detached: %d", countServerLog(c, "to noquorum_"))
}

// countServerLog counts the lines of every node's log that contain s.
func countServerLog(c *testenv.CHCluster, s string) int {
	n := 0
	for _, node := range c.Handle.Nodes {
		data, _ := os.ReadFile(node.LogPath)
		n += strings.Count(string(data), s)
	}
	return n
}

// clusterEnvFor is the binary's environment for e on its cluster, with short
// timeouts (a quorum insert that cannot complete ends within 3.75 s) and
// quick retries, so that the faults play out within the test.
func clusterEnvFor(e *fixture.Env) []string {
	return envFor(e, "CLICKHOUSE_CLUSTER="+e.Sink.Cluster,
		"CLICKHOUSE_OUTAGE_FAIL_AFTER=2s", "EVENT_PROCESSING_INTERVAL=1s", "RETRY_MAX_WAIT=1s",
		"EVENT_RETRY_BASE_DELAY=0.5", "EVENT_RETRY_MAX_DELAY=2", "CLICKHOUSE_CONNECT_TIMEOUT=2", "CLICKHOUSE_SEND_RECEIVE_TIMEOUT=5")
}

// migrateWithBinary runs `outbox-streamer migrate up` and checks that it
// used the cluster flavour.
func migrateWithBinary(t *testing.T, env []string) error {
	t.Helper()
	code, out := runCmd(t, env, "migrate", "up")
	if code != 0 {
		return fmt.Errorf("migrate up: exit %d:\n%s", code, out)
	}
	if !strings.Contains(out, "legacy-cluster") {
		return fmt.Errorf("migrate up did not use the legacy-cluster flavour:\n%s", out)
	}
	return nil
}

// startLoad commits events through the producer library until the returned
// function is called; that function waits for the transactions in flight and
// returns what was committed.
func startLoad(t *testing.T, e *fixture.Env, seed int64) (stop func() loadgen.Stats) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan loadgen.Stats, 1)
	go func() {
		st, err := loadgen.Run(ctx, e.Pool, loadgen.Config{
			Rate: 1500, TxSize: 30, RollbackFraction: 0.1, Connections: 2, Copy: true, Seed: seed,
		}, nil)
		if err != nil && !errors.Is(err, context.Canceled) {
			t.Errorf("load generator: %v", err)
		}
		done <- st
	}()
	t.Cleanup(cancel)
	return func() loadgen.Stats {
		cancel()
		return <-done
	}
}

// clusterChaos is the faults of TestClusterChaosSIGKILL.
type clusterChaos struct {
	t   *testing.T
	rng *rand.Rand
	sup *supervisor
	c   *testenv.CHCluster
	e   *fixture.Env

	kills   int
	outages []string
}

// run: SIGKILLs of the streamer at random moments, around two replica
// outages.
//
// First the node the streamer connects to is SIGKILLed, the streamer is
// SIGKILLed while it is down, and the node is restarted; then the other node
// is frozen, the streamer SIGKILLed during the freeze, and the other node
// thawed once the restarted node's old ZooKeeper session (10 s from the
// kill) has expired. The restarted node takes inserts at once but
// reactivates only 10 s after its restart: a quorum insert it took while the
// other was frozen can then fail for good (the thawed node finds no active
// replica to fetch it from), its part detached — what a lookup must not
// count as delivered; others end in doubt and complete later.
//
// Then, with both replicas active again, the other node is SIGKILLed for a
// few seconds (the streamer's node forwarding inserts to a dead replica),
// with a streamer SIGKILL while it is down.
func (ch *clusterChaos) run() {
	first, second := ch.c.Handle.Nodes[0], ch.c.Handle.Nodes[1]
	ch.pause(500, 2000)
	ch.kill()

	ch.pause(500, 2000)
	down := ch.killNode(first)
	ch.pause(1000, 2000) // inserts fail (quorum 2)
	ch.kill()
	ch.pause(1000, 2000)
	ch.restart(first, down)
	// Frozen 4.5–6.5 s: within the frozen node's own session timeout, so
	// that it fetches as soon as it is thawed.
	ch.sleepUntil(down.Add(5500 * time.Millisecond))
	ch.pause(0, 1000)
	if err := second.Freeze(); err != nil {
		ch.t.Fatal(err)
	}
	ch.pause(1000, 2000)
	ch.kill()
	ch.sleepUntil(down.Add(11 * time.Second))
	ch.pause(0, 1000)
	if err := second.Thaw(); err != nil {
		ch.t.Fatal(err)
	}

	ch.awaitReplicasActive()
	ch.pause(500, 2000)
	ch.kill()
	ch.pause(500, 2000)
	down = ch.killNode(second)
	ch.pause(1000, 2000)
	ch.kill()
	ch.pause(500, 1500)
	ch.restart(second, down)
	for ch.kills < 6 {
		ch.pause(500, 2500)
		ch.kill()
	}
	ch.pause(1000, 2000) // the last start streams under load for a while
}

// sleepUntil sleeps until at (at once if it has passed).
func (ch *clusterChaos) sleepUntil(at time.Time) { time.Sleep(time.Until(at)) }

// killNode SIGKILLs a node and returns when.
func (ch *clusterChaos) killNode(n *localsvc.ClusterNode) time.Time {
	if err := n.Kill(); err != nil {
		ch.t.Fatal(err)
	}
	return time.Now()
}

// awaitReplicasActive waits until the first node sees every replica of the
// local table active (a restarted replica reactivates only once its old
// ZooKeeper session has expired).
func (ch *clusterChaos) awaitReplicasActive() {
	q := "SELECT active_replicas = total_replicas FROM system.replicas WHERE database = '" + ch.e.Sink.Database + "'"
	fixture.WaitFor(ch.t, time.Minute, "every replica active", func() bool {
		return strings.TrimSpace(queryRows(ch.c.First(), q)) == "1"
	})
}

// pause sleeps between min and max milliseconds, as the seed says.
func (ch *clusterChaos) pause(minMS, maxMS int) {
	time.Sleep(time.Duration(minMS+ch.rng.IntN(maxMS-minMS)) * time.Millisecond)
}

func (ch *clusterChaos) kill() {
	ch.sup.kill()
	ch.kills++
}

// restart brings a killed node back and stops its merges again (a restart
// forgets them).
func (ch *clusterChaos) restart(n *localsvc.ClusterNode, down time.Time) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := n.Start(ctx); err != nil {
		ch.t.Fatalf("restart %s: %v", n.Addr(), err)
	}
	ch.e.StopClusterMerges(ch.t, ch.c)
	ch.outages = append(ch.outages, fmt.Sprintf("s%dr%d down %v", n.Shard, n.Replica, time.Since(down).Round(time.Millisecond)))
}

// logClusterState logs what every node holds and runs and its replication
// queue, for a failure: an insert the streamer waits for, or a part a
// replica cannot fetch, shows there.
func logClusterState(t *testing.T, c *testenv.CHCluster, db string) {
	for _, n := range c.Nodes {
		for _, q := range []string{
			"SELECT count(), uniqExact(event_id) FROM " + db + ".event_log_local",
			"SELECT elapsed, substring(query, 1, 120) FROM system.processes WHERE query NOT LIKE '%system.processes%'",
			"SELECT is_leader, is_readonly, is_session_expired, queue_size, inserts_in_queue, merges_in_queue, active_replicas FROM system.replicas WHERE database = '" + db + "'",
			"SELECT type, new_part_name, source_replica, num_tries, substring(last_exception, 1, 300), postpone_reason FROM system.replication_queue WHERE database = '" + db + "' LIMIT 20",
		} {
			t.Logf("node %s: %s:\n%s", n.Addr, q, queryRows(n, q))
		}
	}
}

// serverLogEvents and sessionEvents pick the lines of a node's log that
// tell what happened to parts and sessions.
var (
	serverLogEvents = regexp.MustCompile(`(?i)quorum|unexpected part|detach|lost|removing part|no active replica|will fetch|readonly|Error`)
	sessionEvents   = regexp.MustCompile(`(?i)session expired|zookeeper session|already active`)
)

// logMissing logs the outbox rows no node holds, as ranges of ids with when
// they were created and last updated (to match with the streamer's log), and
// the nodes' log lines about parts and sessions.
func logMissing(t *testing.T, c *testenv.CHCluster, e *fixture.Env) {
	t.Logf("outbox rows on no node:\n%s", missingRanges(e, heldIDs(c, e.Sink.Database)))
	if c.Handle == nil {
		return
	}
	for _, n := range c.Handle.Nodes {
		t.Logf("node %s log (%s), lines about parts and sessions:\n%s", n.Addr(), n.LogPath, serverLogLines(n.LogPath, e.Sink.Database))
	}
}

// heldIDs returns the event ids some node's local table holds.
func heldIDs(c *testenv.CHCluster, db string) map[int64]bool {
	held := map[int64]bool{}
	for _, n := range c.Nodes {
		for _, l := range strings.Fields(queryRows(n, "SELECT event_id FROM "+db+".event_log_local")) {
			if id, err := strconv.ParseInt(l, 10, 64); err == nil {
				held[id] = true
			}
		}
	}
	return held
}

// missingRanges describes the outbox rows not in held, one range of
// consecutive ids a line, with its first row's times, attempts and status.
func missingRanges(e *fixture.Env, held map[int64]bool) string {
	rows, err := e.Pool.Query(context.Background(), "SELECT id, created_at::text, updated_at::text, attempts, status FROM "+e.Outbox.Ident()+" ORDER BY id")
	if err != nil {
		return err.Error()
	}
	defer rows.Close()
	var b strings.Builder
	var from, last int64 = -1, -1
	var note string
	flush := func() {
		if from >= 0 {
			fmt.Fprintf(&b, "  ids %d..%d (%d): %s\n", from, last, last-from+1, note)
		}
		from = -1
	}
	for rows.Next() {
		var id int64
		var created, updated, status string
		var attempts int
		if err := rows.Scan(&id, &created, &updated, &attempts, &status); err != nil {
			return err.Error()
		}
		if held[id] {
			flush()
			continue
		}
		if from < 0 || id != last+1 {
			flush()
			from, note = id, fmt.Sprintf("created %s, updated %s, %d attempts, %s", created, updated, attempts, status)
		}
		last = id
	}
	flush()
	return b.String()
}

// serverLogLines returns the last 60 lines of a server log about db's parts
// or about ZooKeeper sessions.
func serverLogLines(path, db string) string {
	data, _ := os.ReadFile(path)
	var lines []string
	for _, l := range strings.Split(string(data), "\n") {
		if (strings.Contains(l, db) && serverLogEvents.MatchString(l)) || sessionEvents.MatchString(l) {
			lines = append(lines, l)
		}
	}
	if len(lines) > 60 {
		lines = lines[len(lines)-60:]
	}
	return strings.Join(lines, "\n")
}

// queryRows returns the rows of q on n, one a line, or the error.
func queryRows(n testenv.CHServer, q string) string {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := clickhouse.Open(n.Options("default"))
	if err != nil {
		return err.Error()
	}
	defer conn.Close()
	rows, err := conn.Query(ctx, q)
	if err != nil {
		return err.Error()
	}
	defer rows.Close()
	var b strings.Builder
	for rows.Next() {
		vals := make([]any, len(rows.ColumnTypes()))
		for i, ct := range rows.ColumnTypes() {
			vals[i] = reflect.New(ct.ScanType()).Interface()
		}
		if err := rows.Scan(vals...); err != nil {
			return err.Error()
		}
		for i, v := range vals {
			if i > 0 {
				b.WriteString("\t")
			}
			fmt.Fprint(&b, reflect.ValueOf(v).Elem().Interface())
		}
		b.WriteString("\n")
	}
	if err := rows.Err(); err != nil {
		b.WriteString(err.Error())
	}
	return b.String()
}
