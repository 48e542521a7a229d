package sink_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"go.uber.org/zap/zaptest"

	"github.com/outbox-streamer/outbox-streamer/internal/record"
	"github.com/outbox-streamer/outbox-streamer/internal/testenv"
	"github.com/outbox-streamer/outbox-streamer/migrations"
	"github.com/outbox-streamer/outbox-streamer/sink"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// clusterWriter migrates a fresh database on c and opens a writer on it.
func clusterWriter(t *testing.T, c *testenv.CHCluster, readTimeout time.Duration) (*sink.Writer, string) {
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
