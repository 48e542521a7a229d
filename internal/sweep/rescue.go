package sweep

import (
	"context"
	"fmt"
	"time"

	"go.uber.org/zap"

	"github.com/outbox-streamer/outbox-streamer/replication"
)

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
// before it resolves a batch for acknowledgement), and a new session resumes
// after the confirmed position (PostgreSQL skips every transaction whose
// commit record starts below it), so such a row is one the stream has passed
// and will not deliver. Commit positions of rows are not stored, so the
// sweep uses marks: at each sweep it reads, in one statement, the ids of the
// pending rows its snapshot sees and then the WAL insert position W; every
// one of those rows committed below W. At the next sweep, if the slot's
// confirmed_flush_lsn is at or past W, those of the ids still pending are
// stranded. No transaction id is compared: rows of transactions still open
// at the mark (savepoints included) are simply not among its ids, whatever
// the xid epoch. A stranded row becomes failed and due now, and the sweep
// delivers it after checking that ClickHouse does not hold it already.
func (s *Sweeper) rescueStranded(ctx context.Context, res *Result) error {
	if s.cfg.Slot == "" {
		return nil
	}
	if prev := s.mark; prev != nil {
		passed, err := s.slotPassed(ctx, prev.WAL)
		if err != nil {
			return err
		}
		if passed {
			n, err := s.store.MarkStranded(ctx, prev.Pending)
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
	m, err := s.store.TakeMark(ctx)
	if err != nil {
		return fmt.Errorf("sweep: %w", err)
	}
	s.mark = &m
	return nil
}

// slotPassed reports whether this database's slot has confirmed wal.
func (s *Sweeper) slotPassed(ctx context.Context, wal uint64) (bool, error) {
	slot, err := replication.ReadSlot(ctx, s.pool, s.cfg.Slot)
	if err != nil {
		return false, fmt.Errorf("sweep: %w", err)
	}
	// No slot (yet), or another database's: the next start creates ours and
	// backfills.
	return slot.Exists && !slot.Foreign && slot.ConfirmedFlush != 0 && slot.ConfirmedFlush >= wal, nil
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
		passed, err := s.slotPassed(ctx, s.mark.WAL)
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
