package outboxstore

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// FailureReason is one reason the failed and dead rows of an outbox hold,
// with how many rows and which events it concerns.
type FailureReason struct {
	// Reason is one row's last_error (the greatest); the rows of a group
	// differ from it only in numbers (ids, times, sizes).
	Reason string `json:"reason"`
	Failed int64  `json:"failed"`
	Dead   int64  `json:"dead"`
	// Oldest and Newest are the group's smallest and largest created_at
	// (the outbox's TIMESTAMP, in EVENT_TIME_ZONE).
	Oldest time.Time `json:"oldest_created_at"`
	Newest time.Time `json:"newest_created_at"`
}

// Rows is how many rows have the reason.
func (r FailureReason) Rows() int64 { return r.Failed + r.Dead }

// reasonKey is the SQL that groups reasons: the text with its digit runs
// replaced, so that "event_context is 2097152 bytes" and "... 3145728
// bytes", or one date and another, count as one reason. Without it every
// row would be a group of its own.
const reasonKey = `regexp_replace(COALESCE(last_error, ''), '[0-9]+', '#', 'g')`

// FailureReasons groups the failed and dead rows of table by reason, most
// rows first, at most limit groups (0: all). It reads through the partial
// index of undelivered rows: the cost follows the failures, not the table.
func FailureReasons(ctx context.Context, db Reader, table Name, limit int) ([]FailureReason, error) {
	q := table.sql(`SELECT max(COALESCE(last_error, '')),
		count(*) FILTER (WHERE status = 'failed'), count(*) FILTER (WHERE status = 'dead'),
		min(created_at), max(created_at)
		FROM {outbox} WHERE status IN ('failed', 'dead')
		GROUP BY ` + reasonKey + `
		ORDER BY count(*) DESC, max(created_at) DESC
		LIMIT NULLIF($1, 0)`)
	rows, err := db.Query(ctx, q, limit)
	if err != nil {
		return nil, fmt.Errorf("group failed rows by reason: %w", err)
	}
	list, err := pgx.CollectRows(rows, pgx.RowToStructByPos[FailureReason])
	if err != nil {
		return nil, fmt.Errorf("group failed rows by reason: %w", err)
	}
	return list, nil
}

// FailedRow is one failed or dead row: why, how often it was tried and when
// it is tried next.
type FailedRow struct {
	ID       int64  `json:"id"`
	Type     string `json:"event_type"`
	Status   string `json:"status"`
	Attempts int    `json:"attempts"`
	// NextAttempt is when the sweep tries a failed row again; nil for dead
	// rows, which wait for `dead-letters requeue`.
	NextAttempt *time.Time `json:"next_attempt_at,omitempty"`
	CreatedAt   time.Time  `json:"created_at"`
	Reason      string     `json:"reason"`
}

// FailedRows lists up to limit failed and dead rows of table, the most
// recently failed first, of eventType when not empty.
func FailedRows(ctx context.Context, db Reader, table Name, eventType string, limit int) ([]FailedRow, error) {
	rows, err := db.Query(ctx, table.sql(`SELECT id, event_type, status, attempts,
		CASE WHEN status = 'failed' THEN next_attempt_at END, created_at, COALESCE(last_error, '')
		FROM {outbox} WHERE status IN ('failed', 'dead') AND ($1 = '' OR event_type = $1)
		ORDER BY updated_at DESC, id DESC LIMIT $2`), eventType, limit)
	if err != nil {
		return nil, fmt.Errorf("list failed rows: %w", err)
	}
	list, err := pgx.CollectRows(rows, pgx.RowToStructByPos[FailedRow])
	if err != nil {
		return nil, fmt.Errorf("list failed rows: %w", err)
	}
	return list, nil
}
