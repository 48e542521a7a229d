package sink_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"go.uber.org/zap/zaptest"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/testenv"
	"github.com/outbox-streamer/outbox-streamer/internal/record"
	"github.com/outbox-streamer/outbox-streamer/migrations"
	"github.com/outbox-streamer/outbox-streamer/sink"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// clusterWriter migrates a fresh database on c and opens a writer on it.
func clusterWriter(t *testing.T, c *testenv.CHCluster, readTimeout time.Duration) (*sink.Client, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	db := testenv.NewCHClusterDatabase(t, c)
	cfg := sink.Config{Addr: c.First().Addr, User: "default", Database: db, Table: "event_log", Cluster: c.Name, ReadTimeout: readTimeout}
	if err := migrations.Up(ctx, migrations.Config{PostgresDSN: testenv.NewDatabase(t), Publication: "outbox_publication", ClickHouse: cfg}); err != nil {
		t.Fatalf("migrate up: %v", err)
	}
	w, err := sink.Open(ctx, cfg, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = w.Close() })
	return w, db
}

// eventTime is every test event's time: a lookup bounds event_date_time by
// the events it is given, so those of one test must agree with the inserted
// ones (a second passing between two calls made the lookup miss them).
var eventTime = time.Now().UTC().Truncate(time.Second)

func events(from, n int64) []record.Event {
	now := eventTime
	out := make([]record.Event, n)
	for i := range out {
		out[i] = record.Event{ID: from + int64(i), Type: "t", Time: now, CreatedAt: now, Environment: "test", Context: "{}"}
	}
	return out
}

// localCounts returns count() of the local table on every node.
func localCounts(t *testing.T, c *testenv.CHCluster, db string) []uint64 {
	t.Helper()
	var out []uint64
	for _, n := range c.Nodes {
		conn, err := clickhouse.Open(n.Options(db))
		if err != nil {
			t.Fatal(err)
		}
		var k uint64
		if err := conn.QueryRow(context.Background(), "SELECT count() FROM event_log_local").Scan(&k); err != nil {
			t.Fatalf("count on %s: %v", n.Addr, err)
		}
		conn.Close()
		out = append(out, k)
	}
	return out
}

// TestClusterInsertAndLookup: an acknowledged insert through the
// Distributed table is on every replica at once (synchronous, quorum of
// all), and ExistingIDs finds exactly the rows inserted.
func TestClusterInsertAndLookup(t *testing.T) {
	c := testenv.Cluster(t)
	w, db := clusterWriter(t, c, 10*time.Second)
	ctx := context.Background()
	if err := w.Insert(ctx, events(1, 1000)); err != nil {
		t.Fatal(err)
	}
	for i, k := range localCounts(t, c, db) {
		if k != 1000 {
			t.Errorf("node %s holds %d rows right after the insert, want 1000", c.Nodes[i].Addr, k)
		}
	}
	found, err := w.ExistingIDs(ctx, events(990, 20))
	if err != nil {
		t.Fatal(err)
	}
	if len(found) != 11 {
		t.Fatalf("ExistingIDs found %d of ids 990..1009, want 11 (990..1000)", len(found))
	}
	if n, err := w.Count(ctx); err != nil || n != 1000 {
		t.Fatalf("Count = %d, %v; want 1000", n, err)
	}
}

// TestClusterLookupSeesTimedOutQuorumInsert: docs/clickhouse-cluster.md's
// first finding. With one replica frozen, a quorum insert times out
// (UNKNOWN_STATUS_OF_INSERT) but is not rolled back on 18.16: its part
// stays on the other replica and appears everywhere once the frozen one
// fetches it. The lookup after that failure must report the rows present
// (else they would be inserted twice), and fail — not answer "absent" —
// while a replica does not answer.
func TestClusterLookupSeesTimedOutQuorumInsert(t *testing.T) {
	c := testenv.PrivateCluster(t)
	w, db := clusterWriter(t, c, 3*time.Second)
	ctx := context.Background()
	frozen := c.Handle.Nodes[1]
	if err := frozen.Freeze(); err != nil {
		t.Fatal(err)
	}
	thawed := false
	thaw := func() {
		if !thawed {
			thawed = true
			if err := frozen.Thaw(); err != nil {
				t.Fatal(err)
			}
		}
	}
	defer thaw()
	batch := events(1, 500)
	err := w.Insert(ctx, batch)
	if err == nil {
		t.Fatal("insert with a frozen replica and insert_quorum=2 succeeded")
	}
	t.Logf("insert with replica 2 frozen: %v", err)
	// While the replica is frozen the lookup cannot be complete: it fails.
	lctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	_, lerr := w.ExistingIDs(lctx, batch)
	cancel()
	if lerr == nil {
		t.Fatal("lookup succeeded while a replica was frozen")
	}
	t.Logf("lookup with replica 2 frozen: %v", lerr)
	thaw()
	var found map[int64]struct{}
	deadline := time.Now().Add(time.Minute)
	for {
		found, err = w.ExistingIDs(ctx, batch)
		if err == nil || time.Now().After(deadline) {
			break
		}
		t.Logf("lookup after thaw: %v (retrying)", err)
		time.Sleep(200 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	// The part written before the timeout is on the replica that wrote it,
	// and reaches the thawed one when it has caught up (its ZooKeeper session
	// may have expired while frozen: that takes a while).
	var counts []uint64
	deadline = time.Now().Add(2 * time.Minute)
	for {
		counts = localCounts(t, c, db)
		if (counts[0] == uint64(len(found)) && counts[1] == uint64(len(found))) || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("after the thaw: lookup found %d of %d; local tables hold %v", len(found), len(batch), counts)
	for i, k := range counts {
		if int(k) != len(found) {
			t.Errorf("node %s holds %d rows, the lookup found %d", c.Nodes[i].Addr, k, len(found))
		}
	}
	if len(found) != len(batch) && len(found) != 0 {
		t.Errorf("lookup found %d of the %d rows of one insert: a block is all or nothing", len(found), len(batch))
	}
	var exc *clickhouse.Exception
	if errors.As(err, &exc) {
		t.Logf("code %d", exc.Code)
	}
}

// TestClusterLookupWaitsForFailedQuorum: a committed part can still be
// dropped on 18.16. Replica 1 is SIGKILLed and restarted at once: for the
// rest of its old ZooKeeper session (10 s) it takes inserts but cannot
// reactivate. A quorum insert on it times out while replica 2 fetches
// nothing (SYSTEM STOP FETCHES); once the old session has expired, replica
// 2 fetches, finds no active replica holding the part and marks the quorum
// failed, and replica 1 detaches the part when it reactivates. The lookup
// must never report rows of such a part present (they would be lost): what
// it reports must be what the cluster keeps.
func TestClusterLookupWaitsForFailedQuorum(t *testing.T) {
	c := testenv.PrivateCluster(t)
	w, db := clusterWriter(t, c, 3*time.Second)
	ctx := context.Background()
	r1 := c.Handle.Nodes[0]
	killed := time.Now()
	if err := r1.Kill(); err != nil {
		t.Fatal(err)
	}
	// Not at once: the restarted replica must reactivate only after its old
	// session has expired (it retries 10 s after its first attempt).
	time.Sleep(4 * time.Second)
	if err := r1.Start(ctx); err != nil {
		t.Fatal(err)
	}
	nodeExec(t, c.Nodes[1], db, "SYSTEM STOP FETCHES event_log_local")
	batch := events(1, 100)
	err := insertLocal(ctx, c.Nodes[0], db, batch, clickhouse.Settings{"insert_quorum": 2, "insert_quorum_timeout": 2000})
	t.Logf("quorum insert on the restarted replica, replica 2 not fetching: %v", err)
	time.Sleep(time.Until(killed.Add(11500 * time.Millisecond))) // the old session has expired
	nodeExec(t, c.Nodes[1], db, "SYSTEM START FETCHES event_log_local")

	var found map[int64]struct{}
	deadline := time.Now().Add(time.Minute)
	for {
		found, err = w.ExistingIDs(ctx, batch)
		if err == nil || time.Now().After(deadline) {
			break
		}
		t.Logf("lookup: %v (retrying)", err)
		time.Sleep(200 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	// Wait until both replicas agree with each other and hold all or none
	// of the block, then compare with what the lookup said.
	var counts []uint64
	deadline = time.Now().Add(time.Minute)
	for {
		counts = localCounts(t, c, db)
		if (counts[0] == counts[1] && (counts[0] == 0 || counts[0] == uint64(len(batch)))) || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("lookup found %d of %d; the replicas keep %v (0: the quorum failed and the part was detached)", len(found), len(batch), counts)
	for i, k := range counts {
		if int(k) != len(found) {
			t.Errorf("node %s keeps %d rows, the lookup found %d", c.Nodes[i].Addr, k, len(found))
		}
	}
}

// insertLocal inserts events into the local table of one node with settings.
func insertLocal(ctx context.Context, n testenv.CHServer, db string, evs []record.Event, settings clickhouse.Settings) error {
	conn, err := clickhouse.Open(n.Options(db))
	if err != nil {
		return err
	}
	defer conn.Close()
	b, err := conn.PrepareBatch(clickhouse.Context(ctx, clickhouse.WithSettings(settings)),
		"INSERT INTO event_log_local (event_id, event_type, event_date_time, environment, event_context, created_at)")
	if err != nil {
		return err
	}
	for _, ev := range evs {
		if err := b.Append(uint64(ev.ID), ev.Type, ev.Time, ev.Environment, ev.Context, ev.CreatedAt); err != nil {
			return err
		}
	}
	return b.Send()
}

// nodeExec runs q on one node, failing the test on an error.
func nodeExec(t *testing.T, n testenv.CHServer, db, q string) {
	t.Helper()
	conn, err := clickhouse.Open(n.Options(db))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if err := conn.Exec(context.Background(), q); err != nil {
		t.Fatalf("%s on %s: %v", q, n.Addr, err)
	}
}
