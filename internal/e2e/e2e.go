// Package e2e holds what the integration tests of several packages share: a
// migrated outbox database and ClickHouse database per test, producers, and
// assertions on what reached ClickHouse.
package e2e

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/outbox-streamer/outbox-streamer/internal/outboxstore"
	"github.com/outbox-streamer/outbox-streamer/internal/pipeline"
	"github.com/outbox-streamer/outbox-streamer/internal/testenv"
	"github.com/outbox-streamer/outbox-streamer/migrations"
	"github.com/outbox-streamer/outbox-streamer/replication"
	"github.com/outbox-streamer/outbox-streamer/sink"
)

// Env is one test's databases: a fresh PostgreSQL database with the outbox migrated
// and a fresh ClickHouse database with the event table.
type Env struct {
	DSN         string
	Slot        string
	Publication string
	CH          testenv.CHServer
	Sink        sink.Config
	Pool        *pgxpool.Pool
	CHConn      driver.Conn
	Table       string // quoted db.table in ClickHouse
	// Outbox is the outbox table (event_outbox unless made by NewOutbox).
	Outbox outboxstore.Name
}

// New migrates fresh databases on the shared test servers.
func New(t *testing.T, srv testenv.CHServer) *Env {
	t.Helper()
	return NewOn(t, testenv.Postgres(t), srv)
}

// NewOn migrates fresh databases on the PostgreSQL server with superuser DSN
// serverDSN (a private one, for tests that restart it) and on srv.
func NewOn(t *testing.T, serverDSN string, srv testenv.CHServer) *Env {
	t.Helper()
	return newEnv(t, serverDSN, srv, 0)
}

// NewPartitioned is New with event_outbox range-partitioned by created_at in
// partitions of interval, the current one and three ahead created.
func NewPartitioned(t *testing.T, srv testenv.CHServer, interval time.Duration) *Env {
	t.Helper()
	return newEnv(t, testenv.Postgres(t), srv, interval)
}

func newEnv(t *testing.T, serverDSN string, srv testenv.CHServer, partitionInterval time.Duration) *Env {
	t.Helper()
	dsn := testenv.NewDatabaseOn(t, serverDSN)
	chdb := testenv.NewCHDatabase(t, srv)
	e := &Env{
		DSN:         dsn,
		Slot:        "s_" + randomHex(t),
		Publication: "outbox_publication",
		CH:          srv,
		Sink:        sink.Config{Addr: srv.Addr, User: "default", Database: chdb, Table: "event_log"},
		Outbox:      outboxstore.DefaultName,
	}
	if err := e.Sink.Validate(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	mcfg := migrations.Config{PostgresDSN: dsn, Publication: e.Publication, ClickHouse: e.Sink, PartitionInterval: partitionInterval}
	if err := migrations.Up(ctx, mcfg); err != nil {
		t.Fatalf("migrate: %v", err)
	}
	if partitionInterval > 0 {
		if _, err := migrations.DescribeLayout(ctx, mcfg); err != nil {
			t.Fatalf("create partitions: %v", err)
		}
	}
	pcfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		t.Fatal(err)
	}
	pcfg.MaxConns = 20 // tests hold several transactions open at once
	pool, err := pgxpool.NewWithConfig(ctx, pcfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	e.Pool = pool
	conn, err := clickhouse.Open(srv.Options(chdb))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	e.CHConn = conn
	e.Table = sink.QuoteIdent(chdb) + "." + sink.QuoteIdent("event_log")
	e.StopMerges(t)
	return e
}

// NewOutbox migrates a second outbox beside base's: the outbox table outbox
// (table or schema.table) with its own publication and slot in base's
// PostgreSQL database, and its own event table chTable in base's ClickHouse
// database — what a second streamer instance of docs/many-outboxes.md has.
// It shares base's connections.
func NewOutbox(t *testing.T, base *Env, outbox, publication, chTable string) *Env {
	t.Helper()
	name, err := outboxstore.ParseName(outbox)
	if err != nil {
		t.Fatal(err)
	}
	e := *base
	e.Outbox = name
	e.Slot = "s_" + randomHex(t)
	e.Publication = publication
	e.Sink.Table = chTable
	e.Table = sink.QuoteIdent(e.Sink.Database) + "." + sink.QuoteIdent(chTable)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := migrations.Up(ctx, migrations.Config{PostgresDSN: e.DSN, Publication: publication, Outbox: name, ClickHouse: e.Sink}); err != nil {
		t.Fatalf("migrate outbox %s: %v", name, err)
	}
	e.StopMerges(t)
	return &e
}

// StopMerges stops background merges of the event table. It is a
// ReplacingMergeTree: a merge removes duplicates, and would hide from
// count() = uniqExact(event_id) a row that was inserted twice. Tests must see
// every row ever inserted. The stop does not survive a server restart: call
// it again after one.
func (e *Env) StopMerges(t testing.TB) {
	t.Helper()
	if err := e.CHConn.Exec(context.Background(), "SYSTEM STOP MERGES "+e.Table); err != nil {
		t.Fatalf("stop merges of %s: %v%s", e.Table, err, testenv.CrashNote())
	}
}

// Insert inserts n events in one transaction and returns the commit's WAL position.
// With rollback, the transaction is rolled back instead.
func (e *Env) Insert(t testing.TB, n int, rollback bool) {
	t.Helper()
	ctx := context.Background()
	tx, err := e.Pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx) //nolint:errcheck
	if _, err := tx.Exec(ctx, strings.Replace(insertSeries, "{outbox}", e.Outbox.Ident(), 1), n); err != nil {
		t.Fatalf("insert %d events: %v", n, err)
	}
	if rollback {
		return
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
}

// insertSeries inserts $1 events with varied types and times.
const insertSeries = `INSERT INTO {outbox} (event_type, event_date_time, environment, event_context, metadata_version)
	SELECT 'type.' || (g % 7), (now() AT TIME ZONE 'UTC') - (g % 1000) * interval '1 second', 'test',
	       jsonb_build_object('n', g, 'note', 'event ' || g), 1
	FROM generate_series(1, $1) AS g`

// InsertTx runs fn in a transaction on its own connection.
func (e *Env) InsertTx(t testing.TB, fn func(tx pgx.Tx) error) {
	t.Helper()
	if err := pgx.BeginFunc(context.Background(), e.Pool, fn); err != nil {
		t.Fatal(err)
	}
}

// WaitStreaming waits until the slot's walsender runs START_REPLICATION. (The
// slot is active already while it is being created, before the snapshot that
// decides which rows are streamed and which are backfilled.)
func (e *Env) WaitStreaming(t testing.TB) {
	t.Helper()
	WaitFor(t, time.Minute, "slot streaming", func() bool { return e.Streaming(t) })
}

// Streaming reports whether a walsender is streaming from the slot.
func (e *Env) Streaming(t testing.TB) bool {
	t.Helper()
	var query string
	err := e.Pool.QueryRow(context.Background(), `SELECT a.query FROM pg_replication_slots s
		JOIN pg_stat_activity a ON a.pid = s.active_pid WHERE s.slot_name = $1`, e.Slot).Scan(&query)
	return err == nil && strings.HasPrefix(query, "START_REPLICATION")
}

// CurrentWAL returns pg_current_wal_lsn().
func (e *Env) CurrentWAL(t testing.TB) uint64 {
	t.Helper()
	var s string
	if err := e.Pool.QueryRow(context.Background(), "SELECT pg_current_wal_lsn()::text").Scan(&s); err != nil {
		t.Fatal(err)
	}
	lsn, err := pglogrepl.ParseLSN(s)
	if err != nil {
		t.Fatal(err)
	}
	return uint64(lsn)
}

// ConfirmedFlush returns the slot's confirmed_flush_lsn (0 if the slot is missing).
func (e *Env) ConfirmedFlush(t testing.TB) uint64 {
	t.Helper()
	var s *string
	err := e.Pool.QueryRow(context.Background(),
		"SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", e.Slot).Scan(&s)
	if err == pgx.ErrNoRows || s == nil {
		return 0
	}
	if err != nil {
		t.Fatal(err)
	}
	lsn, err := pglogrepl.ParseLSN(*s)
	if err != nil {
		t.Fatal(err)
	}
	return uint64(lsn)
}

// Committed returns how many outbox rows exist (all committed rows) and how many
// of them are processed.
func (e *Env) Committed(t testing.TB) (total, processed int64) {
	t.Helper()
	err := e.Pool.QueryRow(context.Background(),
		"SELECT count(*), count(*) FILTER (WHERE status = 'processed') FROM "+e.Outbox.Ident()).Scan(&total, &processed)
	if err != nil {
		t.Fatal(err)
	}
	return total, processed
}

// StatusCounts returns the number of outbox rows per status.
func (e *Env) StatusCounts(t testing.TB) map[string]int64 {
	t.Helper()
	rows, err := e.Pool.Query(context.Background(), "SELECT status, count(*) FROM "+e.Outbox.Ident()+" GROUP BY status")
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	out := map[string]int64{}
	for rows.Next() {
		var s string
		var n int64
		if err := rows.Scan(&s, &n); err != nil {
			t.Fatal(err)
		}
		out[s] = n
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// CHCounts returns count() and uniqExact(event_id) of the event table, without FINAL.
func (e *Env) CHCounts(t testing.TB) (count, unique uint64) {
	t.Helper()
	if err := e.CHConn.QueryRow(context.Background(), "SELECT count(), uniqExact(event_id) FROM "+e.Table).Scan(&count, &unique); err != nil {
		t.Fatalf("count ClickHouse rows: %v%s", err, testenv.CrashNote())
	}
	return count, unique
}

// WaitFor polls cond until it is true or the timeout passes, then fails with what.
// A crashed test server fails it at once, naming the crash.
func WaitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if err := testenv.Crashes(); err != nil {
			t.Fatalf("waiting for %s: a test server crashed:\n%v", what, err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// AssertExactlyDelivered checks the end state: ClickHouse holds every committed
// outbox row exactly once (count = uniqExact = committed, without FINAL), the same
// ids as PostgreSQL, every row is processed, and the slot confirmed walPos.
func (e *Env) AssertExactlyDelivered(t testing.TB, timeout time.Duration, walPos uint64) {
	t.Helper()
	total, _ := e.Committed(t)
	WaitFor(t, timeout, fmt.Sprintf("%d events in ClickHouse", total), func() bool {
		c, _ := e.CHCounts(t)
		return c >= uint64(total)
	})
	WaitFor(t, timeout, "every outbox row processed", func() bool {
		_, p := e.Committed(t)
		return p == total
	})
	c, u := e.CHCounts(t)
	if c != uint64(total) || u != uint64(total) {
		t.Fatalf("ClickHouse has count()=%d uniqExact(event_id)=%d, want both = %d committed rows\n%s", c, u, total, e.DescribeDuplicates(t))
	}
	var sumPG int64
	if err := e.Pool.QueryRow(context.Background(), "SELECT COALESCE(sum(id), 0) FROM "+e.Outbox.Ident()).Scan(&sumPG); err != nil {
		t.Fatal(err)
	}
	var sumCH uint64
	if err := e.CHConn.QueryRow(context.Background(), "SELECT sum(event_id) FROM "+e.Table).Scan(&sumCH); err != nil {
		t.Fatal(err)
	}
	if uint64(sumPG) != sumCH {
		t.Fatalf("sum of ids differs: PostgreSQL %d, ClickHouse %d (different events delivered)", sumPG, sumCH)
	}
	WaitFor(t, timeout, fmt.Sprintf("slot confirmed LSN past %s", pglogrepl.LSN(walPos)), func() bool {
		return e.ConfirmedFlush(t) >= walPos
	})
}

// AssertExactlyDeliveredExcept is AssertExactlyDelivered for an outbox from
// which the rows deleted were removed while streaming: ClickHouse must hold
// every remaining row once, and of the deleted ones (which may or may not have
// been delivered before they went) none twice and nothing else.
func (e *Env) AssertExactlyDeliveredExcept(t testing.TB, timeout time.Duration, walPos uint64, deleted []int64) {
	t.Helper()
	ctx := context.Background()
	var total, sumPG int64
	if err := e.Pool.QueryRow(ctx, "SELECT count(*), COALESCE(sum(id), 0) FROM "+e.Outbox.Ident()).Scan(&total, &sumPG); err != nil {
		t.Fatal(err)
	}
	var notDeleted strings.Builder
	notDeleted.WriteString("1")
	if len(deleted) > 0 {
		notDeleted.Reset()
		notDeleted.WriteString("event_id NOT IN (")
		for i, id := range deleted {
			if i > 0 {
				notDeleted.WriteByte(',')
			}
			notDeleted.WriteString(strconv.FormatInt(id, 10))
		}
		notDeleted.WriteString(")")
	}
	kept := func() (count, sum uint64) {
		if err := e.CHConn.QueryRow(ctx, "SELECT count(), sum(event_id) FROM "+e.Table+" WHERE "+notDeleted.String()).Scan(&count, &sum); err != nil {
			t.Fatalf("count ClickHouse rows: %v%s", err, testenv.CrashNote())
		}
		return count, sum
	}
	WaitFor(t, timeout, fmt.Sprintf("%d remaining events in ClickHouse", total), func() bool {
		c, _ := kept()
		return c >= uint64(total)
	})
	WaitFor(t, timeout, "every outbox row processed", func() bool {
		_, p := e.Committed(t)
		return p == total
	})
	c, u := e.CHCounts(t)
	if c != u {
		t.Fatalf("ClickHouse has count()=%d but uniqExact(event_id)=%d: %d rows twice\n%s", c, u, c-u, e.DescribeDuplicates(t))
	}
	kc, ks := kept()
	if kc != uint64(total) || ks != uint64(sumPG) {
		t.Fatalf("ClickHouse holds %d remaining rows (id sum %d), want the %d in the outbox (id sum %d)", kc, ks, total, sumPG)
	}
	if extra := c - kc; extra > uint64(len(deleted)) {
		t.Fatalf("ClickHouse holds %d rows that are not in the outbox, but only %d were deleted", extra, len(deleted))
	}
	WaitFor(t, timeout, fmt.Sprintf("slot confirmed LSN past %s", pglogrepl.LSN(walPos)), func() bool {
		return e.ConfirmedFlush(t) >= walPos
	})
}

// DescribeDuplicates says which events ClickHouse holds more than once and how
// each copy got there (commit_lsn 0: the sweep; otherwise the stream), for
// failure messages.
func (e *Env) DescribeDuplicates(t testing.TB) string {
	t.Helper()
	ctx := context.Background()
	rows, err := e.CHConn.Query(ctx, `SELECT event_id, count(), groupArray(commit_lsn), groupArray(toString(inserted_at))
		FROM `+e.Table+` GROUP BY event_id HAVING count() > 1 ORDER BY event_id`)
	if err != nil {
		return fmt.Sprintf("(duplicates not readable: %v)", err)
	}
	defer rows.Close()
	var b strings.Builder
	n := 0
	var first, last uint64
	for rows.Next() {
		var id, c uint64
		var lsns []uint64
		var at []string
		if err := rows.Scan(&id, &c, &lsns, &at); err != nil {
			return fmt.Sprintf("(duplicates not readable: %v)", err)
		}
		if n == 0 {
			first = id
		}
		last = id
		if n < 12 || n%500 == 0 {
			var status, reason string
			var attempts int
			_ = e.Pool.QueryRow(ctx, "SELECT status, attempts, coalesce(last_error, '') FROM "+e.Outbox.Ident()+" WHERE id = $1", int64(id)).Scan(&status, &attempts, &reason)
			fmt.Fprintf(&b, "  event %d: %d copies, commit_lsn %v, inserted_at %v; outbox: %s, %d attempts, %q\n", id, c, lsns, at, status, attempts, reason)
		}
		n++
	}
	return fmt.Sprintf("%d events twice or more, ids %d..%d:\n%s", n, first, last, b.String())
}

func randomHex(t testing.TB) string {
	b := make([]byte, 6)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// StartPipeline runs the streaming pipeline in-process on e until the test
// ends (stopped as SIGTERM would, and checked to return nil), and waits until
// it streams: rows committed before the slot's snapshot are the backfill's,
// which is the sweep's.
func (e *Env) StartPipeline(t *testing.T) {
	t.Helper()
	cfg := pipeline.Config{
		Replication: replication.Config{DSN: e.DSN, Slot: e.Slot, Publication: e.Publication, StatusInterval: 100 * time.Millisecond,
			Schema: e.Outbox.Schema, Table: e.Outbox.Table},
		Run:  replication.RunConfig{BatchSize: 1000, BatchTimeout: 50 * time.Millisecond},
		Sink: e.Sink,
	}
	RunPipeline(t, cfg, zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel)))
	e.WaitStreaming(t)
}

// RunPipeline runs the streaming pipeline in-process with cfg until the test
// ends: then it is stopped as SIGTERM would stop it and checked to return nil.
func RunPipeline(t testing.TB, cfg pipeline.Config, log *zap.Logger) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- pipeline.Stream(ctx, context.Background(), cfg, log) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("pipeline returned %v", err)
			}
		case <-time.After(time.Minute):
			t.Error("pipeline did not stop within a minute")
		}
	})
}
