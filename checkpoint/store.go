package checkpoint

import (
	"context"
	"fmt"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Store keeps the in-flight record of a slot in the outbox_checkpoint table: the
// highest commit LSN of any batch that may have reached ClickHouse. It is written
// before each insert that goes beyond it, so after a crash every replayed row at or
// below it is checked against ClickHouse instead of being inserted blindly.
type Store struct {
	pool *pgxpool.Pool
	slot string
}

// NewStore returns the in-flight record of slot.
func NewStore(pool *pgxpool.Pool, slot string) *Store {
	return &Store{pool: pool, slot: slot}
}

// Inflight returns the recorded LSN (0 when none).
func (s *Store) Inflight(ctx context.Context) (uint64, error) {
	var lsn pglogrepl.LSN
	err := s.pool.QueryRow(ctx, `SELECT COALESCE(
		(SELECT inflight_lsn::text FROM outbox_checkpoint WHERE slot_name = $1), '0/0')`, s.slot).Scan(&lsn)
	if err != nil {
		return 0, fmt.Errorf("read in-flight record of slot %q: %w", s.slot, err)
	}
	return uint64(lsn), nil
}

// RecordInflight raises the recorded LSN to lsn (never lowers it).
func (s *Store) RecordInflight(ctx context.Context, lsn uint64) error {
	_, err := s.pool.Exec(ctx, `INSERT INTO outbox_checkpoint (slot_name, inflight_lsn, updated_at)
		VALUES ($1, $2::text::pg_lsn, now())
		ON CONFLICT (slot_name) DO UPDATE
		SET inflight_lsn = GREATEST(outbox_checkpoint.inflight_lsn, EXCLUDED.inflight_lsn), updated_at = now()`,
		s.slot, pglogrepl.LSN(lsn).String())
	if err != nil {
		return fmt.Errorf("record in-flight LSN %s of slot %q: %w", pglogrepl.LSN(lsn), s.slot, err)
	}
	return nil
}
