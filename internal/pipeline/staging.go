package pipeline

import (
	"context"
	"time"

	"go.uber.org/zap"

	"github.com/outbox-streamer/outbox-streamer/internal/batch"
	"github.com/outbox-streamer/outbox-streamer/internal/metrics"
	"github.com/outbox-streamer/outbox-streamer/internal/outboxstore"
	"github.com/outbox-streamer/outbox-streamer/internal/record"
	"github.com/outbox-streamer/outbox-streamer/sink"
)

// Stager keeps the rows of streamed transactions in ClickHouse until they
// commit (implemented by *sink.Writer; see sink.StagingTable).
type Stager interface {
	StagingAvailable(ctx context.Context) (bool, error)
	ClearStaging(ctx context.Context, slot string) error
	Stage(ctx context.Context, s sink.Staged, subxids []uint32, events []record.Event) error
	StagedRows(ctx context.Context, s sink.Staged) (uint64, error)
	Promote(ctx context.Context, s sink.Staged, commitLSN uint64, rows int) error
	DropStaged(ctx context.Context, slot string, xid uint32) error
}

// staging is the writer's side of staged transactions. Staging only ever
// saves time: whenever a transaction's staged rows cannot be trusted (a row
// that could not be staged, a count that differs, a commit replayed after a
// crash), its rows take the ordinary path from the local spill after the
// commit, and what was staged is dropped.
type staging struct {
	to    Stager
	slot  string
	state stagingState
	txns  map[uint32]*stagedTxn
}

type stagingState uint8

const (
	stagingUnchecked stagingState = iota
	stagingOn
	stagingOff // for this session: no table, or it could not be cleared
)

// stagedTxn is one transaction's staging.
type stagedTxn struct {
	rows     int  // staged, including rolled-back subtransactions'
	broken   bool // a batch was not staged: the staging is incomplete
	decided  bool // the commit's first batch came: promoted or not
	promoted bool // its rows are in the event table
	// uncertain: the copy failed with an unknown outcome, so its rows
	// may be in the event table and are looked up before they are inserted.
	uncertain bool
	settled   int // committed rows passed on since the commit
}

// EnableStaging makes the writer stage streamed transactions through to, as
// slot's (the replication stream must send them: RunConfig.Stage).
func (w *Writer) EnableStaging(to Stager, slot string) {
	w.staging = &staging{to: to, slot: slot, txns: make(map[uint32]*stagedTxn)}
}

// ClearStagedAtStart makes a writer that does not stage this session
// (protocol 1, or staging off) still drop at its start what earlier sessions
// of slot staged in to: like clearAtStart, for rows nobody would drop.
func (w *Writer) ClearStagedAtStart(to Stager, slot string) {
	w.stale = &staging{to: to, slot: slot}
}

// clearStale drops what earlier sessions staged, for a session that does
// not stage; a failure leaves it to the next session.
func (w *Writer) clearStale(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, stagingStartTimeout)
	defer cancel()
	ok, err := w.stale.to.StagingAvailable(ctx)
	if err == nil && ok {
		err = w.stale.to.ClearStaging(ctx, w.stale.slot)
	}
	if err != nil {
		w.log.Warn("cannot clear what an earlier session staged; the next session tries again", zap.Error(err))
	}
}

// ready checks, once per session, that the staging table exists and holds
// nothing of this slot: the server sends unfinished transactions again from
// their start, under the same ids.
func (st *staging) ready(ctx context.Context, log *zap.Logger) bool {
	if st.state != stagingUnchecked {
		return st.state == stagingOn
	}
	st.state = stagingOff
	ok, err := st.to.StagingAvailable(ctx)
	switch {
	case err != nil:
		log.Warn("cannot check the staging table: large streamed transactions go to ClickHouse after their commit this session", zap.Error(err))
	case !ok:
		log.Info("no staging table (run `outbox-streamer migrate up`; not used on a cluster): large streamed transactions go to ClickHouse after their commit")
	default:
		if err := st.to.ClearStaging(ctx, st.slot); err != nil {
			log.Warn("cannot clear what an earlier session staged: staging is off this session", zap.Error(err))
		} else {
			st.state = stagingOn
		}
	}
	return st.state == stagingOn
}

// clearAtStart drops, when the session starts, what earlier sessions staged
// for this slot: after a failover the new primary resumes past transactions
// the old one was streaming and never sends them again, so waiting for the
// first streamed transaction would leave their rows behind. When ClickHouse
// cannot be asked now, the first streamed transaction asks again.
func (st *staging) clearAtStart(ctx context.Context, log *zap.Logger) {
	ctx, cancel := context.WithTimeout(ctx, stagingStartTimeout)
	defer cancel()
	ok, err := st.to.StagingAvailable(ctx)
	if err != nil {
		log.Debug("staging table not checked at start; checked at the first streamed transaction", zap.Error(err))
		return
	}
	if !ok {
		st.state = stagingOff
		log.Info("no staging table (run `outbox-streamer migrate up`; not used on a cluster): large streamed transactions go to ClickHouse after their commit")
		return
	}
	if err := st.to.ClearStaging(ctx, st.slot); err != nil {
		log.Debug("staging table not cleared at start; cleared at the first streamed transaction", zap.Error(err))
		return
	}
	st.state = stagingOn
}

// stagingStartTimeout bounds clearAtStart, which delays the writer's start.
const stagingStartTimeout = 10 * time.Second

// stage writes a staging batch. Any failure only marks the transaction
// broken: its rows go the ordinary way after the commit.
func (w *Writer) stage(ctx context.Context, b *batch.Batch) {
	st := w.staging
	xid := b.Streamed.Xid
	t := st.txns[xid]
	if t == nil {
		t = &stagedTxn{}
		st.txns[xid] = t
	}
	if t.broken || !st.ready(ctx, w.log) {
		t.broken = true
		return
	}
	s := w.engine.Sink()
	for i := range b.Events {
		ev := &b.Events[i]
		if err := s.Validate(ev); err != nil || ev.CreatedAt.IsZero() {
			w.log.Info("a row of a streamed transaction cannot be staged; the transaction goes to ClickHouse after its commit",
				zap.Uint32("xid", xid), zap.Int64("event_id", ev.ID), zap.Error(err))
			t.broken = true
			return
		}
	}
	if err := st.to.Stage(ctx, sink.Staged{Slot: st.slot, Xid: xid}, b.Streamed.SubXids, b.Events); err != nil {
		w.cfg.Metrics.AddError(metrics.StageInsert)
		w.log.Warn("staging a streamed transaction failed; it goes to ClickHouse after its commit", zap.Uint32("xid", xid), zap.Error(err))
		t.broken = true
		return
	}
	t.rows += b.Len()
}

// dropStaged forgets an aborted transaction and drops what it staged.
func (w *Writer) dropStaged(ctx context.Context, xid uint32) {
	st := w.staging
	t := st.txns[xid]
	delete(st.txns, xid)
	if t == nil || st.state != stagingOn {
		return
	}
	if err := st.to.DropStaged(ctx, st.slot, xid); err != nil {
		w.log.Warn("dropping the staged rows of an aborted transaction failed; the next session drops them", zap.Uint32("xid", xid), zap.Error(err))
	}
}

// promote is called with the first batch of a staged transaction after its
// commit; it reports whether the transaction's rows are now in the event
// table. The in-flight record covering the commit is written already.
func (w *Writer) promote(ctx context.Context, b *batch.Batch, t *stagedTxn) bool {
	st := w.staging
	t.decided = true
	xid, commitLSN := b.Streamed.Xid, b.MaxCommitLSN
	s := sink.Staged{Slot: st.slot, Xid: xid, Aborted: b.Streamed.Aborted}
	defer func() {
		if st.state != stagingOn {
			return // nothing staged this session
		}
		if err := st.to.DropStaged(ctx, st.slot, xid); err != nil {
			w.log.Warn("dropping the staged rows of a transaction failed; the next session drops them", zap.Uint32("xid", xid), zap.Error(err))
		}
	}()
	switch {
	case t.broken || st.state != stagingOn:
		return false
	case commitLSN <= w.cfg.InDoubtUntil:
		// Replayed after a crash: an earlier copy may have landed. The rows
		// are checked against ClickHouse the ordinary way.
		return false
	}
	n, err := st.to.StagedRows(ctx, s)
	if err != nil || n != uint64(b.Streamed.Rows) {
		w.log.Warn("staged rows do not match the committed transaction; it goes to ClickHouse the ordinary way",
			zap.Uint32("xid", xid), zap.Uint64("staged", n), zap.Int("committed", b.Streamed.Rows), zap.Error(err))
		return false
	}
	t0 := time.Now()
	if err := st.to.Promote(ctx, s, commitLSN, b.Streamed.Rows); err != nil {
		w.cfg.Metrics.AddError(metrics.StageInsert)
		w.log.Warn("copying a staged transaction into the event table failed; its rows are checked and inserted the ordinary way",
			zap.Uint32("xid", xid), zap.Int("rows", b.Streamed.Rows), zap.Error(err))
		t.uncertain = true
		return false
	}
	took := time.Since(t0)
	w.cfg.Metrics.ObserveBatch(b.Streamed.Rows, took)
	w.log.Info("streamed transaction copied from staging into the event table", zap.Uint32("xid", xid),
		zap.Int("rows", b.Streamed.Rows), zap.Int("staged_with_rolled_back", t.rows), zap.Duration("took", took))
	return true
}

// stagedOutcome is the outcome of a promoted transaction's batch: every row
// is in ClickHouse.
func (w *Writer) stagedOutcome(o *outcome, b *batch.Batch) {
	o.processed = make([]outboxstore.Ref, len(b.Events))
	for i := range b.Events {
		o.processed[i] = outboxstore.Ref{ID: b.Events[i].ID, Xid: b.Events[i].Xid}
	}
	o.inserted = len(b.Events)
	w.cfg.Metrics.ObserveDelivered(time.Now(), b.Events)
}

// settledStaged counts a staged transaction's batch as passed on, and
// forgets the transaction after its last.
func (w *Writer) settledStaged(b *batch.Batch) {
	xid := b.Streamed.Xid
	t := w.staging.txns[xid]
	if t == nil {
		return
	}
	t.settled += b.Len()
	if t.settled >= b.Streamed.Rows {
		delete(w.staging.txns, xid)
	}
}

// uncertainStaged reports whether xid's copy had an unknown outcome.
func (w *Writer) uncertainStaged(xid uint32) bool {
	if w.staging == nil || len(w.staging.txns) == 0 {
		return false
	}
	t := w.staging.txns[xid]
	return t != nil && t.uncertain
}
