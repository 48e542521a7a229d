package service

import (
	"errors"

	"github.com/jackc/pgerrcode"

	"github.com/outbox-streamer/outbox-streamer/internal/fault"
	"github.com/outbox-streamer/outbox-streamer/replication"
)

// errLeaderLost is the cause of a stream abandoned because the leader lock's
// session failed: another instance may lead now, so this one stops at once and
// competes for the lock again.
var errLeaderLost = errors.New("lost the leader lock's session")

// transient reports whether err may pass by itself (a restart, a dropped
// connection, a busy slot), as opposed to a configuration or data problem.
func transient(err error) bool {
	if errors.Is(err, errLeaderLost) || errors.Is(err, replication.ErrWriterStopped) || errors.Is(err, replication.ErrSpillFull) || slotBusy(err) {
		return true
	}
	if errors.Is(err, replication.ErrMalformed) {
		return false
	}
	var pre *replication.PreconditionError
	if errors.As(err, &pre) {
		return false
	}
	return fault.Retryable(err)
}

// slotBusy reports the slot being used by another connection: after a takeover the
// old leader's walsender may hold it for a moment longer.
func slotBusy(err error) bool {
	var pre *replication.PreconditionError
	if errors.As(err, &pre) && pre.SlotInUse {
		return true
	}
	return fault.IsPostgres(err, pgerrcode.ObjectInUse)
}
