package replication

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/jackc/pgerrcode"
	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"go.uber.org/zap"

	"github.com/outbox-streamer/outbox-streamer/checkpoint"
	"github.com/outbox-streamer/outbox-streamer/internal/batch"
	"github.com/outbox-streamer/outbox-streamer/internal/fault"
	"github.com/outbox-streamer/outbox-streamer/internal/pgsql"
	"github.com/outbox-streamer/outbox-streamer/internal/record"
)

// ErrWriterStopped is returned when the batch consumer exited while the stream still
// had a batch to hand over.
var ErrWriterStopped = errors.New("batch writer stopped")

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
	// (protocol 2); spill holds them until they commit.
	streaming bool
	spill     *spill
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
		// The server removed WAL the slot still needed (max_slot_wal_keep_size): it can
		// never stream again. A new slot plus a backfill of what is still pending
		// recovers without losing or duplicating events.
		log.Warn("replication slot was invalidated (wal_status lost); dropping and recreating it, rows it missed are backfilled through the sweep")
		if _, err := plain.Exec(ctx, "SELECT pg_drop_replication_slot($1)", cfg.Slot); err != nil {
			return nil, fmt.Errorf("drop invalidated replication slot %q: %w", cfg.Slot, err)
		}
		slot.Exists = false
	}

	rcfg, err := pgconn.ParseConfig(cfg.DSN)
	if err != nil {
		return nil, fmt.Errorf("DATABASE_URL is not a valid PostgreSQL connection string: %w", err)
	}
	rcfg.RuntimeParams["replication"] = "database"
	// pgoutput renders values as text with the walsender's settings: pin the ones the
	// decoder depends on instead of inheriting whatever the server defaults to.
	rcfg.RuntimeParams["DateStyle"] = "ISO, YMD"
	rcfg.RuntimeParams["TimeZone"] = "UTC"
	rcfg.RuntimeParams["extra_float_digits"] = "3"
	rcfg.RuntimeParams["application_name"] = "outbox-streamer"
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
		if failover.want {
			res, err = createFailoverSlot(ctx, conn, cfg.Slot)
		} else {
			res, err = pglogrepl.CreateReplicationSlot(ctx, conn, cfg.Slot, "pgoutput",
				pglogrepl.CreateReplicationSlotOptions{Mode: pglogrepl.LogicalReplication, SnapshotAction: "EXPORT_SNAPSHOT"})
		}
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
	if s.spill != nil {
		_ = s.spill.Close()
	}
	return s.conn.Close(context.Background())
}

// RunConfig tunes the receive loop's batching.
type RunConfig struct {
	// BatchSize is the most rows in a batch (EVENT_BATCH_SIZE, default 1000).
	BatchSize int
	// BatchMaxBytes bounds a batch's bytes (record.Event.Size summed) as well; a
	// batch passes it by at most its last row. 0 (the zero value): no byte bound;
	// EVENT_BATCH_MAX_BYTES defaults to 8 MiB.
	BatchMaxBytes int
	// BatchTimeout is how long a batch stays open after its first row
	// (EVENT_BATCH_TIMEOUT, default 100 ms).
	BatchTimeout time.Duration
	// ShutdownTimeout bounds the final flush and acknowledgement after ctx ends
	// (default 30 s).
	ShutdownTimeout time.Duration
	// OnStreaming, if set, is called once the server accepted START_REPLICATION.
	OnStreaming func()
	// Observer, if set, is told how many rows were received and what was
	// acknowledged (implemented by *metrics.Metrics).
	Observer Observer
	// Stage hands the rows of transactions streamed before their commit
	// (protocol 2) to the writer as they arrive, in batches of StageRows
	// (default BatchSize) or BatchMaxBytes, for it to stage in ClickHouse; at
	// the commit their batches say so (batch.Streamed). Off: they wait in the
	// local spill only.
	Stage     bool
	StageRows int
}

// Observer follows the stream's progress.
type Observer interface {
	AddReceived(n int)
	SetAckedLSN(lsn uint64)
}

// Run streams until ctx ends or an error occurs. Decoded rows go into batches handed
// to out; the consumer resolves them in the Tracker once they are durable, and Run
// reports the Tracker's safe LSN to the server. On ctx's end Run flushes the open
// batch, closes out, waits (bounded) until writerDone is closed, acknowledges what is
// durable and returns nil. out is closed on every return.
func (s *Stream) Run(ctx context.Context, rc RunConfig, out chan<- *batch.Batch, writerDone <-chan struct{}) error {
	rc.setDefaults()
	r := &receiver{s: s, rc: rc, out: out, writerDone: writerDone,
		builder: batch.NewBuilder(rc.BatchSize, rc.BatchMaxBytes, rc.BatchTimeout)}
	defer r.closeOut()

	if err := s.startReplication(ctx); err != nil {
		return err
	}
	if rc.OnStreaming != nil {
		rc.OnStreaming()
	}
	err := r.receive(ctx)
	// The one place that tells stopping from failing: once ctx has ended, whatever
	// the loop was doing when it noticed (blocked in a receive, handing a batch
	// over) is the stream being stopped, and the shutdown path flushes and
	// acknowledges. A closed connection or the server's own error cannot be shut
	// down cleanly; those are returned as they are.
	if ctx.Err() != nil && !s.conn.IsClosed() && !isServerError(err) {
		return r.shutdown()
	}
	return err
}

func (rc *RunConfig) setDefaults() {
	if rc.BatchSize <= 0 {
		rc.BatchSize = 1000
	}
	if rc.BatchTimeout <= 0 {
		rc.BatchTimeout = 100 * time.Millisecond
	}
	if rc.ShutdownTimeout <= 0 {
		rc.ShutdownTimeout = 30 * time.Second
	}
	if rc.StageRows <= 0 {
		rc.StageRows = rc.BatchSize
	}
}

func (s *Stream) startReplication(ctx context.Context) error {
	pub := pgx.Identifier{s.cfg.Publication}.Sanitize()
	args := []string{"proto_version '1'", "publication_names " + pgsql.Literal(pub)}
	if s.streaming {
		sp, err := openSpill(s.cfg.SpillDir, s.cfg.SpillMaxBytes)
		if err != nil {
			return err
		}
		s.spill = sp
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

// isServerError reports an ErrorResponse the server sent on the replication
// connection.
func isServerError(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr)
}

// receiver is the state of one Run: it owns the hand-over to the writer (out,
// writerDone), the batch being built and the one waiting to be handed over.
// Only Run's goroutine uses it.
type receiver struct {
	s          *Stream
	rc         RunConfig
	out        chan<- *batch.Batch
	outClosed  bool
	writerDone <-chan struct{}
	builder    *batch.Builder
	msg        Message // reused by the decoder for every message

	// serverWALEnd is the highest WAL end the server reported in a keepalive;
	// status updates follow it while nothing is in flight.
	serverWALEnd uint64
	// waiting is a batch taken from the builder and not yet accepted by the
	// writer. When ctx ends during the hand-over it stays here for the shutdown
	// path: a batch is never dropped while the writer is there to take it.
	waiting *batch.Batch

	// Rows of the streamed transaction stageXid received since the last
	// staging batch (RunConfig.Stage), with their subtransactions.
	stage      []record.Event
	stageSubs  []uint32
	stageXid   uint32
	stageBytes int
	// tag marks the batches of the staged transaction being replayed.
	tag *batch.Streamed

	// The receive deadline (next status update or batch time bound) lives in a
	// context reused across messages: one per wake-up instead of one per message,
	// which was a quarter of the loop's CPU in profiles.
	recv deadlineCtx
}

// receive runs the loop until ctx ends (it then returns ctx's error or the error
// of what ctx interrupted) or something fails.
func (r *receiver) receive(ctx context.Context) error {
	defer r.recv.release()
	for ctx.Err() == nil {
		if err := r.step(ctx); err != nil {
			return err
		}
	}
	return ctx.Err()
}

// step waits for one message (or the next deadline), handles it, then flushes a
// batch past its time bound and sends a status update when one is due.
func (r *receiver) step(ctx context.Context) error {
	s := r.s
	// A writer that failed while nothing was being handed to it must stop the
	// stream too, not leave it acknowledging keepalives with no one delivering
	// (the rows it held are replayed on the next start).
	select {
	case <-r.writerDone:
		return ErrWriterStopped
	default:
	}
	deadline := s.lastStatus.Add(s.cfg.StatusInterval)
	if d, ok := r.builder.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	raw, err := s.conn.ReceiveMessage(r.recv.until(ctx, deadline))
	switch {
	case err != nil:
		// Only the receive deadline passing is routine; a receive ended by ctx
		// is returned for Run to decide.
		if ctx.Err() != nil || !pgconn.Timeout(err) {
			return fmt.Errorf("receive from slot %q: %w", s.cfg.Slot, err)
		}
	default:
		switch m := raw.(type) {
		case *pgproto3.CopyData:
			if err := r.handleCopyData(ctx, m.Data); err != nil {
				return err
			}
		case *pgproto3.ErrorResponse:
			return fmt.Errorf("replication on slot %q: %w", s.cfg.Slot, pgconn.ErrorResponseToPgError(m))
		default:
			// Notices and parameter changes need no action.
		}
	}
	now := time.Now()
	if r.builder.Due(now) {
		if err := r.emit(ctx, r.builder.Take()); err != nil {
			return err
		}
	}
	if now.Sub(s.lastStatus) >= s.cfg.StatusInterval {
		if err := s.sendStatus(r.serverWALEnd, false); err != nil {
			return err
		}
		if r.rc.Observer != nil {
			r.rc.Observer.SetAckedLSN(s.lastSent)
		}
	}
	return nil
}

func (r *receiver) handleCopyData(ctx context.Context, data []byte) error {
	s := r.s
	if len(data) == 0 {
		return fmt.Errorf("%w: empty CopyData", ErrMalformed)
	}
	switch data[0] {
	case pglogrepl.PrimaryKeepaliveMessageByteID:
		ka, err := pglogrepl.ParsePrimaryKeepaliveMessage(data[1:])
		if err != nil {
			return fmt.Errorf("%w: keepalive: %v", ErrMalformed, err)
		}
		if uint64(ka.ServerWALEnd) > r.serverWALEnd {
			r.serverWALEnd = uint64(ka.ServerWALEnd)
		}
		if ka.ReplyRequested {
			return s.sendStatus(r.serverWALEnd, false)
		}
	case pglogrepl.XLogDataByteID:
		xld, err := pglogrepl.ParseXLogData(data[1:])
		if err != nil {
			return fmt.Errorf("%w: %v", ErrMalformed, err)
		}
		if err := s.dec.Decode(xld.WALData, &r.msg); err != nil {
			return fmt.Errorf("decode message at %s: %w", xld.WALStart, err)
		}
		switch r.msg.Kind {
		case KindBegin:
			s.tracker.Begin()
		case KindInsert:
			if r.msg.Streamed {
				if err := s.spillRow(&r.msg); err != nil {
					return err
				}
				return r.stageRow(ctx, &r.msg)
			}
			return r.add(ctx, &r.msg.Event)
		case KindCommit:
			s.tracker.Commit(r.msg.EndLSN)
		case KindStreamStop:
			return r.flushStage(ctx)
		case KindStreamAbort:
			return r.abort(ctx, &r.msg)
		case KindStreamCommit:
			return r.replay(ctx, &r.msg)
		}
	}
	return nil
}

// add gives a row its sequence number and puts it into the open batch,
// handing the batch over when it is full.
func (r *receiver) add(ctx context.Context, ev *record.Event) error {
	seq := r.s.tracker.NextSeq()
	// The clock matters only to the row that opens a batch (its time bound
	// starts there): the other rows skip reading it.
	var now time.Time
	if r.builder.Pending() == 0 {
		now = time.Now()
	}
	if r.builder.Add(seq, *ev, now) {
		return r.emit(ctx, r.builder.Take())
	}
	return nil
}

// spillRow keeps a row of an in-progress streamed transaction until the
// transaction commits or aborts.
func (s *Stream) spillRow(m *Message) error {
	if s.spill == nil {
		return fmt.Errorf("%w: a streamed insert on a session without streaming", ErrMalformed)
	}
	return s.spill.Append(m.Xid, m.SubXid, &m.Event)
}

// stageRow adds a streamed row to the staging batch of its transaction
// (RunConfig.Stage), handing the batch over when it is full. A chunk of the
// stream carries one transaction, and the batch is flushed at its end.
func (r *receiver) stageRow(ctx context.Context, m *Message) error {
	if !r.rc.Stage {
		return nil
	}
	if len(r.stage) > 0 && r.stageXid != m.Xid {
		if err := r.flushStage(ctx); err != nil {
			return err
		}
	}
	r.stageXid = m.Xid
	r.stage = append(r.stage, m.Event)
	r.stageSubs = append(r.stageSubs, m.SubXid)
	r.stageBytes += m.Event.Size()
	if len(r.stage) >= r.rc.StageRows || (r.rc.BatchMaxBytes > 0 && r.stageBytes >= r.rc.BatchMaxBytes) {
		return r.flushStage(ctx)
	}
	return nil
}

// flushStage hands the staging batch over, if there is one.
func (r *receiver) flushStage(ctx context.Context) error {
	if len(r.stage) == 0 {
		return nil
	}
	b := &batch.Batch{Events: r.stage, Bytes: r.stageBytes,
		Streamed: &batch.Streamed{Op: batch.OpStage, Xid: r.stageXid, SubXids: r.stageSubs}}
	r.stage, r.stageSubs, r.stageBytes = nil, nil, 0
	return r.emit(ctx, b)
}

// abort forgets a rolled-back streamed transaction or subtransaction; what
// was staged of an aborted transaction is dropped by the writer.
func (r *receiver) abort(ctx context.Context, m *Message) error {
	s := r.s
	if s.spill == nil {
		return nil
	}
	_, known := s.spill.txns[m.Xid]
	s.spill.Abort(m.Xid, m.SubXid)
	if !r.rc.Stage || !known || m.SubXid != m.Xid {
		return nil // a subtransaction's rows stay staged and are left out at the commit
	}
	if err := r.flushStage(ctx); err != nil {
		return err
	}
	return r.emit(ctx, &batch.Batch{Streamed: &batch.Streamed{Op: batch.OpDrop, Xid: m.Xid}})
}

// replay delivers a committed streamed transaction: its spilled rows, minus
// rolled-back subtransactions, become one transaction for the tracker, as if
// protocol 1 had sent it at its commit. Acknowledgement cannot pass it: its
// commit mark follows its last row. With staging, its batches are cut apart
// from other rows' and say which transaction they are, for the writer to copy
// the staged rows instead.
func (r *receiver) replay(ctx context.Context, m *Message) error {
	s := r.s
	if s.spill == nil {
		return nil
	}
	commitLSN, endLSN, commitTime, xid := m.CommitLSN, m.EndLSN, m.CommitTime, m.Xid
	var tag *batch.Streamed
	if _, known := s.spill.txns[xid]; r.rc.Stage && known {
		if err := r.flushStage(ctx); err != nil {
			return err
		}
		if err := r.flushOpen(ctx); err != nil {
			return err
		}
		rows, aborted := s.spill.Committed(xid)
		tag = &batch.Streamed{Op: batch.OpCommit, Xid: xid, Rows: rows, Aborted: aborted}
		r.tag = tag
		defer func() { r.tag = nil }()
	}
	s.tracker.Begin()
	err := s.spill.Replay(xid, func(ev *record.Event) error {
		ev.CommitLSN, ev.CommitTime, ev.Xid = commitLSN, commitTime, xid
		if ev.CreatedAt.IsZero() { // no created_at column: as protocol 1 does
			ev.CreatedAt = commitTime
		}
		return r.add(ctx, ev)
	})
	if err != nil {
		return err
	}
	s.tracker.Commit(endLSN)
	switch {
	case tag == nil:
		return nil
	case tag.Rows == 0:
		// Every staged row was rolled back with its subtransaction: no batch
		// of this commit reaches the writer to copy nothing and drop the rest.
		return r.emit(ctx, &batch.Batch{Streamed: &batch.Streamed{Op: batch.OpDrop, Xid: xid}})
	default:
		return r.flushOpen(ctx)
	}
}

// flushOpen hands over the open batch, if any.
func (r *receiver) flushOpen(ctx context.Context) error {
	if b := r.builder.Take(); b != nil {
		return r.emit(ctx, b)
	}
	return nil
}

// emit hands b to the writer. While the writer is busy (backpressure) it keeps
// sending status updates so the server does not time the connection out. Until
// the writer takes b it is r.waiting, where the shutdown path finds it if ctx
// ends first. During the replay of a staged transaction its batches carry r.tag.
func (r *receiver) emit(ctx context.Context, b *batch.Batch) error {
	if r.tag != nil && b.Streamed == nil {
		b.Streamed = r.tag
	}
	r.waiting = b
	if err := ctx.Err(); err != nil {
		return err
	}
	tick := time.NewTicker(r.s.cfg.StatusInterval)
	defer tick.Stop()
	for {
		select {
		case r.out <- b:
			r.waiting = nil
			if r.rc.Observer != nil && b.Tracked() {
				r.rc.Observer.AddReceived(b.Len())
			}
			return nil
		case <-r.writerDone:
			// No one will take it: its rows were never acknowledged and are
			// replayed on the next start.
			r.waiting = nil
			return ErrWriterStopped
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
			if err := r.s.sendStatus(r.serverWALEnd, false); err != nil {
				return err
			}
		}
	}
}

// sendStatus reports the durable position. When nothing is in flight it follows the
// server's WAL end, so a quiet outbox in a busy database does not retain WAL.
func (s *Stream) sendStatus(serverWALEnd uint64, replyRequested bool) error {
	safe := s.tracker.FollowServer(serverWALEnd)
	err := pglogrepl.SendStandbyStatusUpdate(context.Background(), s.conn, pglogrepl.StandbyStatusUpdate{
		WALWritePosition: pglogrepl.LSN(safe),
		WALFlushPosition: pglogrepl.LSN(safe),
		WALApplyPosition: pglogrepl.LSN(safe),
		ReplyRequested:   replyRequested,
	})
	if err != nil {
		return fmt.Errorf("send status update to slot %q: %w", s.cfg.Slot, err)
	}
	if safe != s.lastSent {
		s.log.Debug("acknowledged", zap.String("lsn", pglogrepl.LSN(safe).String()))
	}
	s.lastSent = safe
	s.lastStatus = time.Now()
	return nil
}

// closeOut closes out once; Run defers it so out is closed on every return.
func (r *receiver) closeOut() {
	if !r.outClosed {
		close(r.out)
		r.outClosed = true
	}
}

// shutdown hands over the waiting batch and then the open one, lets the writer
// finish, and acknowledges what is durable. It runs under its own bounded context
// because Run's ctx has already ended.
func (r *receiver) shutdown() error {
	s := r.s
	sctx, cancel := context.WithTimeout(context.Background(), r.rc.ShutdownTimeout)
	defer cancel()
	pending := r.builder.Pending()
	if r.waiting != nil {
		pending += r.waiting.Len()
	}
	// The waiting batch first: it holds the lower sequence numbers, and the
	// writer expects batches in order.
	for _, b := range []*batch.Batch{r.waiting, r.builder.Take()} {
		if b == nil {
			continue
		}
		if err := r.emit(sctx, b); err != nil {
			return fmt.Errorf("flush the last batch on shutdown: %w", err)
		}
	}
	r.closeOut()
	select {
	case <-r.writerDone:
	case <-sctx.Done():
		return fmt.Errorf("writer did not finish within %s on shutdown", r.rc.ShutdownTimeout)
	}
	if err := s.sendStatus(r.serverWALEnd, false); err != nil {
		return err
	}
	s.log.Info("stopped streaming", zap.Int("flushed_rows", pending),
		zap.String("acknowledged_lsn", pglogrepl.LSN(s.lastSent).String()))
	// Leave copy mode cleanly so the server has read the last status update before
	// the connection goes away.
	if _, err := pglogrepl.SendStandbyCopyDone(sctx, s.conn); err != nil {
		s.log.Debug("end copy mode", zap.Error(err))
	}
	return nil
}

// deadlineCtx is a receive deadline reused until it passes or an earlier one is
// needed.
type deadlineCtx struct {
	ctx    context.Context
	cancel context.CancelFunc
	at     time.Time
}

func (d *deadlineCtx) until(parent context.Context, at time.Time) context.Context {
	if d.ctx == nil || d.ctx.Err() != nil || at.Before(d.at) {
		d.release()
		d.ctx, d.cancel = context.WithDeadline(parent, at)
		d.at = at
	}
	return d.ctx
}

func (d *deadlineCtx) release() {
	if d.cancel != nil {
		d.cancel()
	}
}

func parseLSN(s string) (uint64, error) {
	lsn, err := pglogrepl.ParseLSN(s)
	return uint64(lsn), err
}
