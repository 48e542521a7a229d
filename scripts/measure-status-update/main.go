// Command measure-status-update measures designs of the outbox's status update
// (pending → processed, the second write of every event) on the local
// PostgreSQL that outbox-devenv starts: time per row, WAL per row, the share of
// HOT updates and the table's size afterwards. It is a one-off measurement for
// the performance notes, not a test:
//
//	bin/outbox-devenv -- go run ./scripts/measure-status-update [-rows 300000]
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

type design struct {
	name  string
	index string // DDL after the table (may be empty)
	ff    int    // fillfactor
	form  string // the UPDATE; $1 = ids
	// origin runs the updates in a session with a replication origin and
	// decodes with pgoutput's origin 'none' (PostgreSQL 16+), which drops
	// changes that carry an origin before they are queued for the commit.
	origin bool
}

const markProcessed = `UPDATE %s SET status = 'processed', updated_at = now() AT TIME ZONE 'UTC', last_error = NULL, next_attempt_at = NULL
	WHERE id = ANY($1) AND status <> 'processed' RETURNING id`

const markProcessedUnnest = `UPDATE %s o SET status = 'processed', updated_at = now() AT TIME ZONE 'UTC', last_error = NULL, next_attempt_at = NULL
	FROM unnest($1::bigint[]) AS u(id) WHERE o.id = u.id AND o.status <> 'processed' RETURNING o.id`

// markProcessedRange bounds the index scan by the batch's smallest and largest
// id: a batch's ids are mostly one contiguous run, read in one pass of the
// primary key instead of one descent per id.
const markProcessedRange = `UPDATE %s SET status = 'processed', updated_at = now() AT TIME ZONE 'UTC', last_error = NULL, next_attempt_at = NULL
	WHERE id BETWEEN (SELECT min(x) FROM unnest($1::bigint[]) x) AND (SELECT max(x) FROM unnest($1::bigint[]) x)
	  AND id = ANY($1) AND status <> 'processed' RETURNING id`

func main() {
	rows := flag.Int("rows", 300_000, "rows inserted pending, then marked processed")
	batch := flag.Int("batch", 1000, "rows per status update (EVENT_BATCH_SIZE)")
	only := flag.String("designs", "", "run only the designs whose name contains this text")
	flag.Parse()
	dsn := os.Getenv("DATABASE_URL")
	if dsn == "" {
		fmt.Fprintln(os.Stderr, "DATABASE_URL is empty: run under bin/outbox-devenv")
		os.Exit(2)
	}
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, dsn)
	if err != nil {
		fail(err)
	}
	defer pool.Close()
	partial := `CREATE INDEX ON %s (status, next_attempt_at, id) WHERE status <> 'processed'`
	byNext := `CREATE INDEX ON %s (next_attempt_at, id) WHERE next_attempt_at IS NOT NULL`
	designs := []design{
		{"current: partial index on status, fillfactor 100", partial, 100, markProcessed, false},
		{"current, UPDATE ... FROM unnest", partial, 100, markProcessedUnnest, false},
		{"current, id range and = ANY", partial, 100, markProcessedRange, false},
		{"partial index on status, fillfactor 80", partial, 80, markProcessed, false},
		{"index on next_attempt_at only, fillfactor 100", byNext, 100, markProcessed, false},
		{"index on next_attempt_at only, fillfactor 90", byNext, 90, markProcessed, false},
		{"index on next_attempt_at only, fillfactor 80", byNext, 80, markProcessed, false},
		{"index on next_attempt_at only, fillfactor 60", byNext, 60, markProcessed, false},
		{"current, updates under a replication origin (16+)", partial, 100, markProcessed, true},
	}
	fmt.Printf("%d rows inserted pending in transactions of %d, then marked processed %d at a time (the writer's statement)\n\n", *rows, *batch, *batch)
	fmt.Printf("%-52s %10s %9s %7s %9s %9s %12s %12s\n", "design", "rows/s", "WAL B/row", "HOT %", "heap MiB", "index MiB", "decode ins/s", "decode upd/s")
	for i, d := range designs {
		if !strings.Contains(d.name, *only) {
			continue
		}
		if err := measure(ctx, pool, fmt.Sprintf("su_%d", i), d, *rows, *batch); err != nil {
			fail(fmt.Errorf("%s: %w", d.name, err))
		}
	}
}

func measure(ctx context.Context, pool *pgxpool.Pool, table string, d design, rows, batch int) error {
	ident := pgx.Identifier{table}.Sanitize()
	ddl := fmt.Sprintf(`DROP TABLE IF EXISTS %[1]s;
		CREATE TABLE %[1]s (
			id BIGSERIAL PRIMARY KEY, event_type VARCHAR(255) NOT NULL, event_date_time TIMESTAMP NOT NULL,
			environment VARCHAR(50) NOT NULL DEFAULT '', event_context JSONB NOT NULL DEFAULT '{}'::jsonb,
			metadata_version BIGINT NOT NULL DEFAULT 1, status VARCHAR(20) NOT NULL DEFAULT 'pending',
			created_at TIMESTAMP NOT NULL DEFAULT (now() AT TIME ZONE 'UTC'), updated_at TIMESTAMP NOT NULL DEFAULT (now() AT TIME ZONE 'UTC'),
			attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT, next_attempt_at TIMESTAMPTZ,
			CHECK (status IN ('pending', 'processed', 'failed', 'dead'))) WITH (fillfactor = %[2]d, autovacuum_enabled = false)`, ident, d.ff)
	if _, err := pool.Exec(ctx, ddl); err != nil {
		return err
	}
	if d.index != "" {
		if _, err := pool.Exec(ctx, fmt.Sprintf(d.index, ident)); err != nil {
			return err
		}
	}
	// A slot and a publication of inserts, as the streamer's: afterwards the
	// walsender's work is measured by decoding the inserts' WAL and then the
	// updates' WAL with pgoutput (which sends the inserts and drops the updates).
	pub, slot := table+"_pub", table+"_slot"
	for _, q := range []string{"DROP PUBLICATION IF EXISTS " + pub, "CREATE PUBLICATION " + pub + " FOR TABLE " + ident + " WITH (publish = 'insert')"} {
		if _, err := pool.Exec(ctx, q); err != nil {
			return err
		}
	}
	_, _ = pool.Exec(ctx, "SELECT pg_drop_replication_slot($1)", slot)
	if _, err := pool.Exec(ctx, "SELECT pg_create_logical_replication_slot($1, 'pgoutput')", slot); err != nil {
		return err
	}
	defer pool.Exec(context.Background(), "SELECT pg_drop_replication_slot($1)", slot) //nolint:errcheck // best effort
	defer pool.Exec(context.Background(), "DROP PUBLICATION IF EXISTS "+pub)           //nolint:errcheck // best effort
	// Rows like the benchmark's: a small JSON context.
	for done := 0; done < rows; done += batch {
		if _, err := pool.Exec(ctx, fmt.Sprintf(`INSERT INTO %s (event_type, event_date_time, environment, event_context)
			SELECT 'order.created', now() AT TIME ZONE 'UTC', 'bench', jsonb_build_object('user_id', g, 'amount', g %% 997, 'note', repeat('x', 40))
			FROM generate_series(1, $1) AS g`, ident), batch); err != nil {
			return err
		}
	}
	if _, err := pool.Exec(ctx, "CHECKPOINT"); err != nil {
		return err
	}
	var insertsEnd string
	if err := pool.QueryRow(ctx, "SELECT pg_current_wal_lsn()::text").Scan(&insertsEnd); err != nil {
		return err
	}
	var startWAL string
	if err := pool.QueryRow(ctx, "SELECT pg_current_wal_lsn()::text").Scan(&startWAL); err != nil {
		return err
	}
	var minID int64
	if err := pool.QueryRow(ctx, "SELECT min(id) FROM "+ident).Scan(&minID); err != nil {
		return err
	}
	update := fmt.Sprintf(d.form, ident)
	conn, err := pool.Acquire(ctx)
	if err != nil {
		return err
	}
	defer conn.Release()
	decodeOptions := ""
	if d.origin {
		originName := table + "_origin"
		_, _ = conn.Exec(ctx, "SELECT pg_replication_origin_drop($1)", originName)
		if _, err := conn.Exec(ctx, "SELECT pg_replication_origin_create($1)", originName); err != nil {
			return err
		}
		if _, err := conn.Exec(ctx, "SELECT pg_replication_origin_session_setup($1)", originName); err != nil {
			return err
		}
		defer func() {
			_, _ = conn.Exec(context.Background(), "SELECT pg_replication_origin_session_reset()")
			_, _ = conn.Exec(context.Background(), "SELECT pg_replication_origin_drop($1)", originName)
		}()
		decodeOptions = ", 'origin', 'none'"
	}
	t0 := time.Now()
	ids := make([]int64, batch)
	for done := 0; done < rows; done += batch {
		for i := range ids {
			ids[i] = minID + int64(done+i)
		}
		r, err := conn.Query(ctx, update, ids)
		if err != nil {
			return err
		}
		n := 0
		for r.Next() {
			n++
		}
		r.Close()
		if err := r.Err(); err != nil {
			return err
		}
		if n != batch {
			return fmt.Errorf("updated %d of %d rows", n, batch)
		}
	}
	took := time.Since(t0)
	var walBytes float64
	if err := pool.QueryRow(ctx, "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::pg_lsn)::float8", startWAL).Scan(&walBytes); err != nil {
		return err
	}
	// The statistics are flushed lazily; ask for it and wait for the next read.
	_, _ = pool.Exec(ctx, "SELECT pg_stat_force_next_flush()")
	time.Sleep(1200 * time.Millisecond)
	var upd, hot float64
	var heap, idx float64
	if err := pool.QueryRow(ctx, `SELECT n_tup_upd::float8, n_tup_hot_upd::float8, pg_relation_size(relid)::float8, pg_indexes_size(relid)::float8
		FROM pg_stat_user_tables WHERE relname = $1`, table).Scan(&upd, &hot, &heap, &idx); err != nil {
		return err
	}
	decode := func(upto string) (time.Duration, error) {
		t0 := time.Now()
		var n int64
		err := pool.QueryRow(ctx, `SELECT count(*) FROM pg_logical_slot_get_binary_changes($1, $2::pg_lsn, NULL,
			'proto_version', '1', 'publication_names', $3`+decodeOptions+`)`, slot, upto, pub).Scan(&n)
		return time.Since(t0), err
	}
	decIns, err := decode(insertsEnd)
	if err != nil {
		return fmt.Errorf("decode the inserts: %w", err)
	}
	var updatesEnd string
	if err := pool.QueryRow(ctx, "SELECT pg_current_wal_lsn()::text").Scan(&updatesEnd); err != nil {
		return err
	}
	decUpd, err := decode(updatesEnd)
	if err != nil {
		return fmt.Errorf("decode the updates: %w", err)
	}
	hotShare := 0.0
	if upd > 0 {
		hotShare = 100 * hot / upd
	}
	fmt.Printf("%-52s %10.0f %9.0f %7.1f %9.1f %9.1f %12.0f %12.0f\n", d.name, float64(rows)/took.Seconds(), walBytes/float64(rows), hotShare, heap/(1<<20), idx/(1<<20),
		float64(rows)/decIns.Seconds(), float64(rows)/decUpd.Seconds())
	_, err = pool.Exec(ctx, "DROP TABLE "+ident)
	return err
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "measure-status-update:", strings.TrimSpace(err.Error()))
	os.Exit(1)
}
