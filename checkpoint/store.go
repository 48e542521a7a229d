package checkpoint

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgerrcode"
	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
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

// PublishView writes the leader's own view of its work (JSON) into the slot's
// row, for `status` (migration 2's columns).
func (s *Store) PublishView(ctx context.Context, view []byte) error {
	_, err := s.pool.Exec(ctx, `INSERT INTO outbox_checkpoint (slot_name, leader_view, leader_view_at)
		VALUES ($1, $2, now())
		ON CONFLICT (slot_name) DO UPDATE SET leader_view = EXCLUDED.leader_view, leader_view_at = EXCLUDED.leader_view_at`,
		s.slot, string(view))
	if err != nil {
		return fmt.Errorf("publish the leader's view of slot %q: %w", s.slot, err)
	}
	return nil
}

// View is the leader's last published view and how old it is.
type View struct {
	JSON []byte
	Age  time.Duration
}

// Querier runs one query (a pool or a connection).
type Querier interface {
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// ReadView returns slot's last published view; ok is false when there is
// none (no leader yet, PROGRESS_INTERVAL=0, or migration 2 not applied).
func ReadView(ctx context.Context, db Querier, slot string) (v View, ok bool, err error) {
	var age float64
	err = db.QueryRow(ctx, `SELECT leader_view::text, extract(epoch FROM now() - leader_view_at)::float8
		FROM outbox_checkpoint WHERE slot_name = $1 AND leader_view IS NOT NULL`, slot).Scan(&v.JSON, &age)
	var pgErr *pgconn.PgError
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		return v, false, nil
	case errors.As(err, &pgErr) && (pgErr.Code == pgerrcode.UndefinedColumn || pgErr.Code == pgerrcode.UndefinedTable):
		return v, false, nil
	case err != nil:
		return v, false, fmt.Errorf("read the leader's view of slot %q: %w", slot, err)
	}
	v.Age = time.Duration(age * float64(time.Second))
	return v, true, nil
}
