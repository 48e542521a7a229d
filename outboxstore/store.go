// Package outboxstore is the streamer's access to the event_outbox table: it moves
// rows between pending, processed, failed and dead.
package outboxstore

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Table is the outbox table's name.
const Table = "event_outbox"

// Statuses of an outbox row.
const (
	StatusPending   = "pending"
	StatusProcessed = "processed"
	StatusFailed    = "failed"
	StatusDead      = "dead"
)

// Failure is a row that could not be delivered, and why.
type Failure struct {
	ID     int64
	Reason string
}

// RetryConfig says when a failed row is tried again and when it becomes dead.
type RetryConfig struct {
	// MaxAttempts is how many failed deliveries make a row a dead letter (default 10).
	MaxAttempts int
	// BaseDelay is the wait after the first failure; it doubles per attempt
	// (default 30 s).
	BaseDelay time.Duration
	// MaxDelay caps the wait (default 1 h).
	MaxDelay time.Duration
}

func (c *RetryConfig) defaults() {
	if c.MaxAttempts <= 0 {
		c.MaxAttempts = 10
	}
	if c.BaseDelay <= 0 {
		c.BaseDelay = 30 * time.Second
	}
	if c.MaxDelay <= 0 {
		c.MaxDelay = time.Hour
	}
}

// DB is what the store runs statements on: a pool, a connection or a transaction.
type DB interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
}

// Store updates outbox rows.
type Store struct {
	db    DB
	retry RetryConfig
}

// New returns a store over pool.
func New(pool *pgxpool.Pool, retry RetryConfig) *Store {
	retry.defaults()
	return &Store{db: pool, retry: retry}
}

// WithTx returns a store whose statements run in tx.
func (s *Store) WithTx(tx pgx.Tx) *Store {
	return &Store{db: tx, retry: s.retry}
}

// Retry returns the retry configuration (with defaults filled in).
func (s *Store) Retry() RetryConfig { return s.retry }

// MarkProcessed sets the rows processed in one statement.
func (s *Store) MarkProcessed(ctx context.Context, ids []int64) error {
	if len(ids) == 0 {
		return nil
	}
	err := s.untilVisible(ctx, ids, func(ctx context.Context, ids []int64) (pgx.Rows, error) {
		return s.db.Query(ctx, `UPDATE event_outbox
			SET status = 'processed', updated_at = now() AT TIME ZONE 'UTC', last_error = NULL, next_attempt_at = NULL
			WHERE id = ANY($1) AND status <> 'processed'
			RETURNING id`, ids)
	})
	if err != nil {
		return fmt.Errorf("mark %d outbox rows processed: %w", len(ids), err)
	}
	return nil
}

// ErrNotVisible means rows received from the replication stream did not become
// visible to other sessions in time. Logical decoding can send a transaction a moment
// before its commit is visible to new snapshots, so an UPDATE right after delivery
// may find nothing; the store retries such rows until they are visible.
var ErrNotVisible = errors.New("rows from the replication stream are not visible yet")

// untilVisible runs update (an UPDATE ... RETURNING id over the given ids) and then
// again for the rows it did not touch that are not visible at all yet, until every
// row was updated or is visible in a state the update leaves alone (processed, dead).
// Without this, a row whose commit became visible a millisecond late would stay
// pending forever although ClickHouse has it.
func (s *Store) untilVisible(ctx context.Context, ids []int64, update func(context.Context, []int64) (pgx.Rows, error)) error {
	const maxWait = 30 * time.Second
	start := time.Now()
	wait := time.Millisecond
	for {
		rows, err := update(ctx, ids)
		if err != nil {
			return err
		}
		touched, err := pgx.CollectRows(rows, pgx.RowTo[int64])
		if err != nil {
			return err
		}
		if len(touched) == len(ids) {
			return nil
		}
		rest := without(ids, touched)
		rows, err = s.db.Query(ctx, `SELECT id FROM event_outbox WHERE id = ANY($1)`, rest)
		if err != nil {
			return err
		}
		visible, err := pgx.CollectRows(rows, pgx.RowTo[int64])
		if err != nil {
			return err
		}
		ids = without(rest, visible)
		if len(ids) == 0 {
			return nil
		}
		if time.Since(start) > maxWait {
			return fmt.Errorf("%w: %d rows after %s (ids %v...)", ErrNotVisible, len(ids), maxWait, ids[:min(len(ids), 5)])
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(wait):
		}
		wait = min(wait*2, 100*time.Millisecond)
	}
}

// without returns the ids of all that are not in drop.
func without(all, drop []int64) []int64 {
	skip := make(map[int64]struct{}, len(drop))
	for _, id := range drop {
		skip[id] = struct{}{}
	}
	out := make([]int64, 0, len(all)-len(drop))
	for _, id := range all {
		if _, ok := skip[id]; !ok {
			out = append(out, id)
		}
	}
	return out
}

// MarkFailed records a failed delivery of each row: attempts+1, the reason, and the
// next attempt time with exponential backoff; a row that reaches MaxAttempts becomes
// dead. Rows already processed are left alone.
func (s *Store) MarkFailed(ctx context.Context, failures []Failure) error {
	if len(failures) == 0 {
		return nil
	}
	reasonOf := make(map[int64]string, len(failures))
	ids := make([]int64, len(failures))
	for i, f := range failures {
		ids[i] = f.ID
		reasonOf[f.ID] = cleanReason(f.Reason, maxReasonBytes)
	}
	err := s.untilVisible(ctx, ids, func(ctx context.Context, ids []int64) (pgx.Rows, error) {
		reasons := make([]string, len(ids))
		for i, id := range ids {
			reasons[i] = reasonOf[id]
		}
		return s.db.Query(ctx, `UPDATE event_outbox o
			SET attempts = o.attempts + 1,
			    status = CASE WHEN o.attempts + 1 >= $3 THEN 'dead' ELSE 'failed' END,
			    last_error = f.reason,
			    next_attempt_at = now() + least($5::float8, $4::float8 * power(2, o.attempts)) * interval '1 second',
			    updated_at = now() AT TIME ZONE 'UTC'
			FROM unnest($1::bigint[], $2::text[]) AS f(id, reason)
			WHERE o.id = f.id AND o.status <> 'processed'
			RETURNING o.id`,
			ids, reasons, s.retry.MaxAttempts, s.retry.BaseDelay.Seconds(), s.retry.MaxDelay.Seconds())
	})
	if err != nil {
		return fmt.Errorf("mark %d outbox rows failed: %w", len(failures), err)
	}
	return nil
}

// MarkDeferred marks rows failed without counting an attempt against them: the
// rows are fine, the destination was unavailable. They are due again after the base
// delay, when the sweep delivers them.
func (s *Store) MarkDeferred(ctx context.Context, ids []int64, reason string) error {
	if len(ids) == 0 {
		return nil
	}
	err := s.untilVisible(ctx, ids, func(ctx context.Context, ids []int64) (pgx.Rows, error) {
		return s.db.Query(ctx, `UPDATE event_outbox
			SET status = 'failed', last_error = $2, next_attempt_at = now() + $3::float8 * interval '1 second',
			    updated_at = now() AT TIME ZONE 'UTC'
			WHERE id = ANY($1) AND status IN ('pending', 'failed')
			RETURNING id`,
			ids, cleanReason(reason, maxReasonBytes), s.retry.BaseDelay.Seconds())
	})
	if err != nil {
		return fmt.Errorf("defer %d outbox rows: %w", len(ids), err)
	}
	return nil
}

// MarkBackfill marks pending rows that the replication slot will never carry (they
// predate it) failed and due now, for the sweep.
func (s *Store) MarkBackfill(ctx context.Context, ids []int64) error {
	_, err := s.db.Exec(ctx, `UPDATE event_outbox
		SET status = 'failed', next_attempt_at = now(),
		    last_error = 'backfill: committed before the replication slot existed; delivered by the sweep',
		    updated_at = now() AT TIME ZONE 'UTC'
		WHERE id = ANY($1) AND status = 'pending'`, ids)
	if err != nil {
		return fmt.Errorf("mark %d rows for backfill: %w", len(ids), err)
	}
	return nil
}

// NotPending returns which of ids are no longer pending (processed, failed or dead):
// after a crash such replayed rows belong to the sweep or are done, and the stream
// must not deliver them again.
func (s *Store) NotPending(ctx context.Context, ids []int64) (map[int64]struct{}, error) {
	rows, err := s.db.Query(ctx, `SELECT id FROM event_outbox WHERE id = ANY($1) AND status <> 'pending'`, ids)
	if err != nil {
		return nil, fmt.Errorf("read status of %d outbox rows: %w", len(ids), err)
	}
	defer rows.Close()
	out := make(map[int64]struct{})
	for rows.Next() {
		var id int64
		if err := rows.Scan(&id); err != nil {
			return nil, fmt.Errorf("read status of outbox rows: %w", err)
		}
		out[id] = struct{}{}
	}
	return out, rows.Err()
}

// maxReasonBytes bounds a stored error reason.
const maxReasonBytes = 2000

// cleanReason makes an error reason storable in a text column: valid UTF-8
// without NUL bytes (PostgreSQL rejects both with 22021, which would fail
// the status update for ever), cut to at most n bytes on a character
// boundary.
func cleanReason(s string, n int) string {
	s = strings.ToValidUTF8(s, "\uFFFD")
	s = strings.ReplaceAll(s, "\x00", "\\0")
	if len(s) <= n {
		return s
	}
	cut := n
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + "…"
}

// IsRetryable reports whether a PostgreSQL error is transient: the connection broke,
// the server is starting or shutting down, or a serialization conflict.
func IsRetryable(err error) bool {
	if err == nil || errors.Is(err, context.Canceled) {
		return false
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		switch pgErr.Code[:2] {
		case "08", "53", "57": // connection exception, insufficient resources, operator intervention
			return true
		}
		return pgErr.Code == "40001" || pgErr.Code == "40P01"
	}
	if errors.Is(err, pgx.ErrNoRows) {
		return false
	}
	// No server error: the connection failed or timed out.
	return true
}
