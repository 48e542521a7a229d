// Package outboxstore owns the outbox table (event_outbox, or OUTBOX_TABLE;
// see Name): every statement the streamer runs on it is here. It moves rows between pending, processed,
// failed and dead (status updates, the sweep's claims, backfill and rescue),
// removes old processed rows and partitions (retention), and reads the
// counts, ages and dead letters that status, metrics and operators see. The
// schema itself is the migrations package's.
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

	"github.com/outbox-streamer/outbox-streamer/internal/pgsql"
)

// Table is the default outbox table's name (OUTBOX_TABLE; see Name).
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
	// Final: no retry can deliver the row as it is (the streamer's own
	// validation refused a value, such as a date the event table cannot
	// hold), so it becomes dead at once instead of after MaxAttempts.
	Final bool
	// Xid is the inserting transaction's id for streamed rows (see Ref).
	Xid uint32
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
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// Store runs the statements on one outbox table (event_outbox unless told).
type Store struct {
	db    DB
	pool  *pgxpool.Pool // for statements that need their own transaction
	retry RetryConfig
	table Name
	zone  string // EVENT_TIME_ZONE's name ("" is UTC), of the updated_at it writes
}

// New returns a store of event_outbox over pool.
func New(pool *pgxpool.Pool, retry RetryConfig) *Store {
	return NewFor(pool, retry, DefaultName)
}

// NewFor returns a store of the outbox table over pool (OUTBOX_TABLE).
func NewFor(pool *pgxpool.Pool, retry RetryConfig, table Name) *Store {
	retry.defaults()
	return &Store{db: pool, pool: pool, retry: retry, table: table.orDefault()}
}

// WithTx returns a store whose statements run in tx.
func (s *Store) WithTx(tx pgx.Tx) *Store {
	return &Store{db: tx, pool: s.pool, retry: s.retry, table: s.table, zone: s.zone}
}

// InZone returns the store writing updated_at as a wall clock in loc
// (EVENT_TIME_ZONE), the zone the application writes created_at in: in UTC
// the two columns of one row would be hours apart.
func (s *Store) InZone(loc *time.Location) *Store {
	c := *s
	if loc != nil {
		c.zone = loc.String()
	}
	return &c
}

// NowIn is SQL for the current time as a wall clock in the zone named zone
// ("" is UTC): what the outbox's TIMESTAMP columns hold.
func NowIn(zone string) string {
	if zone == "" {
		zone = "UTC"
	}
	return "(now() AT TIME ZONE " + pgsql.Literal(zone) + ")"
}

// Table returns the outbox table the store works on.
func (s *Store) Table() Name { return s.table }

// sql puts the quoted outbox table where a statement says {outbox}.
func (s *Store) sql(q string) string {
	return strings.ReplaceAll(s.table.sql(q), "{now}", NowIn(s.zone))
}

// Begin starts a transaction for WithTx.
func (s *Store) Begin(ctx context.Context) (pgx.Tx, error) {
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		return nil, fmt.Errorf("begin a transaction on the outbox: %w", err)
	}
	return tx, nil
}

// Retry returns the retry configuration (with defaults filled in).
func (s *Store) Retry() RetryConfig { return s.retry }

// Ref names an outbox row the pipeline settles: its id and the 32-bit id of
// the transaction that inserted it (from the replication stream; 0 for rows
// the sweep read, which it holds locked).
type Ref struct {
	ID  int64
	Xid uint32
}

// RefsOf returns refs without transaction ids, for rows a caller holds locked.
func RefsOf(ids []int64) []Ref {
	refs := make([]Ref, len(ids))
	for i, id := range ids {
		refs[i] = Ref{ID: id}
	}
	return refs
}

// MarkProcessed sets the rows processed in one statement. It returns the ids
// of rows that no longer exist (see untilVisible): settled, never waited for.
func (s *Store) MarkProcessed(ctx context.Context, refs []Ref) (vanished []int64, err error) {
	if len(refs) == 0 {
		return nil, nil
	}
	const set = `SET status = 'processed', updated_at = {now}, last_error = NULL, next_attempt_at = NULL`
	// A batch of one producer's rows has consecutive ids: one range scan of
	// the primary key instead of a lookup per id. Anything short of every row
	// updated takes the general path, which leaves this statement's rows alone.
	if lo, hi, ok := consecutive(refs); ok && len(refs) > 1 {
		tag, err := s.db.Exec(ctx, s.sql(`UPDATE {outbox} `+set+`
			WHERE id BETWEEN $1 AND $2 AND status <> 'processed'`), lo, hi)
		if err != nil {
			return nil, fmt.Errorf("mark %d outbox rows processed: %w", len(refs), err)
		}
		if tag.RowsAffected() == int64(len(refs)) {
			return nil, nil
		}
	}
	vanished, err = s.untilVisible(ctx, refs, "status = 'processed'", func(ctx context.Context, ids []int64) (pgx.Rows, error) {
		return s.db.Query(ctx, s.sql(`UPDATE {outbox} `+set+`
			WHERE id = ANY($1) AND status <> 'processed'
			RETURNING id`), ids)
	})
	if err != nil {
		return vanished, fmt.Errorf("mark %d outbox rows processed: %w", len(refs), err)
	}
	return vanished, nil
}

// ErrNotVisible means rows received from the replication stream did not become
// visible to other sessions in time. Logical decoding can send a transaction a moment
// before its commit is visible to new snapshots, so an UPDATE right after delivery
// may find nothing; the store retries such rows until they are visible.
var ErrNotVisible = errors.New("rows from the replication stream are not visible yet")

// untilVisible runs update (an UPDATE ... RETURNING id over the given ids) until
// every row was updated, is in a state the update leaves alone (leftAlone, an SQL
// condition on the row), or no longer exists.
//
// A streamed row the update does not find is one of two things. Its commit may not
// be visible yet: logical decoding can send a transaction a moment before new
// snapshots see it, and giving up on such a row would leave it pending although
// ClickHouse has it. Or it is gone: deleted in its own transaction (pgoutput
// carries the insert, never the delete), by a retention job, or by hand — waiting
// for it would stall acknowledgement for ever. The transaction id tells them apart:
// once the inserting transaction is visible in a snapshot, a later statement that
// does not find the row proves it gone. Those ids are returned as vanished.
func (s *Store) untilVisible(ctx context.Context, refs []Ref, leftAlone string, update func(context.Context, []int64) (pgx.Rows, error)) (vanished []int64, err error) {
	const maxWait = 30 * time.Second
	start := time.Now()
	wait := time.Millisecond
	for {
		rows, err := update(ctx, idsOf(refs))
		if err != nil {
			return vanished, err
		}
		touched, err := pgx.CollectRows(rows, pgx.RowTo[int64])
		if err != nil {
			return vanished, err
		}
		if len(touched) == len(refs) {
			return vanished, nil
		}
		rest := without(refs, touched)
		// First which inserting transactions are visible now, then which rows
		// exist: a later statement sees at least what the earlier one did.
		committed, err := s.visibleXids(ctx, rest)
		if err != nil {
			return vanished, err
		}
		rows, err = s.db.Query(ctx, s.sql(`SELECT id, `+leftAlone+` FROM {outbox} WHERE id = ANY($1)`), idsOf(rest))
		if err != nil {
			return vanished, err
		}
		exists := map[int64]bool{} // id -> left alone by the update
		for rows.Next() {
			var id int64
			var alone bool
			if err := rows.Scan(&id, &alone); err != nil {
				rows.Close()
				return vanished, err
			}
			exists[id] = alone
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return vanished, err
		}
		refs = refs[:0:0]
		for _, r := range rest {
			alone, ok := exists[r.ID]
			switch {
			case ok && alone:
				// done: in a state the update leaves alone
			case ok:
				refs = append(refs, r) // became visible since the update: update again
			case r.Xid != 0 && committed[r.Xid]:
				vanished = append(vanished, r.ID)
			default:
				refs = append(refs, r) // not visible yet
			}
		}
		if len(refs) == 0 {
			return vanished, nil
		}
		if time.Since(start) > maxWait {
			return vanished, fmt.Errorf("%w: %d rows after %s (ids %v...)", ErrNotVisible, len(refs), maxWait, idsOf(refs[:min(len(refs), 5)]))
		}
		select {
		case <-ctx.Done():
			return vanished, ctx.Err()
		case <-time.After(wait):
		}
		wait = min(wait*2, 100*time.Millisecond)
	}
}

// visibleXids returns which of the refs' transaction ids are visible (committed
// and seen) in a snapshot taken now.
func (s *Store) visibleXids(ctx context.Context, refs []Ref) (map[uint32]bool, error) {
	var xids []int64
	seen := map[uint32]bool{}
	for _, r := range refs {
		if r.Xid != 0 && !seen[r.Xid] {
			seen[r.Xid] = true
			xids = append(xids, int64(r.Xid))
		}
	}
	out := map[uint32]bool{}
	if len(xids) == 0 {
		return out, nil
	}
	rows, err := s.db.Query(ctx, `WITH snap AS (SELECT txid_current_snapshot() AS s)
		SELECT x FROM snap, unnest($1::bigint[]) AS x
		WHERE txid_visible_in_snapshot(`+widenCommitted("x", "snap.s")+`, snap.s)`, xids)
	if err != nil {
		return nil, fmt.Errorf("check which transactions are visible: %w", err)
	}
	visible, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	if err != nil {
		return nil, fmt.Errorf("check which transactions are visible: %w", err)
	}
	for _, x := range visible {
		out[uint32(x)] = true
	}
	return out, nil
}

// consecutive reports whether refs' ids ascend one by one, and their range.
func consecutive(refs []Ref) (lo, hi int64, ok bool) {
	for i, r := range refs {
		if r.ID != refs[0].ID+int64(i) {
			return 0, 0, false
		}
	}
	return refs[0].ID, refs[len(refs)-1].ID, true
}

func idsOf(refs []Ref) []int64 {
	ids := make([]int64, len(refs))
	for i, r := range refs {
		ids[i] = r.ID
	}
	return ids
}

// without returns the refs whose ids are not in drop.
func without(all []Ref, drop []int64) []Ref {
	skip := make(map[int64]struct{}, len(drop))
	for _, id := range drop {
		skip[id] = struct{}{}
	}
	out := make([]Ref, 0, len(all))
	for _, r := range all {
		if _, ok := skip[r.ID]; !ok {
			out = append(out, r)
		}
	}
	return out
}

// MarkFailed records a failed delivery of each row: attempts+1, the reason, and the
// next attempt time with exponential backoff; a row that reaches MaxAttempts becomes
// dead. Rows already processed are left alone; rows that no longer exist are
// returned as vanished.
func (s *Store) MarkFailed(ctx context.Context, failures []Failure) (vanished []int64, err error) {
	if len(failures) == 0 {
		return nil, nil
	}
	byID := make(map[int64]Failure, len(failures))
	refs := make([]Ref, len(failures))
	for i, f := range failures {
		refs[i] = Ref{ID: f.ID, Xid: f.Xid}
		byID[f.ID] = f
	}
	vanished, err = s.untilVisible(ctx, refs, "status = 'processed'", func(ctx context.Context, ids []int64) (pgx.Rows, error) {
		sub := make([]Failure, len(ids))
		for i, id := range ids {
			sub[i] = byID[id]
		}
		reasons, finals := failureArgs(sub)
		return s.db.Query(ctx, s.sql(markFailedSQL+` AND o.status <> 'processed' RETURNING o.id`),
			ids, reasons, s.retry.MaxAttempts, s.retry.BaseDelay.Seconds(), s.retry.MaxDelay.Seconds(), finals)
	})
	if err != nil {
		return vanished, fmt.Errorf("mark %d outbox rows failed: %w", len(failures), err)
	}
	return vanished, nil
}

// failureArgs are markFailedSQL's reasons ($2) and finals ($6) of failures.
func failureArgs(failures []Failure) (reasons []string, finals []bool) {
	reasons, finals = make([]string, len(failures)), make([]bool, len(failures))
	for i, f := range failures {
		reasons[i], finals[i] = cleanReason(f.Reason, maxReasonBytes), f.Final
	}
	return reasons, finals
}

// markFailedSQL records one failed delivery of each row of unnest($1 ids, $2
// reasons, $6 finals): attempts+1, dead at $3 attempts or at once when final,
// the next attempt after $4 seconds doubled per attempt, at most $5.
const markFailedSQL = `UPDATE {outbox} o
	SET attempts = o.attempts + 1,
	    status = CASE WHEN f.final OR o.attempts + 1 >= $3 THEN 'dead' ELSE 'failed' END,
	    last_error = f.reason,
	    next_attempt_at = now() + least($5::float8, $4::float8 * power(2, o.attempts)) * interval '1 second',
	    updated_at = {now}
	FROM unnest($1::bigint[], $2::text[], $6::bool[]) AS f(id, reason, final)
	WHERE o.id = f.id`

// MarkDeferred marks rows failed without counting an attempt against them: the
// rows are fine, the destination was unavailable. They are due again after the base
// delay, when the sweep delivers them. Rows that no longer exist are returned as
// vanished.
func (s *Store) MarkDeferred(ctx context.Context, refs []Ref, reason string) (vanished []int64, err error) {
	if len(refs) == 0 {
		return nil, nil
	}
	vanished, err = s.untilVisible(ctx, refs, "status NOT IN ('pending', 'failed')", func(ctx context.Context, ids []int64) (pgx.Rows, error) {
		return s.db.Query(ctx, s.sql(`UPDATE {outbox}
			SET status = 'failed', last_error = $2, next_attempt_at = now() + $3::float8 * interval '1 second',
			    updated_at = {now}
			WHERE id = ANY($1) AND status IN ('pending', 'failed')
			RETURNING id`),
			ids, cleanReason(reason, maxReasonBytes), s.retry.BaseDelay.Seconds())
	})
	if err != nil {
		return vanished, fmt.Errorf("defer %d outbox rows: %w", len(refs), err)
	}
	return vanished, nil
}

// NotPending returns which of ids are no longer pending (processed, failed or dead):
// after a crash such replayed rows belong to the sweep or are done, and the stream
// must not deliver them again.
func (s *Store) NotPending(ctx context.Context, ids []int64) (map[int64]struct{}, error) {
	rows, err := s.db.Query(ctx, s.sql(`SELECT id FROM {outbox} WHERE id = ANY($1) AND status <> 'pending'`), ids)
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
