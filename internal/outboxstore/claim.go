package outboxstore

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"

	"github.com/outbox-streamer/outbox-streamer/internal/pgsql"
	"github.com/outbox-streamer/outbox-streamer/internal/record"
)

// Claimed is a row the sweep holds locked for one delivery, with the
// deliveries it has failed so far.
type Claimed struct {
	Event    record.Event
	Attempts int
}

// claimColumns are the columns a claim reads.
const claimColumns = `id, event_type, event_date_time, environment, event_context::text,
			metadata_version, created_at, attempts`

// The two claims, each an index scan of event_outbox_undelivered_idx (the
// outbox table's name followed by _undelivered_idx)
// (status, next_attempt_at, id) in the index's order, so a round costs its
// LIMIT, not the backlog: one `ORDER BY next_attempt_at NULLS FIRST, id` with
// `OR next_attempt_at IS NULL` matched no index order and sorted every failed
// row on each round (a 500,000-row backfill ran at 2,400 rows/s).
const (
	// claimUnscheduled takes failed rows without next_attempt_at (inserted so
	// by hand or by an older tool): due now, not never.
	claimUnscheduled = `SELECT ` + claimColumns + `
		FROM {outbox}
		WHERE status = 'failed' AND next_attempt_at IS NULL
		ORDER BY status, next_attempt_at, id
		LIMIT $1
		FOR UPDATE SKIP LOCKED`
	// claimScheduled takes the failed rows that are due, oldest due first.
	claimScheduled = `SELECT ` + claimColumns + `
		FROM {outbox}
		WHERE status = 'failed' AND next_attempt_at <= now()
		ORDER BY status, next_attempt_at, id
		LIMIT $1
		FOR UPDATE SKIP LOCKED`
)

// ClaimStatements are the statements ClaimDue runs on table (for EXPLAIN).
func ClaimStatements(table Name) []string {
	return []string{table.sql(claimUnscheduled), table.sql(claimScheduled)}
}

// ClaimDue locks up to limit failed rows whose next attempt is due (those
// without a next attempt first, then the oldest due), skipping rows another
// sweeper holds (FOR UPDATE SKIP LOCKED). Call it on a store bound to a
// transaction (WithTx): the locks last until it ends. loc is the zone of the
// outbox's TIMESTAMP values.
func (s *Store) ClaimDue(ctx context.Context, limit int, loc *time.Location) ([]Claimed, error) {
	var out []Claimed
	for _, q := range ClaimStatements(s.table) {
		if len(out) >= limit {
			break
		}
		rows, err := s.db.Query(ctx, q, limit-len(out))
		if err != nil {
			return nil, fmt.Errorf("select due failed rows: %w", err)
		}
		for rows.Next() {
			c, err := scanClaimed(rows, loc)
			if err != nil {
				rows.Close()
				return nil, err
			}
			out = append(out, c)
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return nil, fmt.Errorf("read due failed rows: %w", err)
		}
	}
	return out, nil
}

// scanClaimed reads one due row. Values Go cannot represent (a timestamp of
// 'infinity', a NULL where the table had none) do not fail the claim: the
// event carries the problem, so the row becomes failed or dead with it and
// the rows behind it go on.
func scanClaimed(rows pgx.Rows, loc *time.Location) (Claimed, error) {
	var (
		c              Claimed
		typ, env, ectx pgtype.Text
		at, created    pgtype.Timestamp
		version, n     pgtype.Int8
	)
	ev := &c.Event
	if err := rows.Scan(&ev.ID, &typ, &at, &env, &ectx, &version, &created, &n); err != nil {
		return c, fmt.Errorf("read claimed outbox row: %w", err)
	}
	ev.Type, ev.Environment, ev.Context, ev.MetadataVersion = typ.String, env.String, ectx.String, version.Int64
	var problems []string
	for _, col := range []struct {
		name string
		v    pgtype.Timestamp
		dst  *time.Time
	}{{"event_date_time", at, &ev.Time}, {"created_at", created, &ev.CreatedAt}} {
		switch {
		case !col.v.Valid:
			problems = append(problems, col.name+" is NULL")
		case col.v.InfinityModifier == pgtype.Infinity:
			problems = append(problems, col.name+" is infinity, which ClickHouse cannot hold")
		case col.v.InfinityModifier == pgtype.NegativeInfinity:
			problems = append(problems, col.name+" is -infinity, which ClickHouse cannot hold")
		default:
			*col.dst = inZone(col.v.Time, loc)
		}
	}
	if !typ.Valid {
		problems = append(problems, "event_type is NULL")
	}
	if !ectx.Valid {
		ev.Context = "{}"
	}
	ev.Problem = strings.Join(problems, "; ")
	c.Attempts = int(n.Int64)
	return c, nil
}

// inZone reinterprets a TIMESTAMP (read as UTC wall clock) in loc.
func inZone(t time.Time, loc *time.Location) time.Time {
	if loc == nil || loc == time.UTC {
		return t
	}
	return time.Date(t.Year(), t.Month(), t.Day(), t.Hour(), t.Minute(), t.Second(), t.Nanosecond(), loc).UTC()
}

// Mark is a point the stream must pass before stranded rows can be rescued:
// the pending rows committed by then, and a WAL position at or past the end
// of each of their commit records.
type Mark struct {
	// Pending are ids of rows that were pending and committed when the mark
	// was taken (at most MarkLimit of them, lowest first in the index).
	Pending []int64
	// WAL is the WAL insert position read after the rows.
	WAL uint64
}

// MarkLimit bounds the ids one mark holds (8 bytes each). Rows past it wait
// for a later mark; in steady streaming the pending rows are only those in
// flight, far fewer.
const MarkLimit = 100000

// takeMark reads the pending rows and then the WAL insert position in one
// statement: its snapshot is taken before the function runs, so every row it
// returns committed below that position. The insert position, not the write
// position pg_current_wal_lsn() gives: with synchronous_commit = off a
// commit is visible before its record is written out.
const takeMark = `SELECT ARRAY(SELECT id FROM {outbox}
		WHERE status = 'pending'
		ORDER BY status, next_attempt_at, id
		LIMIT $1), pg_current_wal_insert_lsn()::text`

// TakeMark reads a Mark now.
func (s *Store) TakeMark(ctx context.Context) (Mark, error) {
	var m Mark
	var wal string
	if err := s.db.QueryRow(ctx, s.sql(takeMark), MarkLimit).Scan(&m.Pending, &wal); err != nil {
		return m, fmt.Errorf("take stream mark: %w", err)
	}
	lsn, err := pgsql.ParseLSN(wal)
	if err != nil {
		return m, fmt.Errorf("parse WAL position %q: %w", wal, err)
	}
	m.WAL = lsn
	return m, nil
}

// rescueChunk bounds the rows one rescue statement locks and marks.
const rescueChunk = 10000

// MarkStranded marks failed and due those of ids that are still pending, in
// chunks, skipping rows someone holds. The caller must know the ids are a
// Mark's and the stream has passed its WAL position (see sweep's
// rescueStranded for why that makes them stranded).
func (s *Store) MarkStranded(ctx context.Context, ids []int64) (int64, error) {
	var total int64
	for len(ids) > 0 {
		chunk := ids[:min(len(ids), rescueChunk)]
		ids = ids[len(chunk):]
		tag, err := s.db.Exec(ctx, s.sql(`WITH stranded AS (
				SELECT o.id FROM {outbox} o
				WHERE o.id = ANY($1) AND o.status = 'pending'
				FOR UPDATE OF o SKIP LOCKED)
			UPDATE {outbox} o
			SET status = 'failed', next_attempt_at = now(),
			    last_error = 'stranded: still pending after the stream passed its commit (committed before the slot, outside the publication, or reset by hand); delivered by the sweep',
			    updated_at = {now}
			FROM stranded WHERE o.id = stranded.id`), chunk)
		if err != nil {
			return total, fmt.Errorf("mark stranded pending rows: %w", err)
		}
		total += tag.RowsAffected()
	}
	return total, nil
}

// widenCommitted is the SQL that widens a 32-bit transaction id (xid) to the
// 64-bit form txid_visible_in_snapshot wants, relative to the snapshot's
// xmax: the xid within 2^31 of it, before or after. Every xid of a running or
// recently committed transaction is, so an xid past xmax (a transaction
// still in progress) stays past it and is not visible. Not for the xmin of
// arbitrary rows: frozen rows keep xids older than that.
func widenCommitted(xid, snap string) string {
	xmax := `txid_snapshot_xmax(` + snap + `)`
	return `(` + xmax + ` - (((` + xmax + ` & 4294967295) - ` + xid + ` + 6442450944) % 4294967296 - 2147483648))`
}
