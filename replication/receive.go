package replication

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"go.uber.org/zap"

	"github.com/outbox-streamer/outbox-streamer/internal/batch"
	"github.com/outbox-streamer/outbox-streamer/internal/record"
)

// ErrWriterStopped is returned when the batch consumer exited while the stream still
// had a batch to hand over.
var ErrWriterStopped = errors.New("batch writer stopped")

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

	if s.streaming {
		txns, err := openStreamed(s.cfg, rc)
		if err != nil {
			return err
		}
		r.txns = txns
		defer txns.close()
	}
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

	// txns holds the transactions streamed before their commit (protocol 2);
	// nil without streaming.
	txns *streamedTxns
	// committed and committedEnd are the start and end of the last commit
	// record received: a batch whose rows committed at or below committed
	// is covered by committedEnd (batch.Batch.CommitEnd).
	committed, committedEnd uint64
}

// receive runs the loop until ctx ends (it then returns ctx's error or the error
// of what ctx interrupted) or something fails.
//
// The receive deadline (next status update or batch time bound) is the
// connection's read deadline, and ctx's end moves it to now: a context per
// receive made pgconn watch it per message (a registration with ctx and
// about 270 bytes of garbage per row).
func (r *receiver) receive(ctx context.Context) error {
	conn := r.s.conn.Conn()
	stop := context.AfterFunc(ctx, func() { _ = conn.SetReadDeadline(time.Now()) })
	defer func() {
		stop()
		// The shutdown path and later statements read without a deadline.
		_ = conn.SetReadDeadline(time.Time{})
	}()
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
	if err := s.conn.Conn().SetReadDeadline(deadline); err != nil {
		return fmt.Errorf("set receive deadline on slot %q: %w", s.cfg.Slot, err)
	}
	// ctx may have ended after receive checked it and before the deadline was
	// set, which then replaced the one ctx's end set: look again.
	if err := ctx.Err(); err != nil {
		return err
	}
	raw, err := s.conn.ReceiveMessage(context.Background())
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
				return r.txns.insert(ctx, r, &r.msg)
			}
			return r.add(ctx, &r.msg.Event)
		case KindCommit:
			r.committed, r.committedEnd = r.msg.CommitLSN, r.msg.EndLSN
			s.tracker.Commit(r.msg.EndLSN)
		case KindStreamStop:
			return r.txns.endChunk(ctx, r)
		case KindStreamAbort:
			return r.txns.abort(ctx, r, &r.msg)
		case KindStreamCommit:
			return r.txns.commit(ctx, r, &r.msg)
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
// ends first. During the replay of a staged transaction its batches carry its tag.
func (r *receiver) emit(ctx context.Context, b *batch.Batch) error {
	r.txns.tag(b)
	if b.Tracked() && b.CommitEnd == 0 && b.MaxCommitLSN != 0 && b.MaxCommitLSN <= r.committed {
		b.CommitEnd = r.committedEnd
	}
	r.waiting = b
	if err := ctx.Err(); err != nil {
		return err
	}
	// Read before the send: the writer owns b after it, merges into it and
	// hands its events to later batches.
	rows, tracked := b.Len(), b.Tracked()
	tick := time.NewTicker(r.s.cfg.StatusInterval)
	defer tick.Stop()
	for {
		select {
		case r.out <- b:
			r.waiting = nil
			if r.rc.Observer != nil && tracked {
				r.rc.Observer.AddReceived(rows)
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
