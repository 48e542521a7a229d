package outboxstore

import (
	"context"
	"fmt"
	"math"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-streamer/outbox-streamer/internal/pgsql"
)

// SlotBacklog is the pending rows of a new replication slot's exported snapshot:
// exactly the rows committed before the slot was created, which the slot will
// never carry. It holds a read-only repeatable-read transaction with that
// snapshot and hands out the rows' ids in pages, in id order. The ids say
// which rows are the backfill's; their current state is read when they are
// taken (TakePending), since the rescue or a sweeper may have moved them on.
type SlotBacklog struct {
	mu   sync.Mutex // one query at a time on tx; guards last
	tx   pgx.Tx
	page string
	last int64
}

// OpenSlotBacklog imports snapshot (the name CREATE_REPLICATION_SLOT ...
// EXPORT_SNAPSHOT returned). Call it before the replication connection runs
// its next command, which ends the export; once imported, the snapshot lasts
// until Close.
func (s *Store) OpenSlotBacklog(ctx context.Context, snapshot string) (*SlotBacklog, error) {
	tx, err := s.pool.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly})
	if err != nil {
		return nil, fmt.Errorf("backfill: begin: %w", err)
	}
	if _, err := tx.Exec(ctx, "SET TRANSACTION SNAPSHOT "+pgsql.Literal(snapshot)); err != nil {
		_ = tx.Rollback(context.Background())
		return nil, fmt.Errorf("backfill: import the slot's snapshot %q: %w", snapshot, err)
	}
	page := s.sql(`SELECT id FROM {outbox} WHERE status = 'pending' AND id > $1 ORDER BY id LIMIT $2`)
	return &SlotBacklog{tx: tx, page: page, last: math.MinInt64}, nil
}

// Next returns the ids of up to limit more rows of the backlog, in id order;
// none once all were handed out. It is safe for concurrent use.
func (b *SlotBacklog) Next(ctx context.Context, limit int) ([]int64, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	rows, err := b.tx.Query(ctx, b.page, b.last, limit)
	if err != nil {
		return nil, fmt.Errorf("backfill: read pending rows of the slot's snapshot: %w", err)
	}
	ids, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	if err != nil {
		return nil, fmt.Errorf("backfill: read pending rows of the slot's snapshot: %w", err)
	}
	if len(ids) > 0 {
		b.last = ids[len(ids)-1]
	}
	return ids, nil
}

// Close ends the snapshot's transaction.
func (b *SlotBacklog) Close() {
	b.mu.Lock()
	defer b.mu.Unlock()
	_ = b.tx.Rollback(context.Background()) // read-only
}

// takePendingSQL claims pending rows by writing the status they have once
// delivered. It matches only rows still pending: one the rescue or a sweeper
// has made failed (or anything else) is theirs.
const takePendingSQL = `UPDATE {outbox}
	SET status = 'processed', updated_at = {now}, last_error = NULL, next_attempt_at = NULL
	WHERE id = ANY($1) AND status = 'pending'
	RETURNING ` + claimColumns

// TakePending claims those of ids that are still pending for one delivery,
// in the caller's transaction (a store bound by WithTx), and returns them.
//
// The claim is the rows' final update, to 'processed', written before the
// delivery: no other session sees that status before the caller commits, and
// the caller commits only once ClickHouse holds the rows (FailTaken first
// for the rows it could not deliver). Meanwhile the update's row locks keep
// the rescue (MarkStranded skips locked rows) and other sweepers (they take
// only failed rows) away from them. A rollback or a crash leaves them pending
// and unchanged, for the rescue, whose sweep looks in ClickHouse before it
// inserts. So each delivered row is written once: SELECT ... FOR UPDATE
// followed by the update would write each row twice (a tuple lock, with its
// WAL, and the new version).
func (s *Store) TakePending(ctx context.Context, ids []int64, loc *time.Location) ([]Claimed, error) {
	rows, err := s.db.Query(ctx, s.sql(takePendingSQL), ids)
	if err != nil {
		return nil, fmt.Errorf("take %d pending rows: %w", len(ids), err)
	}
	defer rows.Close()
	out := make([]Claimed, 0, len(ids))
	for rows.Next() {
		c, err := scanClaimed(rows, loc)
		if err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("take %d pending rows: %w", len(ids), err)
	}
	return out, nil
}

// FailTaken records a failed delivery of rows TakePending took in the same
// transaction, as MarkFailed does. (MarkFailed leaves processed rows alone,
// and in this transaction these read processed.)
func (s *Store) FailTaken(ctx context.Context, failures []Failure) error {
	if len(failures) == 0 {
		return nil
	}
	ids := make([]int64, len(failures))
	for i, f := range failures {
		ids[i] = f.ID
	}
	reasons, finals := failureArgs(failures)
	if _, err := s.db.Exec(ctx, s.sql(markFailedSQL), ids, reasons,
		s.retry.MaxAttempts, s.retry.BaseDelay.Seconds(), s.retry.MaxDelay.Seconds(), finals); err != nil {
		return fmt.Errorf("mark %d backfilled rows failed: %w", len(failures), err)
	}
	return nil
}

// MarkForSweep marks those of ids that are still pending failed and due now,
// with reason, so that the sweep delivers them: what the backfill does with
// the rows it cannot deliver itself (ClickHouse unavailable). The sweep looks
// in ClickHouse before it inserts, so rows a rolled-back delivery had inserted
// are not sent twice.
func (s *Store) MarkForSweep(ctx context.Context, ids []int64, reason string) (int64, error) {
	if len(ids) == 0 {
		return 0, nil
	}
	tag, err := s.db.Exec(ctx, s.sql(`UPDATE {outbox}
		SET status = 'failed', next_attempt_at = now(), last_error = $2, updated_at = {now}
		WHERE id = ANY($1) AND status = 'pending'`), ids, cleanReason(reason, maxReasonBytes))
	if err != nil {
		return 0, fmt.Errorf("mark %d pending rows for the sweep: %w", len(ids), err)
	}
	return tag.RowsAffected(), nil
}
