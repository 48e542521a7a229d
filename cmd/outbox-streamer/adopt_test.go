package main

import (
	"context"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/fixture"
	"github.com/outbox-streamer/outbox-streamer/internal/harness/testenv"
	"github.com/outbox-streamer/outbox-streamer/internal/outboxstore"
	"github.com/outbox-streamer/outbox-streamer/sink"
)

// TestSwitchFromCelery follows docs/migrating-from-celery.md with the real
// binary on a table of the earlier service: `migrate up --dry-run` changes
// nothing, `migrate up` adopts the table and says what retention would
// delete, `run` delivers the pending and failed rows and what producers add
// afterwards exactly once and no processed row, and `status` says how the
// times are read.
func TestSwitchFromCelery(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	srv := testenv.ModernClickHouse(t)
	e := &fixture.Env{DSN: testenv.NewDatabase(t), Slot: "s_switch", Publication: "outbox_publication", CH: srv,
		Sink: sink.Config{Addr: srv.Addr, User: "default", Database: testenv.NewCHDatabase(t, srv), Table: "event_log"}, Outbox: outboxstore.DefaultName}
	pool, err := pgxpool.New(ctx, e.DSN)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	e.Pool = pool
	if _, err := pool.Exec(ctx, `CREATE TABLE event_outbox (id BIGSERIAL PRIMARY KEY, event_type VARCHAR(255) NOT NULL,
			event_date_time TIMESTAMP, environment VARCHAR(50), event_context JSONB, metadata_version BIGINT,
			status VARCHAR(20), created_at TIMESTAMP, updated_at TIMESTAMP);
		CREATE INDEX event_outbox_status_idx ON event_outbox (status);
		INSERT INTO event_outbox (event_type, event_date_time, environment, event_context, metadata_version, status, created_at, updated_at)
		SELECT 'old', now() AT TIME ZONE 'UTC', 'prod', '{}', 1, s,
		       (now() AT TIME ZONE 'UTC') - CASE WHEN s = 'processed' THEN interval '30 days' ELSE interval '1 hour' END, now() AT TIME ZONE 'UTC'
		FROM generate_series(1, 300) g, unnest(ARRAY['processed', 'pending', 'failed']) s`); err != nil {
		t.Fatal(err)
	}
	env := envFor(e, "EVENT_PROCESSING_INTERVAL=500ms")

	var tables int
	count := func() int {
		_ = pool.QueryRow(ctx, "SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace").Scan(&tables)
		return tables
	}
	before := count()
	code, out := runCmd(t, env, "migrate", "up", "--dry-run")
	if code != 0 || !strings.Contains(out, "adopt the existing table event_outbox (900 rows") || !strings.Contains(out, "will delete 300 processed rows") {
		t.Fatalf("migrate up --dry-run exited %d:\n%s", code, out)
	}
	if count() != before {
		t.Fatal("migrate up --dry-run created relations")
	}
	code, out = runCmd(t, env, "migrate", "up")
	if code != 0 || !strings.Contains(out, "postgres: adopted the existing table event_outbox (900 rows") || !strings.Contains(out, "will delete 300 processed rows") {
		t.Fatalf("migrate up exited %d:\n%s", code, out)
	}

	ch, err := clickhouse.Open(srv.Options(e.Sink.Database))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ch.Close() })
	e.CHConn = ch
	e.Table = sink.QuoteIdent(e.Sink.Database) + "." + sink.QuoteIdent("event_log")
	e.StopMerges(t)

	cmd, runOut := startStreamer(t, append(env, "OUTBOX_RETENTION=0"))
	// A producer of the earlier service, after the switch, omitting status
	// and the timestamps.
	if _, err := pool.Exec(ctx, `INSERT INTO event_outbox (event_type, event_date_time, environment, event_context, metadata_version)
		SELECT 'new', now() AT TIME ZONE 'UTC', 'prod', '{}', 1 FROM generate_series(1, 100)`); err != nil {
		t.Fatal(err)
	}
	fixture.WaitFor(t, 2*time.Minute, "every row processed", func() bool {
		var left int
		_ = pool.QueryRow(ctx, "SELECT count(*) FROM event_outbox WHERE status <> 'processed'").Scan(&left)
		return left == 0
	})
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("run exited with %v:\n%s", err, runOut)
	}
	var want, wantSum int64
	if err := pool.QueryRow(ctx, "SELECT count(*), sum(id) FROM event_outbox WHERE event_type = 'new' OR created_at > (now() AT TIME ZONE 'UTC') - interval '2 days'").Scan(&want, &wantSum); err != nil {
		t.Fatal(err)
	}
	var got, unique, sum uint64
	if err := ch.QueryRow(ctx, "SELECT count(), uniqExact(event_id), sum(event_id) FROM "+e.Table).Scan(&got, &unique, &sum); err != nil {
		t.Fatal(err)
	}
	if want != 700 || got != uint64(want) || unique != got || sum != uint64(wantSum) {
		t.Fatalf("ClickHouse: %d rows, %d ids, sum %d; want the 600 pending and failed rows and the 100 new ones once each (%d, sum %d), no processed one", got, unique, sum, want, wantSum)
	}
	code, out = runCmd(t, env, "status")
	if !strings.Contains(out, "times are timestamp without time zone, read as wall clock in EVENT_TIME_ZONE=UTC") {
		t.Fatalf("status (exit %d) does not say how the times are read:\n%s", code, out)
	}
}
