package replication

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"
)

// SlotInfo is the slot's state as pg_replication_slots shows it. ReadSlot is
// the one place that reads it: the stream's preconditions, the sweep's
// rescue, the metrics poller and `status` all use it.
type SlotInfo struct {
	Exists         bool
	Plugin         string
	Active         bool
	ActivePID      int32
	ConfirmedFlush uint64
	WALStatus      string
	// CurrentWAL is the server's WAL insert position when the slot was read.
	CurrentWAL uint64
	// LagBytes is CurrentWAL - confirmed_flush_lsn and RetainedBytes is
	// CurrentWAL - restart_lsn; nil when unknown (a lost slot).
	LagBytes, RetainedBytes *int64
	// SafeWALSize is safe_wal_size: the WAL that can still be written before
	// the slot risks invalidation; nil when max_slot_wal_keep_size is
	// unlimited.
	SafeWALSize *int64
	// Database is the database the slot was created in. Slot names are
	// server-wide: a slot of another database is not this outbox's.
	Database string
	// Foreign is true when Database is not the connection's database.
	Foreign bool
	// Failover and Synced (PostgreSQL 17+), Conflicting (16+): the columns
	// of pg_replication_slots; nil on servers without them. Failover marks
	// a slot synchronised to standbys; Synced, a slot on a standby that is
	// such a copy; Conflicting, a slot invalidated by recovery conflicts.
	Failover, Synced, Conflicting *bool
	// InvalidationReason (17+) says why the slot can no longer stream, e.g.
	// wal_removed; empty when it can.
	InvalidationReason string
}

// CheckPreconditions verifies, over a normal connection, everything streaming needs,
// and returns a *PreconditionError that says what to do when something is missing.
func CheckPreconditions(ctx context.Context, conn *pgx.Conn, cfg Config) (SlotInfo, error) {
	var walLevel string
	if err := conn.QueryRow(ctx, "SHOW wal_level").Scan(&walLevel); err != nil {
		return SlotInfo{}, fmt.Errorf("read wal_level: %w", err)
	}
	if walLevel != "logical" {
		return SlotInfo{}, &PreconditionError{
			Problem: fmt.Sprintf("wal_level is %q, logical replication needs \"logical\"", walLevel),
			Hint:    "set wal_level = logical in postgresql.conf (ALTER SYSTEM SET wal_level = logical) and restart PostgreSQL",
		}
	}

	var canReplicate bool
	if err := conn.QueryRow(ctx, "SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user").Scan(&canReplicate); err != nil {
		return SlotInfo{}, fmt.Errorf("read role attributes: %w", err)
	}
	if !canReplicate {
		var user string
		_ = conn.QueryRow(ctx, "SELECT current_user").Scan(&user)
		return SlotInfo{}, &PreconditionError{
			Problem: fmt.Sprintf("role %q lacks the REPLICATION attribute", user),
			Hint:    fmt.Sprintf("run ALTER ROLE %s WITH REPLICATION as a superuser", pgx.Identifier{user}.Sanitize()),
		}
	}

	var tableExists bool
	if err := conn.QueryRow(ctx, "SELECT to_regclass($1) IS NOT NULL", pgx.Identifier{cfg.Schema, cfg.Table}.Sanitize()).Scan(&tableExists); err != nil {
		return SlotInfo{}, fmt.Errorf("look up table %s.%s: %w", cfg.Schema, cfg.Table, err)
	}
	if !tableExists {
		return SlotInfo{}, &PreconditionError{
			Problem: fmt.Sprintf("table %s.%s does not exist", cfg.Schema, cfg.Table),
			Hint:    "run: outbox-streamer migrate up",
		}
	}

	var ins, upd, del, trunc, allTables bool
	err := conn.QueryRow(ctx, `SELECT pubinsert, pubupdate, pubdelete, pubtruncate, puballtables
		FROM pg_publication WHERE pubname = $1`, cfg.Publication).Scan(&ins, &upd, &del, &trunc, &allTables)
	if errors.Is(err, pgx.ErrNoRows) {
		return SlotInfo{}, &PreconditionError{
			Problem: fmt.Sprintf("publication %q does not exist", cfg.Publication),
			Hint: fmt.Sprintf("run: outbox-streamer migrate up (or CREATE PUBLICATION %s FOR TABLE %s WITH (publish = 'insert'))",
				pgx.Identifier{cfg.Publication}.Sanitize(), pgx.Identifier{cfg.Schema, cfg.Table}.Sanitize()),
		}
	}
	if err != nil {
		return SlotInfo{}, fmt.Errorf("read publication %q: %w", cfg.Publication, err)
	}
	if !ins || upd || del || trunc {
		return SlotInfo{}, &PreconditionError{
			Problem: fmt.Sprintf("publication %q must publish inserts only (insert=%t update=%t delete=%t truncate=%t)", cfg.Publication, ins, upd, del, trunc),
			Hint:    fmt.Sprintf("run ALTER PUBLICATION %s SET (publish = 'insert')", pgx.Identifier{cfg.Publication}.Sanitize()),
		}
	}
	var inPub bool
	if err := conn.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_publication_tables
		WHERE pubname = $1 AND schemaname = $2 AND tablename = $3)`, cfg.Publication, cfg.Schema, cfg.Table).Scan(&inPub); err != nil {
		return SlotInfo{}, fmt.Errorf("read publication tables: %w", err)
	}
	if !inPub {
		return SlotInfo{}, &PreconditionError{
			Problem: fmt.Sprintf("publication %q does not include %s.%s", cfg.Publication, cfg.Schema, cfg.Table),
			Hint: fmt.Sprintf("run ALTER PUBLICATION %s ADD TABLE %s", pgx.Identifier{cfg.Publication}.Sanitize(),
				pgx.Identifier{cfg.Schema, cfg.Table}.Sanitize()),
		}
	}

	if err := checkObjects(ctx, conn, cfg); err != nil {
		return SlotInfo{}, err
	}

	slot, err := ReadSlot(ctx, conn, cfg.Slot)
	if err != nil {
		return SlotInfo{}, err
	}
	if slot.Exists && slot.Foreign {
		return slot, &PreconditionError{
			Problem: fmt.Sprintf("replication slot %q belongs to database %q, not to this outbox's database (slot names are unique per server, not per database)", cfg.Slot, slot.Database),
			Hint:    "set REPLICATION_SLOT_NAME to a name no other database on this server uses, e.g. " + strconv.Quote(cfg.Slot+"_"+slotSuffix(conn)),
		}
	}
	if slot.Exists && slot.Plugin != "pgoutput" {
		return slot, &PreconditionError{
			Problem: fmt.Sprintf("replication slot %q uses plugin %q, not pgoutput", cfg.Slot, slot.Plugin),
			Hint:    "choose another REPLICATION_SLOT_NAME, or drop that slot if nothing else uses it",
		}
	}
	if slot.Active {
		return slot, SlotInUseError(cfg.Slot, slot.ActivePID)
	}
	return slot, nil
}

// neededColumns are the outbox columns the sweep, the status updates and the
// retries use beyond those the stream decodes.
var neededColumns = []string{"status", "attempts", "last_error", "next_attempt_at", "created_at"}

// checkObjects verifies that the migrations' objects the streamer writes
// exist: outbox_checkpoint and the retry columns. Checked before the slot is
// created — a slot retains WAL from its creation, and one left behind by a
// streamer that then failed on a missing table fills the disk.
func checkObjects(ctx context.Context, conn *pgx.Conn, cfg Config) error {
	var checkpoint bool
	var missing []string
	err := conn.QueryRow(ctx, `SELECT to_regclass('outbox_checkpoint') IS NOT NULL,
		ARRAY(SELECT c FROM unnest($2::text[]) AS c WHERE NOT EXISTS (
			SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass($1) AND attname = c AND attnum > 0 AND NOT attisdropped))`,
		pgx.Identifier{cfg.Schema, cfg.Table}.Sanitize(), neededColumns).Scan(&checkpoint, &missing)
	if err != nil {
		return fmt.Errorf("look up outbox_checkpoint and the columns of %s.%s: %w", cfg.Schema, cfg.Table, err)
	}
	var what []string
	if !checkpoint {
		what = append(what, "table outbox_checkpoint")
	}
	if len(missing) > 0 {
		what = append(what, fmt.Sprintf("columns %s of %s.%s", strings.Join(missing, ", "), cfg.Schema, cfg.Table))
	}
	if len(what) > 0 {
		return &PreconditionError{
			Problem: fmt.Sprintf("the migrations have not run on this database (missing %s); no replication slot was created", strings.Join(what, " and ")),
			Hint:    "run: outbox-streamer migrate up (it adopts an existing outbox table; see docs/migrating-from-celery.md)",
		}
	}
	return nil
}

// SlotInUseError says another process streams from the slot.
func SlotInUseError(slot string, pid int32) error {
	who := "another process"
	if pid > 0 {
		who = fmt.Sprintf("server process %d", pid)
	}
	return &PreconditionError{
		Problem:   fmt.Sprintf("replication slot %q is in use by %s", slot, who),
		Hint:      "another outbox-streamer (or a stale connection) is streaming from it; stop it, or wait for it to exit",
		SlotInUse: true,
	}
}

// ReadSlot reads the slot's row from pg_replication_slots (Exists false when
// there is none). A slot of another database (Foreign) is reported as such:
// slot names are server-wide.
func ReadSlot(ctx context.Context, conn interface {
	QueryRow(context.Context, string, ...any) pgx.Row
}, slot string) (SlotInfo, error) {
	var info SlotInfo
	var confirmed, walStatus, database, reason *string
	var current string
	var pid *int32
	err := conn.QueryRow(ctx, `SELECT pg_current_wal_lsn()::text, s.slot_name IS NOT NULL,
			COALESCE(s.plugin, ''), COALESCE(s.active, false), s.active_pid, s.confirmed_flush_lsn::text,
			s.wal_status, s.database, COALESCE(s.database IS DISTINCT FROM current_database(), false),
			pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn)::bigint,
			pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::bigint,
			s.safe_wal_size,
			-- Columns that only newer servers have: NULL on the others.
			(to_jsonb(s) ->> 'failover')::boolean, (to_jsonb(s) ->> 'synced')::boolean,
			(to_jsonb(s) ->> 'conflicting')::boolean, to_jsonb(s) ->> 'invalidation_reason'
		FROM (SELECT 1) AS one LEFT JOIN pg_replication_slots s ON s.slot_name = $1`, slot).
		Scan(&current, &info.Exists, &info.Plugin, &info.Active, &pid, &confirmed, &walStatus, &database, &info.Foreign,
			&info.LagBytes, &info.RetainedBytes, &info.SafeWALSize, &info.Failover, &info.Synced, &info.Conflicting, &reason)
	if err != nil {
		return info, fmt.Errorf("read replication slot %q: %w", slot, err)
	}
	if info.CurrentWAL, err = parseLSN(current); err != nil {
		return info, fmt.Errorf("parse current WAL position %q: %w", current, err)
	}
	if !info.Exists {
		return SlotInfo{CurrentWAL: info.CurrentWAL}, nil
	}
	if database != nil {
		info.Database = *database
	}
	if pid != nil {
		info.ActivePID = *pid
	}
	if walStatus != nil {
		info.WALStatus = *walStatus
	}
	if reason != nil {
		info.InvalidationReason = *reason
	}
	if confirmed != nil {
		lsn, err := parseLSN(*confirmed)
		if err != nil {
			return info, fmt.Errorf("parse confirmed_flush_lsn of slot %q: %w", slot, err)
		}
		info.ConfirmedFlush = lsn
	}
	return info, nil
}

// slotSuffix suggests a slot name suffix: the connection's database name,
// reduced to what slot names allow (lower-case letters, digits, underscore).
func slotSuffix(conn *pgx.Conn) string {
	var b strings.Builder
	for _, r := range strings.ToLower(conn.Config().Database) {
		if (r >= 'a' && r <= 'z') || (r >= '0' && r <= '9') || r == '_' {
			b.WriteRune(r)
		} else {
			b.WriteByte('_')
		}
	}
	if b.Len() == 0 {
		return "outbox"
	}
	return b.String()
}
