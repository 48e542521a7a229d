package replication

import (
	"context"
	"fmt"
	"strconv"
	"time"

	"github.com/jackc/pgerrcode"
	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"go.uber.org/zap"

	"github.com/outbox-streamer/outbox-streamer/checkpoint"
	"github.com/outbox-streamer/outbox-streamer/internal/fault"
	"github.com/outbox-streamer/outbox-streamer/internal/pgsql"
)

// Stream is an open replication connection on the outbox slot. Only its Run loop
// touches the connection: other goroutines influence what is acknowledged solely
// through the Tracker.
type Stream struct {
	cfg     Config
	log     *zap.Logger
	conn    *pgconn.PgConn
	tracker *checkpoint.Tracker
	dec     *Decoder

	startLSN    uint64
	slotCreated bool
	snapshot    string

	lastSent   uint64
	lastStatus time.Time

	// streaming is whether this session asks for in-progress transactions
	// (protocol 2); Run keeps them until they commit (streamedTxns).
	streaming bool
	// binary is whether this session asks for values in binary format.
	binary bool
}

// Open checks the preconditions, creates the slot when it does not exist, and opens
// the replication connection. It does not start streaming yet: a newly created slot's
// exported snapshot (SlotCreated, Snapshot) stays usable until Run is called.
func Open(ctx context.Context, cfg Config, log *zap.Logger) (*Stream, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	log = log.Named("replication").With(zap.String("slot", cfg.Slot))

	plain, err := pgx.Connect(ctx, cfg.DSN)
	if err != nil {
		return nil, fmt.Errorf("connect to postgres: %w", err)
	}
	defer plain.Close(context.Background())
	slot, err := CheckPreconditions(ctx, plain, cfg)
	if err != nil {
		return nil, err
	}
	binary, err := chooseBinary(ctx, plain, cfg)
	if err != nil {
		return nil, err
	}
	failover, err := planFailover(ctx, plain, cfg)
	if err != nil {
		return nil, err
	}
	failover.warn(log)
	if slot.Exists && slot.WALStatus == "lost" {
		// The slot can never stream again: the server removed WAL it needed
		// (max_slot_wal_keep_size), or — 16+, where every invalidation reads as
		// wal_status lost — it conflicted with recovery, or (18) sat idle past
		// idle_replication_slot_timeout. A new slot plus a backfill of what is still
		// pending recovers without losing or duplicating events.
		reason := slot.InvalidationReason
		if reason == "" {
			reason = "wal_status lost"
		}
		log.Warn("replication slot was invalidated; dropping and recreating it, rows it missed are backfilled through the sweep",
			zap.String("invalidation_reason", reason))
		if _, err := plain.Exec(ctx, "SELECT pg_drop_replication_slot($1)", cfg.Slot); err != nil {
			return nil, fmt.Errorf("drop invalidated replication slot %q: %w", cfg.Slot, err)
		}
		slot.Exists = false
	}

	rcfg, err := ConnConfig(cfg.DSN)
	if err != nil {
		return nil, err
	}
	conn, err := pgconn.ConnectConfig(ctx, rcfg)
	if err != nil {
		return nil, fmt.Errorf("open replication connection: %w", err)
	}
	s := &Stream{cfg: cfg, log: log, conn: conn, dec: NewDecoder(cfg.Schema, cfg.Table, cfg.TimeZone), binary: binary}
	// Refuse before creating the slot: a slot left behind would retain WAL.
	major := serverMajor(conn.ParameterStatus("server_version"))
	switch {
	case cfg.Streaming == StreamingOn && major < 14:
		conn.Close(context.Background())
		return nil, &PreconditionError{Problem: fmt.Sprintf("REPLICATION_STREAMING is on, but PostgreSQL %s cannot stream in-progress transactions", conn.ParameterStatus("server_version")),
			Hint: "use PostgreSQL 14 or newer, or set REPLICATION_STREAMING=auto (protocol 1 on older servers)"}
	case cfg.Streaming != StreamingOff && major >= 14:
		s.streaming = true
	}

	if !slot.Exists {
		var res pglogrepl.CreateReplicationSlotResult
		stopWatch := watchSlotCreation(ctx, plain, log)
		if failover.want {
			res, err = createFailoverSlot(ctx, conn, cfg.Slot)
		} else {
			res, err = pglogrepl.CreateReplicationSlot(ctx, conn, cfg.Slot, "pgoutput",
				pglogrepl.CreateReplicationSlotOptions{Mode: pglogrepl.LogicalReplication, SnapshotAction: "EXPORT_SNAPSHOT"})
		}
		stopWatch()
		if err != nil {
			conn.Close(context.Background())
			if fault.IsPostgres(err, pgerrcode.DuplicateObject) {
				return nil, SlotInUseError(cfg.Slot, 0)
			}
			return nil, fmt.Errorf("create replication slot %q: %w", cfg.Slot, err)
		}
		lsn, err := pglogrepl.ParseLSN(res.ConsistentPoint)
		if err != nil {
			conn.Close(context.Background())
			return nil, fmt.Errorf("parse consistent point of new slot %q: %w", cfg.Slot, err)
		}
		s.startLSN, s.slotCreated, s.snapshot = uint64(lsn), true, res.SnapshotName
		log.Info("created replication slot", zap.String("consistent_point", res.ConsistentPoint), zap.Bool("failover", failover.want))
	} else {
		s.startLSN = slot.ConfirmedFlush
		if failover.want && slot.Failover != nil && !*slot.Failover {
			// The preconditions found the slot inactive, which ALTER needs.
			if err := makeFailoverSlot(ctx, conn, cfg.Slot); err != nil {
				conn.Close(context.Background())
				return nil, err
			}
			log.Info("made the replication slot a failover slot")
		}
	}
	s.tracker = checkpoint.NewTracker(s.startLSN)
	return s, nil
}

// ConnConfig is the configuration of a replication connection to dsn as the
// streamer opens it (application_name outbox-streamer): replication=database,
// and the session settings the decoder depends on, pinned because pgoutput
// renders values as text with the walsender's settings, not the server's
// defaults. Whatever else reads the slot with this package's Decoder should
// connect with it too.
func ConnConfig(dsn string) (*pgconn.Config, error) {
	cfg, err := pgconn.ParseConfig(dsn)
	if err != nil {
		return nil, fmt.Errorf("DATABASE_URL is not a valid PostgreSQL connection string: %w", err)
	}
	cfg.RuntimeParams["replication"] = "database"
	cfg.RuntimeParams["DateStyle"] = "ISO, YMD"
	cfg.RuntimeParams["TimeZone"] = "UTC"
	cfg.RuntimeParams["extra_float_digits"] = "3"
	cfg.RuntimeParams["application_name"] = "outbox-streamer"
	return cfg, nil
}

// Streaming reports whether the session streams in-progress transactions
// (pgoutput protocol 2).
func (s *Stream) Streaming() bool { return s.streaming }

// Binary reports whether the session asks for values in binary format.
func (s *Stream) Binary() bool { return s.binary }

// chooseBinary decides REPLICATION_BINARY for this session: binary format
// needs PostgreSQL 14 and a binary reader for the type of every outbox column
// the decoder reads. The types are read on every start, so a column whose type
// changed to one without a reader gets text from the next session on.
func chooseBinary(ctx context.Context, conn *pgx.Conn, cfg Config) (bool, error) {
	if cfg.Binary == BinaryOff {
		return false, nil
	}
	version := conn.PgConn().ParameterStatus("server_version")
	if serverMajor(version) < 14 {
		if cfg.Binary == BinaryOn {
			return false, &PreconditionError{Problem: fmt.Sprintf("REPLICATION_BINARY is on, but PostgreSQL %s cannot send values in binary format", version),
				Hint: "use PostgreSQL 14 or newer, or set REPLICATION_BINARY=auto (text on older servers)"}
		}
		return false, nil
	}
	col, typ, err := undecodableColumn(ctx, conn, cfg)
	switch {
	case err != nil:
		return false, err
	case col == "":
		return true, nil
	case cfg.Binary == BinaryOn:
		return false, &PreconditionError{Problem: fmt.Sprintf("REPLICATION_BINARY is on, but column %s of %s.%s is of type %s, which the decoder cannot read in binary format", col, cfg.Schema, cfg.Table, typ),
			Hint: "set REPLICATION_BINARY=auto (text for this table) or off"}
	}
	return false, nil
}

// undecodableColumn returns the first outbox column the decoder reads whose
// type it cannot read in binary format, with the type's name; "" when none.
func undecodableColumn(ctx context.Context, conn *pgx.Conn, cfg Config) (col, typ string, err error) {
	rows, err := conn.Query(ctx, `SELECT attname, atttypid::int8, format_type(atttypid, atttypmod)
		FROM pg_attribute WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum`,
		pgx.Identifier{cfg.Schema, cfg.Table}.Sanitize())
	if err != nil {
		return "", "", fmt.Errorf("read the column types of %s.%s: %w", cfg.Schema, cfg.Table, err)
	}
	defer rows.Close()
	for rows.Next() {
		var name, typName string
		var oid int64
		if err := rows.Scan(&name, &oid, &typName); err != nil {
			return "", "", fmt.Errorf("read the column types of %s.%s: %w", cfg.Schema, cfg.Table, err)
		}
		if col == "" && !BinaryDecodable(name, uint32(oid)) {
			col, typ = name, typName
		}
	}
	if err := rows.Err(); err != nil {
		return "", "", fmt.Errorf("read the column types of %s.%s: %w", cfg.Schema, cfg.Table, err)
	}
	return col, typ, nil
}

// serverMajor reads the major version from server_version ("15.18 (Debian
// 15.18-0+deb12u1)", "9.6.24"); 0 when it does not parse.
func serverMajor(v string) int {
	end := 0
	for end < len(v) && v[end] >= '0' && v[end] <= '9' {
		end++
	}
	n, _ := strconv.Atoi(v[:end])
	return n
}

// Tracker is the acknowledgement tracker the writer resolves batches in.
func (s *Stream) Tracker() *checkpoint.Tracker { return s.tracker }

// StartLSN is the position streaming resumes from (the slot's confirmed flush LSN).
func (s *Stream) StartLSN() uint64 { return s.startLSN }

// SlotCreated reports whether Open created the slot; Snapshot is then the name of the
// snapshot it exported, showing exactly the rows committed before the slot.
func (s *Stream) SlotCreated() (bool, string) { return s.slotCreated, s.snapshot }

// Close closes the replication connection.
func (s *Stream) Close() error {
	return s.conn.Close(context.Background())
}
func (s *Stream) startReplication(ctx context.Context) error {
	pub := pgx.Identifier{s.cfg.Publication}.Sanitize()
	args := []string{"proto_version '1'", "publication_names " + pgsql.Literal(pub)}
	if s.streaming {
		args = []string{"proto_version '2'", "streaming 'on'", "publication_names " + pgsql.Literal(pub)}
	}
	if s.binary {
		args = append(args, "binary 'true'")
	}
	if err := pglogrepl.StartReplication(ctx, s.conn, s.cfg.Slot, pglogrepl.LSN(s.startLSN),
		pglogrepl.StartReplicationOptions{Mode: pglogrepl.LogicalReplication, PluginArgs: args}); err != nil {
		if fault.IsPostgres(err, pgerrcode.ObjectInUse) {
			return SlotInUseError(s.cfg.Slot, 0)
		}
		return fmt.Errorf("start replication on slot %q: %w", s.cfg.Slot, err)
	}
	s.log.Info("streaming", zap.String("from_lsn", pglogrepl.LSN(s.startLSN).String()),
		zap.String("publication", s.cfg.Publication), zap.Bool("in_progress_transactions", s.streaming), zap.Bool("binary", s.binary))
	s.lastStatus = time.Now()
	return nil
}

func parseLSN(s string) (uint64, error) {
	lsn, err := pglogrepl.ParseLSN(s)
	return uint64(lsn), err
}
