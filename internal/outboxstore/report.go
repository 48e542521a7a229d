package outboxstore

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgerrcode"
	"github.com/jackc/pgx/v5"

	"github.com/outbox-streamer/outbox-streamer/internal/fault"
)

// Reader runs read-only statements: a pool, a connection or a transaction.
type Reader interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// schemaHint is the advice for a failed statement on the outbox: `migrate
// up` when the table or a column is missing, nothing otherwise (migrating
// does not cure a refused password or a server that is down).
func schemaHint(err error) string {
	if fault.IsPostgres(err, pgerrcode.UndefinedTable) || fault.IsPostgres(err, pgerrcode.UndefinedColumn) {
		return " (has `outbox-streamer migrate up` run?)"
	}
	return ""
}

// CountByStatus counts the rows of table by status exactly (a scan of the
// whole table: for `status`, not for a poll). Every status is in the map.
func CountByStatus(ctx context.Context, db Reader, table Name) (map[string]int64, error) {
	counts := map[string]int64{StatusPending: 0, StatusProcessed: 0, StatusFailed: 0, StatusDead: 0}
	rows, err := db.Query(ctx, table.sql(`SELECT status, count(*) FROM {outbox} GROUP BY status`))
	if err != nil {
		return nil, fmt.Errorf("count outbox rows%s: %w", schemaHint(err), err)
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
// the table. created_at is a wall clock in EVENT_TIME_ZONE: ReadBacklog turns it
// into an age in Go, as ReadAges does.
const backlogQuery = `SELECT status, count(*)::float8,
	min(created_at) FILTER (WHERE status IN ('pending', 'failed'))
FROM %s WHERE status <> 'processed' GROUP BY status`

// BacklogQuery is the statement ReadBacklog runs on table (for EXPLAIN).
func BacklogQuery(table Name) string { return fmt.Sprintf(backlogQuery, table.Ident()) }

// ReadBacklog reads the backlog of the outbox table (the metrics poller's;
// normally event_outbox) whose TIMESTAMP values are wall clocks in loc
// (EVENT_TIME_ZONE; nil is UTC).
func ReadBacklog(ctx context.Context, db Reader, table Name, loc *time.Location) (Backlog, error) {
	ident := table.Ident()
	rows, err := db.Query(ctx, BacklogQuery(table))
	if err != nil {
		return Backlog{}, fmt.Errorf("count undelivered rows of %s: %w", ident, err)
	}
	b := Backlog{Rows: map[string]float64{}}
	var undelivered float64
	now := time.Now()
	for rows.Next() {
		var status string
		var n float64
		var created *time.Time
		if err := rows.Scan(&status, &n, &created); err != nil {
			rows.Close()
			return Backlog{}, fmt.Errorf("count undelivered rows of %s: %w", ident, err)
		}
		b.Rows[status] = n
		undelivered += n
		if age := WallAge(created, loc, now); age != nil && *age > b.OldestUndelivered {
			b.OldestUndelivered = *age
		}
	}
	if err := rows.Err(); err != nil {
		return Backlog{}, fmt.Errorf("count undelivered rows of %s: %w", ident, err)
	}

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
// eventType when not empty. updated_at is written in loc (EVENT_TIME_ZONE).
// It returns the ids it requeued.
func Requeue(ctx context.Context, db Reader, table Name, loc *time.Location, ids []int64, eventType string) ([]int64, error) {
	var idArg any
	if len(ids) > 0 {
		idArg = ids
	}
	rows, err := db.Query(ctx, table.sql(`UPDATE {outbox}
		SET status = 'failed', attempts = 0, next_attempt_at = now(), updated_at = `+NowIn(zoneName(loc))+`,
		    last_error = 'requeued by operator; before: ' || COALESCE(last_error, '')
		WHERE status = 'dead' AND ($1::bigint[] IS NULL OR id = ANY($1)) AND ($2 = '' OR event_type = $2)
		RETURNING id`), idArg, eventType)
	if err != nil {
		return nil, fmt.Errorf("requeue dead letters: %w", err)
	}
	done, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	if err != nil {
		return nil, fmt.Errorf("requeue dead letters: %w", err)
	}
	return done, nil
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
// failed row, nil when there is none; created_at is a wall clock in loc.
func OldestUndelivered(ctx context.Context, db Reader, table Name, loc *time.Location) (*float64, error) {
	var created *time.Time
	if err := db.QueryRow(ctx, table.sql(`SELECT min(created_at)
		FROM {outbox} WHERE status IN ('pending', 'failed')`)).Scan(&created); err != nil {
		return nil, fmt.Errorf("read oldest undelivered row: %w", err)
	}
	age := WallAge(created, loc, time.Now())
	if age == nil {
		return nil, nil
	}
	sec := age.Seconds()
	return &sec, nil
}

// ZoneSkew is how far table's newest row (by id) was created ahead of now,
// reading created_at as a wall clock in loc: more than a little means the
// application writes created_at in another zone than EVENT_TIME_ZONE, and
// ages, retention and verify's time ranges are off by the difference. Zero
// when the newest row is not ahead, or there is none.
func ZoneSkew(ctx context.Context, db Reader, table Name, loc *time.Location) (time.Duration, error) {
	var created *time.Time
	err := db.QueryRow(ctx, table.sql(`SELECT created_at FROM {outbox} ORDER BY id DESC LIMIT 1`)).Scan(&created)
	if err != nil && !errors.Is(err, pgx.ErrNoRows) {
		return 0, fmt.Errorf("read the newest outbox row: %w", err)
	}
	if created == nil {
		return 0, nil
	}
	if loc == nil {
		loc = time.UTC
	}
	wall := time.Date(created.Year(), created.Month(), created.Day(), created.Hour(), created.Minute(), created.Second(), created.Nanosecond(), loc)
	return max(time.Until(wall), 0), nil
}

// WallAge is how long before now the wall clock t in loc (nil: UTC) was,
// nil for nil, never negative. A TIMESTAMP scans as that wall clock in UTC.
func WallAge(t *time.Time, loc *time.Location, now time.Time) *time.Duration {
	if t == nil {
		return nil
	}
	if loc == nil {
		loc = time.UTC
	}
	wall := time.Date(t.Year(), t.Month(), t.Day(), t.Hour(), t.Minute(), t.Second(), t.Nanosecond(), loc)
	d := max(now.Sub(wall), 0)
	return &d
}

// zoneName is loc's name for NowIn ("" for nil: UTC).
func zoneName(loc *time.Location) string {
	if loc == nil {
		return ""
	}
	return loc.String()
}

// TimeType is the type of table's created_at, "timestamp without time zone"
// (wall clock in EVENT_TIME_ZONE) or "timestamp with time zone" (instants):
// an adopted outbox may have either.
func TimeType(ctx context.Context, db Reader, table Name) (string, error) {
	var typ string
	err := db.QueryRow(ctx, `SELECT format_type(atttypid, NULL) FROM pg_attribute
		WHERE attrelid = `+table.Literal()+`::regclass AND attname = 'created_at' AND NOT attisdropped`).Scan(&typ)
	if err != nil {
		return "", fmt.Errorf("read the type of %s.created_at: %w", table, err)
	}
	return typ, nil
}
