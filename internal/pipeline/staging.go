package pipeline

import (
	"context"
	"time"

	"go.uber.org/zap"

	"github.com/outbox-streamer/outbox-streamer/internal/batch"
	"github.com/outbox-streamer/outbox-streamer/internal/metrics"
	"github.com/outbox-streamer/outbox-streamer/internal/record"
	"github.com/outbox-streamer/outbox-streamer/sink"
)

// Stager keeps the rows of streamed transactions in ClickHouse until they
// commit (implemented by *sink.Client; see sink.StagingTable).
type Stager interface {
	StagingAvailable(ctx context.Context) (bool, error)
	ClearStaging(ctx context.Context, slot string) error
	Stage(ctx context.Context, s sink.Staged, subxids []uint32, events []record.Event) error
	StagedRows(ctx context.Context, s sink.Staged) (uint64, error)
	Promote(ctx context.Context, s sink.Staged, commitLSN uint64, rows int) error
	DropStaged(ctx context.Context, slot string, xid uint32) error
}

// stager is the writer's side of staged transactions: it alone holds their
// state. Staging only ever saves time: whenever a transaction's staged rows
// cannot be trusted (a row that could not be staged, a count that differs, a
// commit replayed after a crash), its rows take the ordinary path from the
// local spill after the commit, and what was staged is dropped.
//
// Only the writer's loop calls it (not safe for concurrent use).
type stager struct {
	to       Stager
	slot     string
	validate func(*record.Event) error // the sink's check of a row
	metrics  *metrics.Metrics
	log      *zap.Logger
	state    stagingState
	txns     map[uint32]*stagedTxn
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
	w.stager = &stager{to: to, slot: slot, validate: w.engine.Sink().Validate, metrics: w.cfg.Metrics, log: w.log,
		txns: make(map[uint32]*stagedTxn)}
}

// ClearStagedAtStart makes a writer that does not stage this session
// (protocol 1, or staging off) still drop at its start what earlier sessions
// of slot staged in to: like clearAtStart, for rows nobody would drop.
func (w *Writer) ClearStagedAtStart(to Stager, slot string) {
	w.stale = &stager{to: to, slot: slot, log: w.log}
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
func (st *stager) ready(ctx context.Context) bool {
	if st.state != stagingUnchecked {
		return st.state == stagingOn
	}
	st.state = stagingOff
	ok, err := st.to.StagingAvailable(ctx)
	switch {
	case err != nil:
		st.log.Warn("cannot check the staging table: large streamed transactions go to ClickHouse after their commit this session", zap.Error(err))
	case !ok:
		st.log.Info("no staging table (run `outbox-streamer migrate up`; not used on a cluster): large streamed transactions go to ClickHouse after their commit")
	default:
		if err := st.to.ClearStaging(ctx, st.slot); err != nil {
			st.log.Warn("cannot clear what an earlier session staged: staging is off this session", zap.Error(err))
		} else {
			st.state = stagingOn
		}
	}
	return st.state == stagingOn
}

// clearAtStart drops, when the session starts, what earlier sessions staged
// for this slot: a transaction that aborted between two sessions, or one the
// old primary was streaming when it died, may never be sent again, nor its
// Stream Abort, so waiting for the first streamed transaction would leave
// their rows behind. When ClickHouse cannot be asked now, the first streamed
// transaction asks again.
func (st *stager) clearAtStart(ctx context.Context) {
	if st == nil {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, stagingStartTimeout)
	defer cancel()
	ok, err := st.to.StagingAvailable(ctx)
	if err != nil {
		st.log.Debug("staging table not checked at start; checked at the first streamed transaction", zap.Error(err))
		return
	}
	if !ok {
		st.state = stagingOff
		st.log.Info("no staging table (run `outbox-streamer migrate up`; not used on a cluster): large streamed transactions go to ClickHouse after their commit")
		return
	}
	if err := st.to.ClearStaging(ctx, st.slot); err != nil {
		st.log.Debug("staging table not cleared at start; cleared at the first streamed transaction", zap.Error(err))
		return
	}
	st.state = stagingOn
}

// stagingStartTimeout bounds clearAtStart, which delays the writer's start.
const stagingStartTimeout = 10 * time.Second

// handle takes a batch of an in-progress (OpStage) or aborted (OpDrop)
// streamed transaction; without staging it has nothing to do.
func (st *stager) handle(ctx context.Context, b *batch.Batch) {
	if st == nil {
		return
	}
	switch b.Streamed.Op {
	case batch.OpStage:
		st.stage(ctx, b)
	case batch.OpDrop:
		st.drop(ctx, b.Streamed.Xid)
	}
}

// stage writes a staging batch. Any failure only marks the transaction
// broken: its rows go the ordinary way after the commit.
func (st *stager) stage(ctx context.Context, b *batch.Batch) {
	xid := b.Streamed.Xid
	t := st.txns[xid]
	if t == nil {
		t = &stagedTxn{}
		st.txns[xid] = t
	}
	if t.broken || !st.ready(ctx) {
		t.broken = true
		return
	}
	for i := range b.Events {
		ev := &b.Events[i]
		if err := st.validate(ev); err != nil || ev.CreatedAt.IsZero() {
			st.log.Info("a row of a streamed transaction cannot be staged; the transaction goes to ClickHouse after its commit",
				zap.Uint32("xid", xid), zap.Int64("event_id", ev.ID), zap.Error(err))
			t.broken = true
			return
		}
	}
	if err := st.to.Stage(ctx, sink.Staged{Slot: st.slot, Xid: xid}, b.Streamed.SubXids, b.Events); err != nil {
		st.metrics.AddError(metrics.StageInsert)
		st.log.Warn("staging a streamed transaction failed; it goes to ClickHouse after its commit", zap.Uint32("xid", xid), zap.Error(err))
		t.broken = true
		return
	}
	t.rows += b.Len()
}

// drop forgets an aborted transaction and drops what it staged.
func (st *stager) drop(ctx context.Context, xid uint32) {
	t := st.txns[xid]
	delete(st.txns, xid)
	if t == nil || st.state != stagingOn {
		return
	}
	if err := st.to.DropStaged(ctx, st.slot, xid); err != nil {
		st.log.Warn("dropping the staged rows of an aborted transaction failed; the next session drops them", zap.Uint32("xid", xid), zap.Error(err))
	}
}

// promoted is called with each batch of a committed streamed transaction
// (OpCommit) and reports whether its rows are in the event table already,
// copied from staging at the transaction's first batch. The in-flight record
// covering the commit is written already; a commit at or below inDoubtUntil
// is a replay. The caller calls settled once the batch is delivered.
func (st *stager) promoted(ctx context.Context, b *batch.Batch, inDoubtUntil uint64) bool {
	if st == nil {
		return false
	}
	t := st.txns[b.Streamed.Xid]
	if t == nil {
		return false
	}
	if !t.decided {
		t.promoted = st.promote(ctx, b, t, inDoubtUntil)
	}
	return t.promoted
}

// promote copies a staged transaction into the event table at its commit's
// first batch, and reports whether its rows are there now.
func (st *stager) promote(ctx context.Context, b *batch.Batch, t *stagedTxn, inDoubtUntil uint64) bool {
	t.decided = true
	xid, commitLSN := b.Streamed.Xid, b.MaxCommitLSN
	s := sink.Staged{Slot: st.slot, Xid: xid, Aborted: b.Streamed.Aborted}
	defer func() {
		if st.state != stagingOn {
			return // nothing staged this session
		}
		if err := st.to.DropStaged(ctx, st.slot, xid); err != nil {
			st.log.Warn("dropping the staged rows of a transaction failed; the next session drops them", zap.Uint32("xid", xid), zap.Error(err))
		}
	}()
	switch {
	case t.broken || st.state != stagingOn:
		return false
	case commitLSN <= inDoubtUntil:
		// Replayed after a crash: an earlier copy may have landed. The rows
		// are checked against ClickHouse the ordinary way.
		return false
	}
	n, err := st.to.StagedRows(ctx, s)
	if err != nil || n != uint64(b.Streamed.Rows) {
		st.log.Warn("staged rows do not match the committed transaction; it goes to ClickHouse the ordinary way",
			zap.Uint32("xid", xid), zap.Uint64("staged", n), zap.Int("committed", b.Streamed.Rows), zap.Error(err))
		return false
	}
	t0 := time.Now()
	if err := st.to.Promote(ctx, s, commitLSN, b.Streamed.Rows); err != nil {
		st.metrics.AddError(metrics.StageInsert)
		st.log.Warn("copying a staged transaction into the event table failed; its rows are checked and inserted the ordinary way",
			zap.Uint32("xid", xid), zap.Int("rows", b.Streamed.Rows), zap.Error(err))
		t.uncertain = true
		return false
	}
	took := time.Since(t0)
	st.metrics.ObserveBatch(b.Streamed.Rows, took)
	st.log.Info("streamed transaction copied from staging into the event table", zap.Uint32("xid", xid),
		zap.Int("rows", b.Streamed.Rows), zap.Int("staged_with_rolled_back", t.rows), zap.Duration("took", took))
	return true
}

// settled counts a committed transaction's batch as passed on, and forgets
// the transaction after its last.
func (st *stager) settled(b *batch.Batch) {
	if st == nil {
		return
	}
	xid := b.Streamed.Xid
	t := st.txns[xid]
	if t == nil {
		return
	}
	t.settled += b.Len()
	if t.settled >= b.Streamed.Rows {
		delete(st.txns, xid)
	}
}

// uncertain reports whether xid's copy had an unknown outcome.
func (st *stager) uncertain(xid uint32) bool {
	if st == nil || len(st.txns) == 0 {
		return false
	}
	t := st.txns[xid]
	return t != nil && t.uncertain
}
