package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-streamer/outbox-streamer/migrations"
	"github.com/outbox-streamer/outbox-streamer/sink"
)

// servers are the PostgreSQL and ClickHouse every scenario runs against.
type servers struct {
	// PGDSN is a superuser DSN of a PostgreSQL with wal_level=logical.
	PGDSN     string
	PGVersion string
	// CHAddr is host:port of a modern ClickHouse's native protocol.
	CHAddr    string
	CHVersion string
	// CHLog, when known, is the ClickHouse server's log (scenario g quotes it
	// when the MaterializedPostgreSQL peer fails).
	CHLog string
	// OutboxDDL runs on every fresh outbox database after the migrations
	// (--outbox-ddl): a way to measure a schema variant.
	OutboxDDL []string
	// revive, when set, starts again a local server that crashed.
	revive func(context.Context) error
}

// reviveCrashed starts again a local server that crashed during the last
// scenario, so that one crash fails one scenario run, not every one after it.
func (s *servers) reviveCrashed(ctx context.Context) error {
	if s.revive == nil {
		return nil
	}
	if err := s.revive(ctx); err != nil {
		return fmt.Errorf("start a crashed server again: %w", err)
	}
	return nil
}

// fillVersions asks the servers for their versions when they are not known yet.
func (s *servers) fillVersions(ctx context.Context) {
	if s.PGVersion == "" {
		if conn, err := pgx.Connect(ctx, s.PGDSN); err == nil {
			_ = conn.QueryRow(ctx, "SHOW server_version").Scan(&s.PGVersion)
			conn.Close(context.Background())
		}
	}
	if s.CHVersion == "" {
		if conn, err := clickhouse.Open(&clickhouse.Options{Addr: []string{s.CHAddr}, Auth: clickhouse.Auth{Username: "default"}}); err == nil {
			_ = conn.QueryRow(ctx, "SELECT version()").Scan(&s.CHVersion)
			conn.Close()
		}
	}
}

// publication is what the migrations create and the streamer reads.
const publication = "outbox_publication"

// dbEnv is one scenario run's databases: a fresh PostgreSQL database with the outbox
// migrated and a fresh ClickHouse database with event_log. close drops both.
type dbEnv struct {
	srv    *servers
	pgName string
	DSN    string
	Pool   *pgxpool.Pool
	CHDB   string
	Sink   sink.Config
	CH     driver.Conn
	Table  string // quoted db.table in ClickHouse
	Slot   string
	// watch, when set, is consulted by the waits: an error (the streamer died) ends
	// them at once.
	watch func() error
}

func randomName(prefix string) string {
	var b [5]byte
	_, _ = rand.Read(b[:])
	return prefix + hex.EncodeToString(b[:])
}

// newEnv creates and migrates fresh databases on srv.
func newEnv(ctx context.Context, srv *servers) (_ *dbEnv, err error) {
	e := &dbEnv{srv: srv, pgName: randomName("bench_"), CHDB: randomName("bench_"), Slot: randomName("bench_slot_")}
	defer func() {
		if err != nil {
			e.close()
		}
	}()
	conn, err := pgx.Connect(ctx, srv.PGDSN)
	if err != nil {
		return nil, fmt.Errorf("connect to postgres: %w", err)
	}
	_, err = conn.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{e.pgName}.Sanitize())
	conn.Close(context.Background())
	if err != nil {
		return nil, fmt.Errorf("create database: %w", err)
	}
	if e.DSN, err = withDatabase(srv.PGDSN, e.pgName); err != nil {
		return nil, err
	}
	e.Sink = sink.Config{Addr: srv.CHAddr, User: "default", Database: e.CHDB, Table: "event_log"}
	if err := e.Sink.Validate(); err != nil {
		return nil, err
	}
	if err := migrations.Up(ctx, migrations.Config{PostgresDSN: e.DSN, Publication: publication, ClickHouse: e.Sink}); err != nil {
		return nil, fmt.Errorf("migrate: %w", err)
	}
	if len(srv.OutboxDDL) > 0 {
		conn, err := pgx.Connect(ctx, e.DSN)
		if err != nil {
			return nil, fmt.Errorf("connect to the outbox database: %w", err)
		}
		for _, ddl := range srv.OutboxDDL {
			if _, err := conn.Exec(ctx, ddl); err != nil {
				conn.Close(context.Background())
				return nil, fmt.Errorf("--outbox-ddl %q: %w", ddl, err)
			}
		}
		conn.Close(context.Background())
	}
	pcfg, err := pgxpool.ParseConfig(e.DSN)
	if err != nil {
		return nil, err
	}
	pcfg.MaxConns = 8
	if e.Pool, err = pgxpool.NewWithConfig(ctx, pcfg); err != nil {
		return nil, err
	}
	e.CH, err = clickhouse.Open(&clickhouse.Options{
		Addr:        []string{srv.CHAddr},
		Auth:        clickhouse.Auth{Database: e.CHDB, Username: "default"},
		DialTimeout: 10 * time.Second,
		ReadTimeout: 5 * time.Minute,
	})
	if err != nil {
		return nil, err
	}
	e.Table = sink.QuoteIdent(e.CHDB) + "." + sink.QuoteIdent("event_log")
	return e, nil
}

// withDatabase returns dsn (a URL or keyword/value DSN) naming database db.
func withDatabase(dsn, db string) (string, error) {
	if !strings.Contains(dsn, "://") {
		return dsn + " dbname=" + db, nil // the last occurrence wins
	}
	u, err := url.Parse(dsn)
	if err != nil {
		return "", fmt.Errorf("parse PostgreSQL DSN: %w", err)
	}
	u.Path, u.RawPath = "/"+db, ""
	return u.String(), nil
}

// close drops the databases (the slot first) and closes the connections.
func (e *dbEnv) close() {
	if e.Pool != nil {
		e.Pool.Close()
	}
	if e.CH != nil {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		_ = e.CH.Exec(ctx, "DROP DATABASE IF EXISTS "+sink.QuoteIdent(e.CHDB))
		cancel()
		e.CH.Close()
	}
	_ = dropPGDatabase(e.srv.PGDSN, e.pgName)
}

// dropPGDatabase drops the replication slots of database name (terminating their
// walsenders), its connections, and the database.
func dropPGDatabase(serverDSN, name string) error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	conn, err := pgx.Connect(ctx, serverDSN)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	deadline := time.Now().Add(20 * time.Second)
	for {
		var n int
		if err := conn.QueryRow(ctx, "SELECT count(*) FROM pg_replication_slots WHERE database = $1", name).Scan(&n); err != nil {
			return err
		}
		if n == 0 {
			break
		}
		_, _ = conn.Exec(ctx, "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE database = $1 AND active_pid IS NOT NULL", name)
		_, _ = conn.Exec(ctx, "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = $1 AND NOT active", name)
		if time.Now().After(deadline) {
			return errors.New("replication slots still present")
		}
		time.Sleep(50 * time.Millisecond)
	}
	_, _ = conn.Exec(ctx, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()", name)
	_, err = conn.Exec(ctx, "DROP DATABASE IF EXISTS "+pgx.Identifier{name}.Sanitize()+" WITH (FORCE)")
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "42601" {
		_, err = conn.Exec(ctx, "DROP DATABASE IF EXISTS "+pgx.Identifier{name}.Sanitize())
	}
	return err
}

// backlogSQL inserts $1 pending events, numbered from $2, shaped like loadgen's
// (one of five types, a small JSON context).
const backlogSQL = `INSERT INTO event_outbox (event_type, event_date_time, environment, event_context, metadata_version)
	SELECT (ARRAY['user.signed_in','order.created','order.paid','payment.failed','audit.permission_changed'])[1 + (($2::bigint + g) % 5)],
	       now() AT TIME ZONE 'UTC', 'bench',
	       jsonb_build_object('worker', 0, 'seq', $2::bigint + g, 'user_id', (($2::bigint + g) * 7919) % 100000),
	       1
	FROM generate_series(1, $1::int) AS g`

// insertBacklog commits rows events in transactions of txSize rows and returns the
// WAL position after the last commit.
func (e *dbEnv) insertBacklog(ctx context.Context, rows, txSize int) (uint64, error) {
	if txSize <= 0 {
		txSize = 1000
	}
	for done := 0; done < rows; {
		n := min(txSize, rows-done)
		if _, err := e.Pool.Exec(ctx, backlogSQL, n, done); err != nil {
			return 0, fmt.Errorf("insert backlog: %w", err)
		}
		done += n
	}
	return e.currentWAL(ctx)
}

// settle makes the table's state what a long-running system would have — vacuumed
// and analysed — and checkpoints, so neither runs during the timed part.
func (e *dbEnv) settle(ctx context.Context) error {
	if _, err := e.Pool.Exec(ctx, "VACUUM (ANALYZE) event_outbox"); err != nil {
		return fmt.Errorf("vacuum: %w", err)
	}
	if _, err := e.Pool.Exec(ctx, "CHECKPOINT"); err != nil {
		return fmt.Errorf("checkpoint: %w", err)
	}
	return nil
}

func (e *dbEnv) currentWAL(ctx context.Context) (uint64, error) {
	var s string
	if err := e.Pool.QueryRow(ctx, "SELECT pg_current_wal_lsn()::text").Scan(&s); err != nil {
		return 0, err
	}
	lsn, err := pglogrepl.ParseLSN(s)
	return uint64(lsn), err
}

// slotState returns the slot's confirmed_flush_lsn (0 when missing or null) and
// whether a walsender holds it.
func (e *dbEnv) slotState(ctx context.Context) (confirmed uint64, active bool, err error) {
	var s *string
	err = e.Pool.QueryRow(ctx, "SELECT confirmed_flush_lsn::text, active FROM pg_replication_slots WHERE slot_name = $1", e.Slot).Scan(&s, &active)
	if errors.Is(err, pgx.ErrNoRows) {
		return 0, false, nil
	}
	if err != nil || s == nil {
		return 0, active, err
	}
	lsn, err := pglogrepl.ParseLSN(*s)
	return uint64(lsn), active, err
}

// slotExists reports whether e's replication slot exists.
func (e *dbEnv) slotExists(ctx context.Context) (bool, error) {
	var ok bool
	err := e.Pool.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)", e.Slot).Scan(&ok)
	return ok, err
}

// chCount is count() of event_log (a trivial count: read from part metadata).
func (e *dbEnv) chCount(ctx context.Context) (uint64, error) {
	var n uint64
	err := e.CH.QueryRow(ctx, "SELECT count() FROM "+e.Table).Scan(&n)
	return n, err
}

// poll calls cond every interval until it returns true, an error, or the
// timeout. A connection the server reset or closed is not an error of the
// run: cond is asked again, up to maxResets times in a row.
func poll(ctx context.Context, timeout, interval time.Duration, what string, cond func() (bool, error)) error {
	const maxResets = 3
	deadline := time.Now().Add(timeout)
	resets := 0
	for {
		ok, err := cond()
		if err != nil && connReset(err) && resets < maxResets && ctx.Err() == nil {
			resets++
			fmt.Fprintf(os.Stderr, "outbox-bench: waiting for %s: %v (asking again)\n", what, err)
			continue
		}
		resets = 0
		if err != nil {
			return fmt.Errorf("waiting for %s: %w", what, err)
		}
		if ok {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("timed out after %s waiting for %s", timeout, what)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(interval):
		}
	}
}

// waitCH waits until event_log holds at least n rows.
func (e *dbEnv) waitCH(ctx context.Context, n uint64, timeout time.Duration) error {
	var last uint64
	err := poll(ctx, timeout, 20*time.Millisecond, fmt.Sprintf("%d rows in ClickHouse", n), func() (bool, error) {
		if err := e.checkWatch(); err != nil {
			return false, err
		}
		c, err := e.chCount(ctx)
		last = c
		return c >= n, err
	})
	if err != nil {
		return fmt.Errorf("%w (%d there)", err, last)
	}
	return nil
}

// waitProcessed waits until no outbox row is left unprocessed: a sweep's rows
// are in ClickHouse a moment before the transaction that marks them commits.
func (e *dbEnv) waitProcessed(ctx context.Context, timeout time.Duration) error {
	return poll(ctx, timeout, 20*time.Millisecond, "every outbox row processed", func() (bool, error) {
		if err := e.checkWatch(); err != nil {
			return false, err
		}
		var left int64
		err := e.Pool.QueryRow(ctx, "SELECT count(*) FROM event_outbox WHERE status <> 'processed'").Scan(&left)
		return left == 0, err
	})
}

// waitConfirmed waits until the slot's confirmed LSN reaches lsn.
func (e *dbEnv) waitConfirmed(ctx context.Context, lsn uint64, timeout time.Duration) error {
	return poll(ctx, timeout, 20*time.Millisecond, "slot confirmed LSN past "+pglogrepl.LSN(lsn).String(), func() (bool, error) {
		if err := e.checkWatch(); err != nil {
			return false, err
		}
		c, _, err := e.slotState(ctx)
		return c >= lsn, err
	})
}

// waitActive waits until a walsender streams from the slot (START_REPLICATION was
// accepted: the slot merely being held, as while it is created, is not enough).
func (e *dbEnv) waitActive(ctx context.Context, timeout time.Duration) error {
	return poll(ctx, timeout, 20*time.Millisecond, "replication slot streaming", func() (bool, error) {
		if err := e.checkWatch(); err != nil {
			return false, err
		}
		var state string
		err := e.Pool.QueryRow(ctx, `SELECT r.state FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid
			WHERE s.slot_name = $1`, e.Slot).Scan(&state)
		if errors.Is(err, pgx.ErrNoRows) {
			return false, nil
		}
		return state == "streaming" || state == "catchup", err
	})
}

func (e *dbEnv) checkWatch() error {
	if e.watch == nil {
		return nil
	}
	return e.watch()
}

// unprocessedError is a delivery whose rows are all in ClickHouse exactly once but
// some of whose outbox rows were left unmarked: a defect of the streamer's
// bookkeeping, not of the delivery, so a scenario keeps its figures and reports it.
type unprocessedError struct{ msg string }

func (e *unprocessedError) Error() string { return e.msg }

func isUnprocessed(err error) bool {
	var u *unprocessedError
	return errors.As(err, &u)
}

// verifyDelivered checks the end state of a delivery: ClickHouse holds exactly the
// want committed rows once each (count = uniqExact = want, same sum of ids as
// PostgreSQL), and every outbox row is processed (else an *unprocessedError).
// committed, when known, maps event ids to the time their commit returned, for the
// diagnosis of rows left unprocessed.
func (e *dbEnv) verifyDelivered(ctx context.Context, want int64, committed map[int64]time.Time) error {
	var total, processed, sumPG int64
	err := e.Pool.QueryRow(ctx, "SELECT count(*), count(*) FILTER (WHERE status = 'processed'), COALESCE(sum(id), 0) FROM event_outbox").
		Scan(&total, &processed, &sumPG)
	if err != nil {
		return fmt.Errorf("count outbox rows: %w", err)
	}
	var count, uniq, sumCH uint64
	if err := e.CH.QueryRow(ctx, "SELECT count(), uniqExact(event_id), sum(event_id) FROM "+e.Table).Scan(&count, &uniq, &sumCH); err != nil {
		return fmt.Errorf("count ClickHouse rows: %w", err)
	}
	switch {
	case total != want:
		return fmt.Errorf("outbox holds %d rows, want %d", total, want)
	case count != uint64(want) || uniq != uint64(want):
		return fmt.Errorf("ClickHouse has count()=%d uniqExact(event_id)=%d, want %d", count, uniq, want)
	case sumCH != uint64(sumPG):
		return fmt.Errorf("sum of ids differs: PostgreSQL %d, ClickHouse %d", sumPG, sumCH)
	case processed != want:
		return &unprocessedError{fmt.Sprintf("every row is in ClickHouse exactly once and acknowledged, but only %d of %d outbox rows are marked processed; the others:%s",
			processed, want, e.undelivered(ctx, committed))}
	}
	return nil
}

// undelivered describes up to 10 outbox rows that are not processed: their status,
// whether and when ClickHouse got them, when the other rows of that INSERT were marked
// processed, and (when known) when their commit returned to the producer. It is the
// evidence for a row that reached ClickHouse but was never marked processed.
func (e *dbEnv) undelivered(ctx context.Context, committed map[int64]time.Time) string {
	rows, err := e.Pool.Query(ctx, `SELECT xmin::text, status, min(id), max(id), count(*) FROM event_outbox
		WHERE status <> 'processed' GROUP BY 1, 2 ORDER BY 3 LIMIT 10`)
	if err != nil {
		return err.Error()
	}
	type group struct {
		xid, status string
		first, last int64
		n           int64
	}
	var list []group
	for rows.Next() {
		var g group
		if err := rows.Scan(&g.xid, &g.status, &g.first, &g.last, &g.n); err != nil {
			rows.Close()
			return err.Error()
		}
		list = append(list, g)
	}
	rows.Close()
	const ts = "15:04:05.000000"
	var sb strings.Builder
	for _, g := range list {
		fmt.Fprintf(&sb, "\n    transaction xmin %s: %d row(s) %s, ids %d..%d", g.xid, g.n, g.status, g.first, g.last)
		if c, ok := committed[g.first]; ok {
			fmt.Fprintf(&sb, "; its COMMIT returned to the producer at %s", c.UTC().Format(ts))
		}
		var insertedAt time.Time
		var lsn uint64
		if err := e.CH.QueryRow(ctx, "SELECT inserted_at, commit_lsn FROM "+e.Table+" WHERE event_id = ?", uint64(g.first)).Scan(&insertedAt, &lsn); err != nil {
			fmt.Fprintf(&sb, "; id %d not in ClickHouse (%v)", g.first, err)
			continue
		}
		fmt.Fprintf(&sb, "; id %d is in ClickHouse by the INSERT started at %s (commit_lsn %s)", g.first, insertedAt.UTC().Format(ts), pglogrepl.LSN(lsn))
		idRows, err := e.CH.Query(ctx, "SELECT event_id FROM "+e.Table+" WHERE inserted_at = toDateTime64('"+
			insertedAt.UTC().Format("2006-01-02 15:04:05.000000")+"', 6, 'UTC')")
		if err != nil {
			continue
		}
		var ids []int64
		for idRows.Next() {
			var id uint64
			if idRows.Scan(&id) == nil {
				ids = append(ids, int64(id))
			}
		}
		idRows.Close()
		var first, last *time.Time
		var n int64
		if err := e.Pool.QueryRow(ctx, "SELECT min(updated_at), max(updated_at), count(*) FROM event_outbox WHERE id = ANY($1) AND status = 'processed'", ids).
			Scan(&first, &last, &n); err == nil && first != nil {
			fmt.Fprintf(&sb, "; %d of that INSERT's %d rows were marked processed by UPDATE(s) started at %s..%s", n, len(ids), first.Format(ts), last.Format(ts))
		}
	}
	return sb.String()
}

// lastProcessed is the latest updated_at of a processed row: when the last row was
// marked processed (now() of its UPDATE, microseconds, this machine's clock).
func (e *dbEnv) lastProcessed(ctx context.Context) (time.Time, error) {
	var t *time.Time
	err := e.Pool.QueryRow(ctx, "SELECT max(updated_at) FROM event_outbox WHERE status = 'processed'").Scan(&t)
	if err != nil || t == nil {
		return time.Time{}, fmt.Errorf("last processed time: %v", err)
	}
	// updated_at is a TIMESTAMP holding UTC.
	return time.Date(t.Year(), t.Month(), t.Day(), t.Hour(), t.Minute(), t.Second(), t.Nanosecond(), time.UTC), nil
}

// chInserts counts the INSERTs that filled event_log: every row of one INSERT has
// the same inserted_at (now64(6) at the query's start), and the streamer's
// inserts never start in the same microsecond.
func (e *dbEnv) chInserts(ctx context.Context) (uint64, error) {
	var n uint64
	err := e.CH.QueryRow(ctx, "SELECT uniqExact(inserted_at) FROM "+e.Table).Scan(&n)
	return n, err
}

// lastInserted is the latest inserted_at (ClickHouse's now64(6) of the insert).
func (e *dbEnv) lastInserted(ctx context.Context) (time.Time, error) {
	var t time.Time
	err := e.CH.QueryRow(ctx, "SELECT max(inserted_at) FROM "+e.Table).Scan(&t)
	return t, err
}

// connReset reports an error of a connection the server reset or closed
// while the bench was using it.
func connReset(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) ||
		errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF)
}
