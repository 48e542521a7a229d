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

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/fixture"
	"github.com/outbox-streamer/outbox-streamer/internal/harness/testenv"
	"github.com/outbox-streamer/outbox-streamer/internal/outboxstore"
	"github.com/outbox-streamer/outbox-streamer/internal/pipeline"
	"github.com/outbox-streamer/outbox-streamer/replication"
)

// clusterEnv is fixture.New on the ClickHouse cluster c (see fixture.NewCluster).
func clusterEnv(t *testing.T, c *testenv.CHCluster) *fixture.Env {
	t.Helper()
	return fixture.NewCluster(t, testenv.Postgres(t), c, nil)
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
	e.AssertShardsAgree(t, c)
}

// TestClusterShards: the pipeline streams into a Distributed event table
// over two shards of 18.16, without replicas (no quorum) and with two
// replicas each (insert_quorum 2), and is abandoned once mid-load (its
// restart must look up the rows already inserted on every shard). Every
// committed row is in the table once (count() = uniqExact(event_id) =
// committed, no FINAL, same sum of ids), the rows are split across both
// shards, each shard's replicas hold the same rows, and the shards together
// hold every row once.
func TestClusterShards(t *testing.T) {
	for _, l := range []struct{ shards, replicas int }{{2, 1}, {2, 2}} {
		t.Run(fmt.Sprintf("%dx%d", l.shards, l.replicas), func(t *testing.T) {
			c := testenv.ClusterOf(t, l.shards, l.replicas)
			e := clusterEnv(t, c)
			kill := startAbandonable(t, e, nil)
			e.WaitStreaming(t)
			start := time.Now()
			// Transactions of two batches each (1000 rows are split across
			// the shards), one rolled back.
			const txs, rows = 10, 2000
			for i := 0; i < txs; i++ {
				before, _ := e.CHCounts(t)
				e.Insert(t, rows, i == 3)
				if i == 2 || i == 6 {
					abandonMidInsert(t, e, kill, before)
					kill = startAbandonable(t, e, nil)
				}
			}
			e.AssertExactlyDelivered(t, 2*time.Minute, e.CurrentWAL(t))
			took := time.Since(start)
			perShard := e.AssertShardsAgree(t, c)
			t.Logf("%d shards × %d replicas: %d rows committed (+%d rolled back) delivered in %v; rows per shard %v",
				l.shards, l.replicas, (txs-1)*rows, rows, took.Round(time.Millisecond), perShard)
		})
	}
}

// abandonMidInsert abandons the pipeline as soon as ClickHouse holds more
// than before rows: often between an insert and its status update, so that
// the restart has rows to find in ClickHouse rather than send again.
func abandonMidInsert(t *testing.T, e *fixture.Env, kill func() error, before uint64) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for n, _ := e.CHCounts(t); n <= before; n, _ = e.CHCounts(t) {
		if time.Now().After(deadline) {
			t.Fatalf("no new rows in ClickHouse within a minute (%d)%s", n, testenv.CrashNote())
		}
		time.Sleep(2 * time.Millisecond) // a tight poll: the moment matters
	}
	if err := kill(); err != nil && !errors.Is(err, context.Canceled) {
		t.Logf("abandoned streamer returned %v", err)
	}
	inCH, _ := e.CHCounts(t)
	_, processed := e.Committed(t)
	t.Logf("streamer abandoned mid-load: %d rows in ClickHouse, %d processed in the outbox", inCH, processed)
}

// startAbandonable runs the pipeline; kill abandons it at once (the drain
// and the abandon contexts end together: the writer gives up mid-insert and
// nothing unacknowledged is kept), as near a SIGKILL as a pipeline in the
// test's process gets.
func startAbandonable(t *testing.T, e *fixture.Env, tweak func(*pipeline.Config)) (kill func() error) {
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
	// An abandoned pipeline's walsender may still hold the slot for a moment
	// (the binary's supervisor waits SLOT_BUSY_TIMEOUT for it; Stream does not).
	fixture.WaitFor(t, 30*time.Second, "the slot released by the previous pipeline", func() bool {
		var active bool
		err := e.Pool.QueryRow(context.Background(), "SELECT COALESCE((SELECT active FROM pg_replication_slots WHERE slot_name = $1), false)", e.Slot).Scan(&active)
		return err == nil && !active
	})
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
		fixture.WaitFor(t, 2*time.Minute, what, func() bool { n, _ := e.CHCounts(t); return n >= atLeast })
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
	e.StopClusterMerges(t, c) // a restart forgets it
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
	e.AssertShardsAgree(t, c)
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
	var single *fixture.Env
	for _, srv := range testenv.ClickHouseServers(t) {
		if srv.Legacy {
			single = fixture.New(t, srv)
		}
	}
	envs := []struct {
		name string
		e    *fixture.Env
	}{{"cluster (1 shard × 2 replicas of 18.16, Distributed sync, quorum 2)", clusterEnv(t, c)}}
	if single != nil {
		envs = append(envs, struct {
			name string
			e    *fixture.Env
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
