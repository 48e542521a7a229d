package replication

import (
	"context"
	"errors"
	"fmt"
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
	held       *batch.Batch // a batch not yet handed over when ctx ended
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
	s := &Stream{cfg: cfg, log: log, conn: conn, dec: NewDecoder(cfg.Schema, cfg.Table, cfg.TimeZone)}

	if !slot.Exists {
		res, err := pglogrepl.CreateReplicationSlot(ctx, conn, cfg.Slot, "pgoutput",
			pglogrepl.CreateReplicationSlotOptions{Mode: pglogrepl.LogicalReplication, SnapshotAction: "EXPORT_SNAPSHOT"})
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
		log.Info("created replication slot", zap.String("consistent_point", res.ConsistentPoint))
	} else {
		s.startLSN = slot.ConfirmedFlush
	}
	s.tracker = checkpoint.NewTracker(s.startLSN)
	return s, nil
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
func (s *Stream) Run(ctx context.Context, rc RunConfig, out chan<- *batch.Batch, writerDone <-chan struct{}) (err error) {
	if rc.BatchSize <= 0 {
		rc.BatchSize = 1000
	}
	if rc.BatchTimeout <= 0 {
		rc.BatchTimeout = 100 * time.Millisecond
	}
	if rc.ShutdownTimeout <= 0 {
		rc.ShutdownTimeout = 30 * time.Second
	}
	closed := false
	closeOut := func() {
		if !closed {
			close(out)
			closed = true
		}
	}
	defer closeOut()

	pub := pgx.Identifier{s.cfg.Publication}.Sanitize()
	args := []string{"proto_version '1'", "publication_names '" + escapeLiteral(pub) + "'"}
	if err := pglogrepl.StartReplication(ctx, s.conn, s.cfg.Slot, pglogrepl.LSN(s.startLSN),
		pglogrepl.StartReplicationOptions{Mode: pglogrepl.LogicalReplication, PluginArgs: args}); err != nil {
		if fault.IsPostgres(err, pgerrcode.ObjectInUse) {
			return SlotInUseError(s.cfg.Slot, 0)
		}
		return fmt.Errorf("start replication on slot %q: %w", s.cfg.Slot, err)
	}
	s.log.Info("streaming", zap.String("from_lsn", pglogrepl.LSN(s.startLSN).String()),
		zap.String("publication", s.cfg.Publication))
	if rc.OnStreaming != nil {
		rc.OnStreaming()
	}

	builder := batch.NewBuilder(rc.BatchSize, rc.BatchMaxBytes, rc.BatchTimeout)
	var serverWALEnd uint64
	var msg Message
	s.lastStatus = time.Now()

	// emit hands a batch to the writer. While the writer is busy (backpressure) it
	// keeps sending status updates so the server does not time the connection out.
	// A batch that could not be handed over because ctx ended is kept in s.held for
	// the shutdown path, never dropped.
	emit := func(ctx context.Context, b *batch.Batch) error {
		if ctx.Err() != nil {
			s.held = b
			return ctx.Err()
		}
		tick := time.NewTicker(s.cfg.StatusInterval)
		defer tick.Stop()
		for {
			select {
			case out <- b:
				if rc.Observer != nil {
					rc.Observer.AddReceived(b.Len())
				}
				return nil
			case <-writerDone:
				return ErrWriterStopped
			case <-ctx.Done():
				s.held = b
				return ctx.Err()
			case <-tick.C:
				if err := s.sendStatus(serverWALEnd, false); err != nil {
					return err
				}
			}
		}
	}

	// The receive deadline (next status update or batch time bound) lives in a context
	// reused across messages: one per wake-up instead of one per message, which was a
	// quarter of the loop's CPU in profiles.
	var recv deadlineCtx
	defer recv.release()
	for {
		if ctx.Err() != nil {
			return s.shutdown(rc, builder, emit, closeOut, writerDone, serverWALEnd)
		}
		// A writer that failed while nothing was being handed to it must stop
		// the stream too, not leave it acknowledging keepalives with no one
		// delivering (the rows it held are replayed on the next start).
		select {
		case <-writerDone:
			return ErrWriterStopped
		default:
		}
		deadline := s.lastStatus.Add(s.cfg.StatusInterval)
		if d, ok := builder.Deadline(); ok && d.Before(deadline) {
			deadline = d
		}
		raw, err := s.conn.ReceiveMessage(recv.until(ctx, deadline))
		if err != nil {
			if ctx.Err() != nil && !s.conn.IsClosed() {
				continue // stopping: the loop's first check runs the shutdown path
			}
			if !pgconn.Timeout(err) {
				return fmt.Errorf("receive from slot %q: %w", s.cfg.Slot, err)
			}
		} else {
			switch m := raw.(type) {
			case *pgproto3.CopyData:
				if err := s.handleCopyData(ctx, m.Data, &msg, builder, emit, &serverWALEnd); err != nil {
					if ctx.Err() != nil {
						continue
					}
					return err
				}
			case *pgproto3.ErrorResponse:
				return fmt.Errorf("replication on slot %q: %w", s.cfg.Slot, pgconn.ErrorResponseToPgError(m))
			default:
				// Notices and parameter changes need no action.
			}
		}
		now := time.Now()
		if builder.Due(now) {
			if err := emit(ctx, builder.Take()); err != nil {
				if ctx.Err() != nil {
					continue // the shutdown path flushes the held batch
				}
				return err
			}
		}
		if now.Sub(s.lastStatus) >= s.cfg.StatusInterval {
			if err := s.sendStatus(serverWALEnd, false); err != nil {
				return err
			}
			if rc.Observer != nil {
				rc.Observer.SetAckedLSN(s.lastSent)
			}
		}
	}
}

func (s *Stream) handleCopyData(ctx context.Context, data []byte, msg *Message, builder *batch.Builder,
	emit func(context.Context, *batch.Batch) error, serverWALEnd *uint64) error {
	if len(data) == 0 {
		return fmt.Errorf("%w: empty CopyData", ErrMalformed)
	}
	switch data[0] {
	case pglogrepl.PrimaryKeepaliveMessageByteID:
		ka, err := pglogrepl.ParsePrimaryKeepaliveMessage(data[1:])
		if err != nil {
			return fmt.Errorf("%w: keepalive: %v", ErrMalformed, err)
		}
		if uint64(ka.ServerWALEnd) > *serverWALEnd {
			*serverWALEnd = uint64(ka.ServerWALEnd)
		}
		if ka.ReplyRequested {
			return s.sendStatus(*serverWALEnd, false)
		}
	case pglogrepl.XLogDataByteID:
		xld, err := pglogrepl.ParseXLogData(data[1:])
		if err != nil {
			return fmt.Errorf("%w: %v", ErrMalformed, err)
		}
		if err := s.dec.Decode(xld.WALData, msg); err != nil {
			return fmt.Errorf("decode message at %s: %w", xld.WALStart, err)
		}
		switch msg.Kind {
		case KindBegin:
			s.tracker.Begin()
		case KindInsert:
			seq := s.tracker.NextSeq()
			if builder.Add(seq, msg.Event, time.Now()) {
				return emit(ctx, builder.Take())
			}
		case KindCommit:
			s.tracker.Commit(msg.EndLSN)
		}
	}
	return nil
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

// shutdown flushes the open batch, lets the writer finish, and acknowledges what is
// durable. It runs under its own bounded context because ctx has already ended.
func (s *Stream) shutdown(rc RunConfig, builder *batch.Builder, emit func(context.Context, *batch.Batch) error,
	closeOut func(), writerDone <-chan struct{}, serverWALEnd uint64) error {
	sctx, cancel := context.WithTimeout(context.Background(), rc.ShutdownTimeout)
	defer cancel()
	pending := builder.Pending()
	for _, b := range []*batch.Batch{s.held, builder.Take()} {
		if b == nil {
			continue
		}
		s.held = nil
		if err := emit(sctx, b); err != nil {
			return fmt.Errorf("flush the last batch on shutdown: %w", err)
		}
	}
	closeOut()
	select {
	case <-writerDone:
	case <-sctx.Done():
		return fmt.Errorf("writer did not finish within %s on shutdown", rc.ShutdownTimeout)
	}
	if err := s.sendStatus(serverWALEnd, false); err != nil {
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

func escapeLiteral(s string) string {
	out := make([]byte, 0, len(s))
	for i := 0; i < len(s); i++ {
		if s[i] == '\'' {
			out = append(out, '\'')
		}
		out = append(out, s[i])
	}
	return string(out)
}

func parseLSN(s string) (uint64, error) {
	lsn, err := pglogrepl.ParseLSN(s)
	return uint64(lsn), err
}
