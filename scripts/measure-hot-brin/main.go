// Command measure-hot-brin measures HOT status updates on PostgreSQL 16+, where a
// summarizing (BRIN) index does not block them, against the outbox's partial
// B-tree index on status: the status update's backend CPU, WAL and HOT share per
// row, and EXPLAIN (ANALYZE, BUFFERS) of every lookup of undelivered rows on a
// large mostly-processed table, in steady streaming and after a backlog was
// summarized while it was pending. It is a one-off measurement for the
// performance notes, not a test; run it under outbox-devenv on the same host as
// the server (it reads the backend's CPU time from /proc):
//
//	bin/outbox-devenv --pg-version 18 -- go run ./scripts/measure-hot-brin [-rows 300000] [-table-rows 1000000]
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

type design struct {
	name  string
	index string // DDL after the table, %s = the table
	ff    int
	// notProcessed is the design's form of "status <> 'processed'": a BRIN
	// index answers a range condition, not <>. The check constraint's other
	// statuses (dead, failed, pending) all sort below 'processed'.
	notProcessed string
	// update is the status update, when not the writer's (markProcessed).
	update string
}

var designs = []design{
	{"partial B-tree on status (migration 1), ff 100", `CREATE INDEX %[1]s_undelivered ON %[1]s (status, next_attempt_at, id) WHERE status <> 'processed'`, 100, "status <> 'processed'", ""},
	{"BRIN (status), ff 100", `CREATE INDEX %[1]s_status_brin ON %[1]s USING brin (status) WITH (pages_per_range = 32, autosummarize = on)`, 100, "status < 'processed'", ""},
	{"BRIN (status), ff 90", `CREATE INDEX %[1]s_status_brin ON %[1]s USING brin (status) WITH (pages_per_range = 32, autosummarize = on)`, 90, "status < 'processed'", ""},
	{"BRIN (status), ff 80", `CREATE INDEX %[1]s_status_brin ON %[1]s USING brin (status) WITH (pages_per_range = 32, autosummarize = on)`, 80, "status < 'processed'", ""},
	{"BRIN (status), ff 50", `CREATE INDEX %[1]s_status_brin ON %[1]s USING brin (status) WITH (pages_per_range = 32, autosummarize = on)`, 50, "status < 'processed'", ""},
	{"no index on status, ff 90 (lower bound)", ``, 90, "status <> 'processed'", ""},
	{"partial B-tree, ff 100, SET status only", `CREATE INDEX %[1]s_undelivered ON %[1]s (status, next_attempt_at, id) WHERE status <> 'processed'`, 100, "status <> 'processed'",
		`UPDATE %s SET status = 'processed' WHERE id = ANY($1) AND status <> 'processed'`},
	{"partial B-tree, ff 100, no RETURNING", `CREATE INDEX %[1]s_undelivered ON %[1]s (status, next_attempt_at, id) WHERE status <> 'processed'`, 100, "status <> 'processed'",
		`UPDATE %s SET status = 'processed', updated_at = now() AT TIME ZONE 'UTC', last_error = NULL, next_attempt_at = NULL
	WHERE id = ANY($1) AND status <> 'processed'`},
	{"partial B-tree, ff 100, id range, no RETURNING", `CREATE INDEX %[1]s_undelivered ON %[1]s (status, next_attempt_at, id) WHERE status <> 'processed'`, 100, "status <> 'processed'",
		`UPDATE %s SET status = 'processed', updated_at = now() AT TIME ZONE 'UTC', last_error = NULL, next_attempt_at = NULL
	WHERE id BETWEEN $1 AND $2 AND status <> 'processed'`},
}

const tableDDL = `DROP TABLE IF EXISTS %[1]s;
CREATE TABLE %[1]s (
	id BIGSERIAL PRIMARY KEY, event_type VARCHAR(255) NOT NULL, event_date_time TIMESTAMP NOT NULL,
	environment VARCHAR(50) NOT NULL DEFAULT '', event_context JSONB NOT NULL DEFAULT '{}'::jsonb,
	metadata_version BIGINT NOT NULL DEFAULT 1, status VARCHAR(20) NOT NULL DEFAULT 'pending',
	created_at TIMESTAMP NOT NULL DEFAULT (now() AT TIME ZONE 'UTC'), updated_at TIMESTAMP NOT NULL DEFAULT (now() AT TIME ZONE 'UTC'),
	attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT, next_attempt_at TIMESTAMPTZ,
	CHECK (status IN ('pending', 'processed', 'failed', 'dead'))) WITH (fillfactor = %[2]d)`

const insertSQL = `INSERT INTO %s (event_type, event_date_time, environment, event_context)
	SELECT 'order.created', now() AT TIME ZONE 'UTC', 'bench', jsonb_build_object('user_id', g, 'amount', g %% 997, 'note', repeat('x', 40))
	FROM generate_series(1, $1) AS g`

// markProcessed is the writer's statement (outboxstore.MarkProcessed).
const markProcessed = `UPDATE %s SET status = 'processed', updated_at = now() AT TIME ZONE 'UTC', last_error = NULL, next_attempt_at = NULL
	WHERE id = ANY($1) AND status <> 'processed' RETURNING id`

func main() {
	rows := flag.Int("rows", 300_000, "rows inserted pending, then marked processed, per design")
	tableRows := flag.Int("table-rows", 1_000_000, "processed rows of the table the lookups are explained on")
	backlog := flag.Int("backlog", 300_000, "rows of the backlog summarized while pending")
	batch := flag.Int("batch", 1000, "rows per transaction and per status update")
	only := flag.String("part", "update,lookups", "parts to run")
	names := flag.String("designs", "", "update part: only the designs whose name contains this text")
	flag.Parse()
	dsn := os.Getenv("DATABASE_URL")
	if dsn == "" {
		fail(fmt.Errorf("DATABASE_URL is empty: run under bin/outbox-devenv"))
	}
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, dsn)
	check(err)
	defer conn.Close(ctx)
	var version string
	check(conn.QueryRow(ctx, "SELECT current_setting('server_version')").Scan(&version))
	fmt.Printf("PostgreSQL %s\n", version)
	if strings.Contains(*only, "update") {
		fmt.Printf("\n%d rows inserted pending in transactions of %d, then marked processed %d at a time (the writer's statement), one backend\n", *rows, *batch, *batch)
		fmt.Printf("%-48s %9s %11s %10s %7s %9s\n", "design", "rows/s", "CPU µs/row", "WAL B/row", "HOT %", "heap MiB")
		for i, d := range designs {
			if !strings.Contains(d.name, *names) {
				continue
			}
			check(measureUpdate(ctx, conn, fmt.Sprintf("hb_%d", i), d, *rows, *batch))
		}
	}
	if strings.Contains(*only, "lookups") {
		for _, i := range []int{0, 4} {
			check(measureLookups(ctx, conn, fmt.Sprintf("hl_%d", i), designs[i], *tableRows, *backlog, *batch))
		}
	}
}

// backendCPU is the CPU time the connection's backend used so far.
func backendCPU(ctx context.Context, conn *pgx.Conn) time.Duration {
	var pid int
	check(conn.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&pid))
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	check(err)
	// Fields after the command's closing parenthesis; utime and stime are
	// the 14th and 15th fields of the line, in clock ticks (100 a second).
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(ut+st) * 10 * time.Millisecond
}

func walLSN(ctx context.Context, conn *pgx.Conn) string {
	var s string
	check(conn.QueryRow(ctx, "SELECT pg_current_wal_insert_lsn()::text").Scan(&s))
	return s
}

func measureUpdate(ctx context.Context, conn *pgx.Conn, table string, d design, rows, batch int) error {
	ident := pgx.Identifier{table}.Sanitize()
	if _, err := conn.Exec(ctx, fmt.Sprintf(tableDDL, ident, d.ff)+"; ALTER TABLE "+ident+" SET (autovacuum_enabled = false)"); err != nil {
		return err
	}
	if d.index != "" {
		if _, err := conn.Exec(ctx, fmt.Sprintf(d.index, table)); err != nil {
			return fmt.Errorf("%s: %w", d.name, err)
		}
	}
	for done := 0; done < rows; done += batch {
		if _, err := conn.Exec(ctx, fmt.Sprintf(insertSQL, ident), batch); err != nil {
			return err
		}
	}
	// Summarize what the inserts filled, as autosummarize would have, while
	// the rows are pending: the update then widens the summaries.
	if _, err := conn.Exec(ctx, "VACUUM "+ident); err != nil {
		return err
	}
	if _, err := conn.Exec(ctx, "CHECKPOINT"); err != nil {
		return err
	}
	var minID int64
	if err := conn.QueryRow(ctx, "SELECT min(id) FROM "+ident).Scan(&minID); err != nil {
		return err
	}
	form := markProcessed
	if d.update != "" {
		form = d.update
	}
	update := fmt.Sprintf(form, ident)
	ids := make([]int64, batch)
	startWAL := walLSN(ctx, conn)
	cpu0 := backendCPU(ctx, conn)
	t0 := time.Now()
	for done := 0; done < rows; done += batch {
		for i := range ids {
			ids[i] = minID + int64(done+i)
		}
		args := []any{ids}
		if strings.Contains(update, "$2") { // a range: the batch's ids are consecutive
			args = []any{ids[0], ids[len(ids)-1]}
		}
		tag, err := conn.Exec(ctx, update, args...)
		if err != nil {
			return err
		}
		if tag.RowsAffected() != int64(batch) {
			return fmt.Errorf("updated %d of %d rows", tag.RowsAffected(), batch)
		}
	}
	took := time.Since(t0)
	cpu := backendCPU(ctx, conn) - cpu0
	var walBytes float64
	if err := conn.QueryRow(ctx, "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), $1::pg_lsn)::float8", startWAL).Scan(&walBytes); err != nil {
		return err
	}
	_, _ = conn.Exec(ctx, "SELECT pg_stat_force_next_flush()")
	time.Sleep(1200 * time.Millisecond)
	var upd, hot, heap float64
	if err := conn.QueryRow(ctx, `SELECT n_tup_upd::float8, n_tup_hot_upd::float8, pg_relation_size(relid)::float8
		FROM pg_stat_user_tables WHERE relname = $1`, table).Scan(&upd, &hot, &heap); err != nil {
		return err
	}
	fmt.Printf("%-48s %9.0f %11.2f %10.0f %7.1f %9.1f\n", d.name, float64(rows)/took.Seconds(),
		float64(cpu.Microseconds())/float64(rows), walBytes/float64(rows), 100*hot/max(upd, 1), heap/(1<<20))
	_, err := conn.Exec(ctx, "DROP TABLE "+ident)
	return err
}

// measureLookups builds a table of tableRows processed rows the way streaming
// leaves it (each transaction's rows marked processed right after it, ranges
// summarized after that, as autosummarize does a moment later), with a tail of
// pending rows and a few failed rows spread over it, and explains the lookups.
// Then it adds a backlog of pending rows summarized before they were marked
// processed (a slot's catch-up, or an outage) and explains them again.
func measureLookups(ctx context.Context, conn *pgx.Conn, table string, d design, tableRows, backlog, batch int) error {
	ident := pgx.Identifier{table}.Sanitize()
	if _, err := conn.Exec(ctx, fmt.Sprintf(tableDDL, ident, d.ff)); err != nil {
		return err
	}
	if d.index != "" {
		if _, err := conn.Exec(ctx, fmt.Sprintf(d.index, table)); err != nil {
			return err
		}
	}
	ins := fmt.Sprintf(insertSQL, ident)
	settle := fmt.Sprintf(`UPDATE %s SET status = 'processed', updated_at = now() AT TIME ZONE 'UTC', last_error = NULL, next_attempt_at = NULL
		WHERE status = 'pending' AND id > $1::bigint - $2::bigint AND id <= $1::bigint`, ident)
	brin := strings.Contains(d.index, "brin")
	for done := 0; done < tableRows; done += batch {
		var last int64
		if err := conn.QueryRow(ctx, "WITH i AS ("+ins+" RETURNING id) SELECT max(id) FROM i", batch).Scan(&last); err != nil {
			return err
		}
		if _, err := conn.Exec(ctx, settle, last, batch); err != nil {
			return err
		}
		if brin && done%(50*batch) == 0 {
			if _, err := conn.Exec(ctx, fmt.Sprintf("SELECT brin_summarize_new_values('%s_status_brin'::regclass)", table)); err != nil {
				return err
			}
		}
	}
	// 200 failed rows spread over the table (half scheduled, half not) and a
	// tail of 1,000 pending rows, as a live outbox has.
	if _, err := conn.Exec(ctx, fmt.Sprintf(`UPDATE %s SET status = 'failed', next_attempt_at = CASE WHEN id %% 2 = 0 THEN now() - interval '1 s' END
		WHERE id IN (SELECT (g * $1 / 200)::bigint FROM generate_series(1, 200) g)`, ident), tableRows); err != nil {
		return err
	}
	if _, err := conn.Exec(ctx, ins, 1000); err != nil {
		return err
	}
	if _, err := conn.Exec(ctx, "VACUUM ANALYZE "+ident); err != nil {
		return err
	}
	var heap float64
	check(conn.QueryRow(ctx, "SELECT pg_relation_size($1)::float8", table).Scan(&heap))
	fmt.Printf("\n%s: %d processed rows streamed (%.0f MiB heap), 200 failed spread over them, 1,000 pending at the tail\n", d.name, tableRows, heap/(1<<20))
	explainAll(ctx, conn, ident, d)
	// A backlog summarized while pending, then delivered.
	for done := 0; done < backlog; done += batch {
		if _, err := conn.Exec(ctx, ins, batch); err != nil {
			return err
		}
	}
	if _, err := conn.Exec(ctx, "VACUUM "+ident); err != nil {
		return err
	}
	if _, err := conn.Exec(ctx, fmt.Sprintf(`UPDATE %s SET status = 'processed', updated_at = now() AT TIME ZONE 'UTC' WHERE status = 'pending'`, ident)); err != nil {
		return err
	}
	if _, err := conn.Exec(ctx, ins, 1000); err != nil {
		return err
	}
	if _, err := conn.Exec(ctx, "VACUUM ANALYZE "+ident); err != nil {
		return err
	}
	fmt.Printf("%s: after a %d-row backlog summarized while pending, then marked processed (1,000 pending at the tail again)\n", d.name, backlog)
	explainAll(ctx, conn, ident, d)
	if brin {
		// The remedy: summaries never narrow, so ranges must be summarized
		// again once their rows are processed.
		t0 := time.Now()
		var n int64
		if err := conn.QueryRow(ctx, fmt.Sprintf(`SELECT count(brin_desummarize_range('%[1]s_status_brin'::regclass, b))
			FROM generate_series(0, pg_relation_size('%[1]s'::regclass) / 8192 - 1, 32) b`, table)).Scan(&n); err != nil {
			return err
		}
		if _, err := conn.Exec(ctx, fmt.Sprintf("SELECT brin_summarize_new_values('%s_status_brin'::regclass)", table)); err != nil {
			return err
		}
		fmt.Printf("%s: every range summarized again (%d ranges, %.1f s: a read of the whole table)\n", d.name, n, time.Since(t0).Seconds())
		explainAll(ctx, conn, ident, d)
	}
	_, err := conn.Exec(ctx, "DROP TABLE "+ident)
	return err
}

func explainAll(ctx context.Context, conn *pgx.Conn, ident string, d design) {
	queries := []struct{ name, sql string }{
		{"rescue mark (TakeMark)", `SELECT id FROM %s WHERE status = 'pending' ORDER BY status, next_attempt_at, id LIMIT 100000`},
		{"sweep claim, unscheduled", `SELECT id FROM %s WHERE status = 'failed' AND next_attempt_at IS NULL ORDER BY status, next_attempt_at, id LIMIT 10000`},
		{"sweep claim, scheduled", `SELECT id FROM %s WHERE status = 'failed' AND next_attempt_at <= now() ORDER BY status, next_attempt_at, id LIMIT 10000`},
		{"poller backlog (ReadBacklog)", `SELECT status, count(*)::float8, min(created_at) FILTER (WHERE status IN ('pending', 'failed')) FROM %s WHERE ` + d.notProcessed + ` GROUP BY status`},
		{"failed and dead (Undelivered)", `SELECT count(*) FILTER (WHERE status = 'failed'), count(*) FILTER (WHERE status = 'dead') FROM %s WHERE ` + d.notProcessed},
		{"oldest undelivered", `SELECT min(created_at) FROM %s WHERE status IN ('pending', 'failed')`},
		{"failures report", `SELECT status, count(*) FROM %s WHERE status IN ('failed', 'dead') GROUP BY status`},
		{"backfill page", `SELECT id FROM %s WHERE status = 'pending' AND id > 0 ORDER BY id LIMIT 10000`},
	}
	fmt.Printf("  %-32s %9s %9s  %s\n", "query", "buffers", "ms", "plan")
	for _, q := range queries {
		var out []byte
		check(conn.QueryRow(ctx, "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) "+fmt.Sprintf(q.sql, ident)).Scan(&out))
		var plans []struct {
			Plan          map[string]any `json:"Plan"`
			ExecutionTime float64        `json:"Execution Time"`
		}
		check(json.Unmarshal(out, &plans))
		p := plans[0].Plan
		bufs := num(p["Shared Hit Blocks"]) + num(p["Shared Read Blocks"])
		fmt.Printf("  %-32s %9.0f %9.1f  %s\n", q.name, bufs, plans[0].ExecutionTime, strings.Join(nodes(p, nil), " > "))
	}
}

func nodes(p map[string]any, acc []string) []string {
	s, _ := p["Node Type"].(string)
	if ix, ok := p["Index Name"].(string); ok {
		s += " " + ix
	}
	if rr, ok := p["Rows Removed by Index Recheck"]; ok && num(rr) > 0 {
		s += fmt.Sprintf(" (%.0f rechecked away)", num(rr))
	}
	if hb, ok := p["Exact Heap Blocks"]; ok {
		s += fmt.Sprintf(" (%.0f+%.0f heap blocks)", num(hb), num(p["Lossy Heap Blocks"]))
	}
	acc = append(acc, s)
	if kids, ok := p["Plans"].([]any); ok {
		for _, k := range kids {
			acc = nodes(k.(map[string]any), acc)
		}
	}
	return acc
}

func num(v any) float64 { f, _ := v.(float64); return f }

func check(err error) {
	if err != nil {
		fail(err)
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "measure-hot-brin:", strings.TrimSpace(err.Error()))
	os.Exit(1)
}
