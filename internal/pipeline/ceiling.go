package pipeline

import (
	"context"
	"time"

	"github.com/jackc/pglogrepl"
	"go.uber.org/zap"
)

// recordCoversReplay reports whether the in-flight record inflight may cover
// rows a session resuming at start replays. At or past start: the slot
// confirms commit end positions and the record holds commit start positions,
// and the next transaction's commit can start exactly where the last
// confirmed one ended; PostgreSQL sends that transaction again.
func recordCoversReplay(inflight, start uint64) bool {
	return inflight != 0 && inflight >= start
}

// Ceiling tells the highest commit LSN the event table received lately
// (implemented by *sink.Client).
type Ceiling interface {
	DeliveredCeiling(ctx context.Context, window time.Duration) (uint64, error)
}

// ceiling widens the in-doubt window of a new session to what ClickHouse
// holds. The in-flight record lives in PostgreSQL and reaches a standby
// asynchronously: after a failover the new primary may have an older record
// (and a slot synced a moment before the old one confirmed more) than the
// batches ClickHouse already took, and the replay of those would be inserted
// again without a look-up.
type ceiling struct {
	from    Ceiling
	record  uint64 // the in-flight record read at start
	known   bool
	nextTry time.Time // while unknown: not asked again before, so that an unreachable ClickHouse does not slow every batch
}

// ceilingWindow is how far back inserts count: a replay re-sends what the
// old primary's slot had not confirmed, delivered minutes before at most.
const ceilingWindow = 24 * time.Hour

// ceilingTimeout bounds one attempt, which delays the writer; ceilingRetry
// spaces the attempts while ClickHouse does not answer.
const (
	ceilingTimeout = 10 * time.Second
	ceilingRetry   = 30 * time.Second
)

// EnableCeiling makes the writer bound the replay by what from holds, not
// only by the in-flight record read at start (record). Until from answers,
// every row is looked up.
func (w *Writer) EnableCeiling(from Ceiling, record uint64) {
	w.ceiling = &ceiling{from: from, record: record}
}

// raiseInDoubt asks ClickHouse, until it answers once, for the highest
// commit LSN it holds, and widens InDoubtUntil to it.
func (w *Writer) raiseInDoubt(ctx context.Context) {
	c := w.ceiling
	if c == nil || c.known || time.Now().Before(c.nextTry) {
		return
	}
	c.nextTry = time.Now().Add(ceilingRetry)
	ctx, cancel := context.WithTimeout(ctx, ceilingTimeout)
	defer cancel()
	lsn, err := c.from.DeliveredCeiling(ctx, ceilingWindow)
	if err != nil {
		w.log.Debug("cannot read the highest commit LSN in ClickHouse yet: rows are looked up before they are inserted", zap.Error(err))
		return
	}
	c.known = true
	if lsn > c.record {
		// After a clean stop the record covers every insert: only a lost or
		// stale record (a failover) leaves ClickHouse ahead of it.
		w.log.Info("ClickHouse holds rows past the in-flight record (a failover, or a record that was lost): replayed rows up to it are looked up before they are inserted",
			zap.String("inflight_lsn", pglogrepl.LSN(c.record).String()),
			zap.String("clickhouse_lsn", pglogrepl.LSN(lsn).String()))
	}
	// Raising the window never costs a clean restart anything: a replay
	// starts past every commit the last session delivered.
	w.cfg.InDoubtUntil = max(w.cfg.InDoubtUntil, lsn)
}
