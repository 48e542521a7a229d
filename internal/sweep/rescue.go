package sweep

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"go.uber.org/zap"
)

// streamMark is a point the stream must pass before the next rescue: a
// snapshot and the WAL insert position read just after it. Every transaction
// visible in the snapshot has its commit record below wal.
type streamMark struct {
	snapshot string // txid_snapshot as text
	wal      uint64
}

// rescueChunk bounds the rows one rescue statement locks and marks.
const rescueChunk = 10000

// rescueStranded is the safety net for pending rows the stream will never
// carry: rows committed before the slot existed when no backfill ran (or
// one was interrupted), rows inserted while the table was out of the
// publication, rows set back to pending by hand, rows of a slot recreated by
// hand.
//
// The rule, which cannot race the stream into a duplicate: a row may be
// taken only if it is still pending although the slot has confirmed a WAL
// position past its commit. The stream confirms a position only after every
// row committed below it has its final status (the writer updates statuses
// before it resolves a batch for acknowledgement), so such a row is one the
// stream has passed and will not deliver. Commit positions of rows are not
// stored, so the sweep uses marks: at each sweep it records a snapshot S and
// then the WAL position W; at the next sweep, if the slot's
// confirmed_flush_lsn is at or past W, every pending row whose inserting
// transaction (xmin) is visible in S committed below W and is stranded. It
// becomes failed and due now, and the sweep delivers it after checking that
// ClickHouse does not hold it already.
func (s *Sweeper) rescueStranded(ctx context.Context, res *Result) error {
	if s.cfg.Slot == "" {
		return nil
	}
	if prev := s.mark; prev != nil {
		passed, err := s.slotPassed(ctx, prev.wal)
		if err != nil {
			return err
		}
		if passed {
			n, err := s.markStranded(ctx, prev.snapshot)
			res.Rescued += n
			if n > 0 {
				s.log.Warn("pending rows the stream had passed handed to the sweep (committed before the slot, outside the publication, or reset by hand)",
					zap.Int64("rows", n))
			}
			if err != nil {
				return err
			}
		}
	}
	var m streamMark
	var wal string
	if err := s.pool.QueryRow(ctx, "SELECT txid_current_snapshot()::text, pg_current_wal_lsn()::text").Scan(&m.snapshot, &wal); err != nil {
		return fmt.Errorf("sweep: take stream mark: %w", err)
	}
	lsn, err := pglogrepl.ParseLSN(wal)
	if err != nil {
		return fmt.Errorf("sweep: parse WAL position %q: %w", wal, err)
	}
	m.wal = uint64(lsn)
	s.mark = &m
	return nil
}

// slotPassed reports whether this database's slot has confirmed wal.
func (s *Sweeper) slotPassed(ctx context.Context, wal uint64) (bool, error) {
	var confirmed *string
	err := s.pool.QueryRow(ctx, `SELECT confirmed_flush_lsn::text FROM pg_replication_slots
		WHERE slot_name = $1 AND database = current_database()`, s.cfg.Slot).Scan(&confirmed)
	if errors.Is(err, pgx.ErrNoRows) || (err == nil && confirmed == nil) {
		// No slot (yet): the next start creates one and backfills.
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("sweep: read slot %q: %w", s.cfg.Slot, err)
	}
	lsn, err := pglogrepl.ParseLSN(*confirmed)
	if err != nil {
		return false, fmt.Errorf("sweep: parse confirmed LSN %q: %w", *confirmed, err)
	}
	return uint64(lsn) >= wal, nil
}

// markStranded marks failed and due the pending rows whose inserting
// transaction is visible in snapshot, in chunks, skipping rows someone holds.
func (s *Sweeper) markStranded(ctx context.Context, snapshot string) (int64, error) {
	var total int64
	for {
		// xmin is a 32-bit transaction id; txid_visible_in_snapshot wants the
		// 64-bit one. It is in the snapshot's epoch, or the one before when
		// it is above the low half of the snapshot's xmax.
		tag, err := s.pool.Exec(ctx, `WITH snap AS (SELECT $1::txid_snapshot AS s),
			stranded AS (
				SELECT o.id FROM event_outbox o, snap
				WHERE o.status = 'pending'
				  AND txid_visible_in_snapshot(
				        (((txid_snapshot_xmax(snap.s) >> 32)
				          - CASE WHEN o.xmin::text::bigint > (txid_snapshot_xmax(snap.s) & 4294967295) THEN 1 ELSE 0 END) << 32)
				        | o.xmin::text::bigint,
				        snap.s)
				ORDER BY o.id
				LIMIT $2
				FOR UPDATE OF o SKIP LOCKED)
			UPDATE event_outbox o
			SET status = 'failed', next_attempt_at = now(),
			    last_error = 'stranded: still pending after the stream passed its commit (committed before the slot, outside the publication, or reset by hand); delivered by the sweep',
			    updated_at = now() AT TIME ZONE 'UTC'
			FROM stranded WHERE o.id = stranded.id`, snapshot, rescueChunk)
		if err != nil {
			return total, fmt.Errorf("sweep: mark stranded pending rows: %w", err)
		}
		total += tag.RowsAffected()
		if tag.RowsAffected() < rescueChunk {
			return total, nil
		}
	}
}

// AwaitStream waits up to timeout for the slot to confirm the mark the last
// Run took, so that a following Run can rescue stranded rows: `run --sweep`
// is one process, without the next period a streaming instance has. It
// reports whether the slot got there.
func (s *Sweeper) AwaitStream(ctx context.Context, timeout time.Duration) (bool, error) {
	if s.cfg.Slot == "" || s.mark == nil {
		return false, nil
	}
	deadline := time.Now().Add(timeout)
	for {
		passed, err := s.slotPassed(ctx, s.mark.wal)
		if err != nil || passed {
			return passed, err
		}
		if time.Now().After(deadline) {
			return false, nil
		}
		select {
		case <-ctx.Done():
			return false, ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}
