package pipeline_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/outbox-streamer/outbox-streamer/internal/e2e"
	"github.com/outbox-streamer/outbox-streamer/internal/outboxstore"
	"github.com/outbox-streamer/outbox-streamer/internal/pipeline"
	"github.com/outbox-streamer/outbox-streamer/internal/testenv"
	"github.com/outbox-streamer/outbox-streamer/migrations"
	"github.com/outbox-streamer/outbox-streamer/replication"
	"github.com/outbox-streamer/outbox-streamer/sink"
)

// clusterEnv is e2e.New on a ClickHouse cluster: the migrations run with
// CLICKHOUSE_CLUSTER, e.Table is the Distributed event table (what the
// assertions count, without FINAL) and merges are stopped on every node's
// local table (a merge would hide a duplicate).
func clusterEnv(t *testing.T, c *testenv.CHCluster) *e2e.Env {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	dsn := testenv.NewDatabase(t)
	db := testenv.NewCHClusterDatabase(t, c)
	e := &e2e.Env{
		DSN: dsn, Slot: fmt.Sprintf("s_cluster_%d", time.Now().UnixNano()), Publication: "outbox_publication",
		CH:     c.First(),
		Sink:   sink.Config{Addr: c.First().Addr, User: "default", Database: db, Table: "event_log", Cluster: c.Name},
		Outbox: outboxstore.DefaultName,
	}
	if err := e.Sink.Validate(); err != nil {
		t.Fatal(err)
	}
	if err := migrations.Up(ctx, migrations.Config{PostgresDSN: dsn, Publication: e.Publication, ClickHouse: e.Sink}); err != nil {
		t.Fatalf("migrate: %v", err)
	}
	pool, err := pgxpool.New(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	e.Pool = pool
	conn, err := clickhouse.Open(c.First().Options(db))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	e.CHConn = conn
	e.Table = sink.QuoteIdent(db) + "." + sink.QuoteIdent("event_log")
	stopClusterMerges(t, c, db)
	return e
}

func stopClusterMerges(t *testing.T, c *testenv.CHCluster, db string) {
	t.Helper()
	for _, n := range c.Nodes {
		nodeQuery(t, n, db, func(conn clickhouse.Conn) error {
			return conn.Exec(context.Background(), "SYSTEM STOP MERGES event_log_local")
		})
	}
}

func nodeQuery(t *testing.T, n testenv.CHServer, db string, f func(clickhouse.Conn) error) {
	t.Helper()
	conn, err := clickhouse.Open(n.Options(db))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if err := f(conn); err != nil {
		t.Fatalf("node %s: %v%s", n.Addr, err, testenv.CrashNote())
	}
}

// assertReplicasAgree checks that every node's local table holds the
// committed rows once each (one shard: every replica holds all of them). It
// polls rather than SYSTEM SYNC REPLICA, which waits for the merges the
// test stopped.
func assertReplicasAgree(t *testing.T, c *testenv.CHCluster, e *e2e.Env) {
	t.Helper()
	total, _ := e.Committed(t)
	for _, n := range c.Nodes {
		var cnt, uniq uint64
		e2e.WaitFor(t, 2*time.Minute, "replica "+n.Addr+" caught up", func() bool {
			nodeQuery(t, n, e.Sink.Database, func(conn clickhouse.Conn) error {
				return conn.QueryRow(context.Background(), "SELECT count(), uniqExact(event_id) FROM event_log_local").Scan(&cnt, &uniq)
			})
			return cnt >= uint64(total)
		})
		if cnt != uint64(total) || uniq != uint64(total) {
			t.Errorf("replica %s: count()=%d uniqExact(event_id)=%d, want both %d", n.Addr, cnt, uniq, total)
		}
	}
}

// TestClusterStreamsExactlyOnce: the pipeline streams into a Distributed
// event table over one shard of two replicas; every committed row is in it
// once (count() = uniqExact(event_id) = committed, no FINAL) and on every
// replica.
func TestClusterStreamsExactlyOnce(t *testing.T) {
	c := testenv.Cluster(t)
	e := clusterEnv(t, c)
	startWith(t, e, nil)
	e.WaitStreaming(t)
	for i := 0; i < 5; i++ {
		e.Insert(t, 1000, i == 2)
	}
	e.AssertExactlyDelivered(t, 2*time.Minute, e.CurrentWAL(t))
	assertReplicasAgree(t, c, e)
}

// startAbandonable runs the pipeline; kill abandons it at once (the drain
// and the abandon contexts end together: the writer gives up mid-insert and
// nothing unacknowledged is kept), as near a SIGKILL as a pipeline in the
// test's process gets.
func startAbandonable(t *testing.T, e *e2e.Env, tweak func(*pipeline.Config)) (kill func() error) {
	t.Helper()
	cfg := pipeline.Config{
		Replication:   replication.Config{DSN: e.DSN, Slot: e.Slot, Publication: e.Publication, StatusInterval: 100 * time.Millisecond},
		Run:           replication.RunConfig{BatchSize: 500, BatchTimeout: 50 * time.Millisecond},
		Sink:          e.Sink,
		Retry:         outboxstore.RetryConfig{BaseDelay: 200 * time.Millisecond, MaxDelay: time.Second},
		SweepInterval: time.Second,
	}
	if tweak != nil {
		tweak(&cfg)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	log := zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel))
	go func() {
		err := pipeline.Stream(ctx, ctx, cfg, log)
		if ctx.Err() == nil {
			t.Errorf("pipeline stopped by itself: %v", err)
		}
		done <- err
	}()
	var once sync.Once
	var result error
	kill = func() error {
		once.Do(func() {
			cancel()
			select {
			case result = <-done:
			case <-time.After(time.Minute):
				result = errors.New("pipeline did not stop within a minute")
			}
		})
		return result
	}
	t.Cleanup(func() { _ = kill() })
	return kill
}

// TestClusterChaos: while a producer commits events, one replica is killed
// (SIGKILL) and brought back, and the streamer is abandoned mid-load twice
// (once while the replica is down, its quorum inserts failing or in doubt)
// and restarted. At the end the Distributed table holds every committed row
// exactly once without FINAL, and every replica holds the same rows.
func TestClusterChaos(t *testing.T) {
	if testing.Short() {
		t.Skip("chaos test skipped in -short mode")
	}
	c := testenv.PrivateCluster(t)
	e := clusterEnv(t, c)
	tweak := func(cfg *pipeline.Config) {
		cfg.Sink.ReadTimeout = 3 * time.Second
		cfg.Sink.DialTimeout = time.Second
		cfg.Writer.Retry.Max = 500 * time.Millisecond
	}
	kill := startAbandonable(t, e, tweak)
	e.WaitStreaming(t)

	stopLoad := make(chan struct{})
	loadDone := make(chan struct{})
	go func() {
		defer close(loadDone)
		for i := 0; ; i++ {
			select {
			case <-stopLoad:
				return
			default:
			}
			_, err := e.Pool.Exec(context.Background(), `INSERT INTO event_outbox (event_type, event_date_time, environment, event_context, metadata_version)
				SELECT 'type.' || (g % 7), now() AT TIME ZONE 'UTC', 'test', jsonb_build_object('n', g), 1 FROM generate_series(1, 300) AS g`)
			if err != nil {
				t.Errorf("producer: %v", err)
				return
			}
			time.Sleep(50 * time.Millisecond)
		}
	}()
	waitRows := func(what string, atLeast uint64) {
		e2e.WaitFor(t, 2*time.Minute, what, func() bool { n, _ := e.CHCounts(t); return n >= atLeast })
	}
	waitRows("first rows in the cluster", 1000)

	replica := c.Handle.Nodes[1]
	if err := replica.Kill(); err != nil {
		t.Fatal(err)
	}
	t.Logf("replica %s killed", replica.Addr())
	time.Sleep(2 * time.Second) // inserts now fail or end in doubt (quorum 2)
	if err := kill(); err != nil && !errors.Is(err, context.Canceled) {
		t.Logf("abandoned streamer returned %v", err)
	}
	t.Log("streamer abandoned while the replica is down; restarted")
	kill = startAbandonable(t, e, tweak)
	time.Sleep(time.Second)
	if err := replica.Restart(context.Background()); err != nil {
		t.Fatal(err)
	}
	stopClusterMerges(t, c, e.Sink.Database) // a restart forgets it
	t.Logf("replica %s back", replica.Addr())
	before, _ := e.CHCounts(t)
	waitRows("rows flowing again after the replica's return", before+1000)
	if err := kill(); err != nil && !errors.Is(err, context.Canceled) {
		t.Logf("abandoned streamer returned %v", err)
	}
	t.Log("streamer abandoned mid-load; restarted")
	startAbandonable(t, e, tweak)
	time.Sleep(2 * time.Second)
	close(stopLoad)
	<-loadDone
	total, _ := e.Committed(t)
	t.Logf("%d events committed", total)
	e.AssertExactlyDelivered(t, 3*time.Minute, e.CurrentWAL(t))
	assertReplicasAgree(t, c, e)
}

// TestClusterThroughput measures the pipeline's rate into the cluster and
// into a single legacy server for the same backlog
// (OUTBOX_TEST_CLUSTER_MEASURE=N rows; skipped without it). One run each:
// a figure for docs/clickhouse-cluster.md, not an assertion.
func TestClusterThroughput(t *testing.T) {
	n, _ := strconv.Atoi(os.Getenv("OUTBOX_TEST_CLUSTER_MEASURE"))
	if n <= 0 {
		t.Skip("set OUTBOX_TEST_CLUSTER_MEASURE=N to measure N rows")
	}
	c := testenv.Cluster(t)
	var single *e2e.Env
	for _, srv := range testenv.ClickHouseServers(t) {
		if srv.Legacy {
			single = e2e.New(t, srv)
		}
	}
	envs := []struct {
		name string
		e    *e2e.Env
	}{{"cluster (1 shard × 2 replicas of 18.16, Distributed sync, quorum 2)", clusterEnv(t, c)}}
	if single != nil {
		envs = append(envs, struct {
			name string
			e    *e2e.Env
		}{"single 18.16 server", single})
	}
	for _, x := range envs {
		e := x.e
		// The backlog first, then the streamer: it drains at its own pace.
		e.Insert(t, n, false)
		start := time.Now()
		stop := startWith(t, e, nil)
		e.AssertExactlyDelivered(t, 10*time.Minute, e.CurrentWAL(t))
		took := time.Since(start)
		_ = stop()
		t.Logf("%s: %d rows in %v = %.0f rows/s (one run)", x.name, n, took.Round(time.Millisecond), float64(n)/took.Seconds())
	}
}
