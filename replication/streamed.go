package replication

import (
	"context"
	"fmt"

	"github.com/outbox-streamer/outbox-streamer/internal/batch"
	"github.com/outbox-streamer/outbox-streamer/internal/record"
)

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
