package outboxstore

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-streamer/outbox-streamer/internal/pgsql"
)

// Reader runs read-only statements: a pool, a connection or a transaction.
type Reader interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// CountByStatus counts the rows of table by status exactly (a scan of the
// whole table: for `status`, not for a poll). Every status is in the map.
func CountByStatus(ctx context.Context, db Reader, table Name) (map[string]int64, error) {
	counts := map[string]int64{StatusPending: 0, StatusProcessed: 0, StatusFailed: 0, StatusDead: 0}
	rows, err := db.Query(ctx, table.sql(`SELECT status, count(*) FROM {outbox} GROUP BY status`))
	if err != nil {
		return nil, fmt.Errorf("count outbox rows (has `outbox-streamer migrate up` run?): %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var s string
		var n int64
		if err := rows.Scan(&s, &n); err != nil {
			return nil, fmt.Errorf("count outbox rows: %w", err)
		}
		counts[s] = n
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("count outbox rows: %w", err)
	}
	return counts, nil
}

// Backlog is the undelivered part of the outbox, read cheaply enough to poll.
type Backlog struct {
	// Rows by status: exact for the statuses other than processed; processed
	// is the planner's estimate minus the rest, absent when unknown.
	Rows map[string]float64
	// OldestUndelivered is the age of the oldest pending or failed row; zero
	// when there is none.
	OldestUndelivered time.Duration
}

// backlogQuery counts the undelivered rows by status and finds the oldest pending or
// failed one. Its WHERE clause is the predicate of the partial index
// event_outbox_undelivered_idx (TABLE_undelivered_idx), so the planner reads only undelivered rows however
// many millions of processed rows the table holds: the cost follows the backlog, not
// the table. created_at holds UTC (see the migration), hence the conversion of now().
const backlogQuery = `SELECT status, count(*)::float8,
	EXTRACT(EPOCH FROM (now() AT TIME ZONE 'UTC') - min(created_at) FILTER (WHERE status IN ('pending', 'failed')))::float8
FROM %s WHERE status <> 'processed' GROUP BY status`

// BacklogQuery is the statement ReadBacklog runs on table (for EXPLAIN).
func BacklogQuery(table string) string { return fmt.Sprintf(backlogQuery, table) }

// ReadBacklog reads the backlog of the outbox table schema.table (the
// metrics poller's; normally public.event_outbox).
func ReadBacklog(ctx context.Context, db Reader, schema, table string) (Backlog, error) {
	ident := pgsql.Ident(schema, table)
	rows, err := db.Query(ctx, BacklogQuery(ident))
	if err != nil {
		return Backlog{}, fmt.Errorf("count undelivered rows of %s: %w", ident, err)
	}
	b := Backlog{Rows: map[string]float64{}}
	var undelivered, oldest float64
	for rows.Next() {
		var status string
		var n float64
		var age *float64
		if err := rows.Scan(&status, &n, &age); err != nil {
			rows.Close()
			return Backlog{}, fmt.Errorf("count undelivered rows of %s: %w", ident, err)
		}
		b.Rows[status] = n
		undelivered += n
		if age != nil && *age > oldest {
			oldest = *age
		}
	}
	if err := rows.Err(); err != nil {
		return Backlog{}, fmt.Errorf("count undelivered rows of %s: %w", ident, err)
	}
	b.OldestUndelivered = time.Duration(oldest * float64(time.Second))

	// An exact count of processed rows would scan the whole table on every poll;
	// the estimate minus the exact undelivered count is free and good enough for a
	// dashboard (it lags until autovacuum/ANALYZE refresh reltuples; -1 for a
	// table never vacuumed or analyzed).
	var reltuples float64
	if err := db.QueryRow(ctx, `SELECT reltuples::float8 FROM pg_class WHERE oid = $1::regclass`, ident).Scan(&reltuples); err != nil {
		return Backlog{}, fmt.Errorf("read row estimate of %s: %w", ident, err)
	}
	if reltuples >= 0 {
		b.Rows[StatusProcessed] = max(0, reltuples-undelivered)
	}
	return b, nil
}

// DeadLetter is a row that exhausted its attempts.
type DeadLetter struct {
	ID        int64     `json:"id"`
	Type      string    `json:"event_type"`
	Time      time.Time `json:"event_date_time"`
	Attempts  int       `json:"attempts"`
	LastError string    `json:"last_error"`
	UpdatedAt time.Time `json:"updated_at"`
}

// DeadLetters lists up to limit dead letters of table by id, of eventType
// when not empty.
func DeadLetters(ctx context.Context, db Reader, table Name, eventType string, limit int) ([]DeadLetter, error) {
	rows, err := db.Query(ctx, table.sql(`SELECT id, event_type, event_date_time, attempts, COALESCE(last_error, ''), updated_at
		FROM {outbox} WHERE status = 'dead' AND ($1 = '' OR event_type = $1) ORDER BY id LIMIT $2`), eventType, limit)
	if err != nil {
		return nil, fmt.Errorf("list dead letters: %w", err)
	}
	list, err := pgx.CollectRows(rows, pgx.RowToStructByPos[DeadLetter])
	if err != nil {
		return nil, fmt.Errorf("list dead letters: %w", err)
	}
	return list, nil
}

// Requeue makes dead letters of table failed and due now with their attempts
// reset, for the sweep to re-drive: those of ids (all when ids is empty), of
// eventType when not empty. It returns how many it requeued.
func Requeue(ctx context.Context, db DB, table Name, ids []int64, eventType string) (int64, error) {
	var idArg any
	if len(ids) > 0 {
		idArg = ids
	}
	tag, err := db.Exec(ctx, table.sql(`UPDATE {outbox}
		SET status = 'failed', attempts = 0, next_attempt_at = now(), updated_at = now() AT TIME ZONE 'UTC',
		    last_error = 'requeued by operator; before: ' || COALESCE(last_error, '')
		WHERE status = 'dead' AND ($1::bigint[] IS NULL OR id = ANY($1)) AND ($2 = '' OR event_type = $2)`), idArg, eventType)
	if err != nil {
		return 0, fmt.Errorf("requeue dead letters: %w", err)
	}
	return tag.RowsAffected(), nil
}

// Undelivered counts the failed and dead rows of table (through the partial
// index).
func Undelivered(ctx context.Context, db Reader, table Name) (failed, dead int64, err error) {
	err = db.QueryRow(ctx, table.sql(`SELECT count(*) FILTER (WHERE status = 'failed'), count(*) FILTER (WHERE status = 'dead')
		FROM {outbox} WHERE status <> 'processed'`)).Scan(&failed, &dead)
	if err != nil {
		return 0, 0, fmt.Errorf("count failed and dead rows: %w", err)
	}
	return failed, dead, nil
}

// OldestUndelivered is the age in seconds of table's oldest pending or
// failed row, nil when there is none.
func OldestUndelivered(ctx context.Context, db Reader, table Name) (*float64, error) {
	var age *float64
	if err := db.QueryRow(ctx, table.sql(`SELECT EXTRACT(EPOCH FROM (now() AT TIME ZONE 'UTC') - min(created_at))::float8
		FROM {outbox} WHERE status IN ('pending', 'failed')`)).Scan(&age); err != nil {
		return nil, fmt.Errorf("read oldest undelivered row: %w", err)
	}
	return age, nil
}

// TimeType is the type of table's created_at, "timestamp without time zone"
// (wall clock in EVENT_TIME_ZONE) or "timestamp with time zone" (instants):
// an adopted outbox may have either.
func TimeType(ctx context.Context, db interface {
	QueryRow(context.Context, string, ...any) pgx.Row
}, table Name) (string, error) {
	var typ string
	err := db.QueryRow(ctx, `SELECT format_type(atttypid, NULL) FROM pg_attribute
		WHERE attrelid = `+table.Literal()+`::regclass AND attname = 'created_at' AND NOT attisdropped`).Scan(&typ)
	if err != nil {
		return "", fmt.Errorf("read the type of %s.created_at: %w", table, err)
	}
	return typ, nil
}
