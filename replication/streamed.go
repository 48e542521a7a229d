package replication

import (
	"context"
	"fmt"

	"github.com/outbox-streamer/outbox-streamer/internal/batch"
	"github.com/outbox-streamer/outbox-streamer/internal/record"
)

// streamedTxns owns the receiver's transactions streamed before their commit
// (protocol 2): their rows in the local spill until the commit or the abort,
// the staging batch of the transaction the current chunk carries
// (RunConfig.Stage), and the tag of the staged transaction being replayed.
// The receive loop passes itself to the methods that hand batches over;
// nothing else reads its fields. Valid for one session (one Run); nil on a
// session without streaming. Only Run's goroutine uses it.
type streamedTxns struct {
	spill     *spill
	stage     bool // RunConfig.Stage
	stageRows int  // RunConfig.StageRows
	maxBytes  int  // RunConfig.BatchMaxBytes; 0: no byte bound

	// Rows of transaction xid received since the last staging batch, with
	// their subtransactions.
	rows  []record.Event
	subs  []uint32
	xid   uint32
	bytes int
	// replaying marks the batches of the staged transaction being replayed.
	replaying *batch.Streamed
}

// openStreamed empties and opens the session's spill (Config.SpillDir).
func openStreamed(cfg Config, rc RunConfig) (*streamedTxns, error) {
	sp, err := openSpill(cfg.SpillDir, cfg.SpillMaxBytes)
	if err != nil {
		return nil, err
	}
	return &streamedTxns{spill: sp, stage: rc.Stage, stageRows: rc.StageRows, maxBytes: rc.BatchMaxBytes}, nil
}

// close drops what the spill holds, and its directory.
func (t *streamedTxns) close() {
	if t != nil {
		_ = t.spill.Close()
	}
}

// insert keeps a row of an in-progress transaction until the transaction
// commits or aborts and, with staging, adds it to the staging batch of its
// transaction, handing the batch over when it is full. A chunk of the stream
// carries one transaction, and the batch is handed over at its end (endChunk).
func (t *streamedTxns) insert(ctx context.Context, r *receiver, m *Message) error {
	if t == nil {
		return fmt.Errorf("%w: a streamed insert on a session without streaming", ErrMalformed)
	}
	if err := t.spill.Append(m.Xid, m.SubXid, &m.Event); err != nil {
		return err
	}
	if !t.stage {
		return nil
	}
	if len(t.rows) > 0 && t.xid != m.Xid {
		if err := t.endChunk(ctx, r); err != nil {
			return err
		}
	}
	t.xid = m.Xid
	t.rows = append(t.rows, m.Event)
	t.subs = append(t.subs, m.SubXid)
	t.bytes += m.Event.Size()
	if len(t.rows) >= t.stageRows || (t.maxBytes > 0 && t.bytes >= t.maxBytes) {
		return t.endChunk(ctx, r)
	}
	return nil
}

// endChunk hands the staging batch over, if there is one.
func (t *streamedTxns) endChunk(ctx context.Context, r *receiver) error {
	if t == nil || len(t.rows) == 0 {
		return nil
	}
	b := &batch.Batch{Events: t.rows, Bytes: t.bytes,
		Streamed: &batch.Streamed{Op: batch.OpStage, Xid: t.xid, SubXids: t.subs}}
	t.rows, t.subs, t.bytes = nil, nil, 0
	return r.emit(ctx, b)
}

// abort forgets a rolled-back transaction or subtransaction; what was staged
// of an aborted transaction is dropped by the writer.
func (t *streamedTxns) abort(ctx context.Context, r *receiver, m *Message) error {
	if t == nil {
		return nil
	}
	known := t.spill.Holds(m.Xid)
	t.spill.Abort(m.Xid, m.SubXid)
	if !t.stage || !known || m.SubXid != m.Xid {
		return nil // a subtransaction's rows stay staged and are left out at the commit
	}
	if err := t.endChunk(ctx, r); err != nil {
		return err
	}
	return r.emit(ctx, &batch.Batch{Streamed: &batch.Streamed{Op: batch.OpDrop, Xid: m.Xid}})
}

// commit delivers a committed transaction: its spilled rows, minus
// rolled-back subtransactions, become one transaction for the tracker, as if
// protocol 1 had sent it at its commit. Acknowledgement cannot pass it: its
// commit mark follows its last row. With staging, its batches are cut apart
// from other rows' and say which transaction they are (tag), for the writer
// to copy the staged rows instead.
func (t *streamedTxns) commit(ctx context.Context, r *receiver, m *Message) error {
	if t == nil {
		return nil
	}
	commitLSN, endLSN, commitTime, xid := m.CommitLSN, m.EndLSN, m.CommitTime, m.Xid
	var tag *batch.Streamed
	if t.stage && t.spill.Holds(xid) {
		if err := t.endChunk(ctx, r); err != nil {
			return err
		}
		if err := r.flushOpen(ctx); err != nil {
			return err
		}
		rows, aborted := t.spill.Committed(xid)
		tag = &batch.Streamed{Op: batch.OpCommit, Xid: xid, Rows: rows, Aborted: aborted}
		t.replaying = tag
		defer func() { t.replaying = nil }()
	}
	// The commit is known before its rows are replayed.
	r.committed, r.committedEnd = commitLSN, endLSN
	r.s.tracker.Begin()
	err := t.spill.Replay(xid, func(ev *record.Event) error {
		ev.CommitLSN, ev.CommitTime, ev.Xid = commitLSN, commitTime, xid
		if ev.CreatedAt.IsZero() { // no created_at column: as protocol 1 does
			ev.CreatedAt = commitTime
		}
		return r.add(ctx, ev)
	})
	if err != nil {
		return err
	}
	r.s.tracker.Commit(endLSN)
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

// tag marks b, unless it says what it is already, as a batch of the staged
// transaction being replayed, if one is.
func (t *streamedTxns) tag(b *batch.Batch) {
	if t != nil && t.replaying != nil && b.Streamed == nil {
		b.Streamed = t.replaying
	}
}
