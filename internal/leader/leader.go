// Package leader makes one outbox-streamer the leader of a slot: it holds a
// PostgreSQL advisory lock on a dedicated session for as long as it streams. Other
// instances wait as hot standbys and take over when the leader's session ends.
package leader

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/zap"
)

// Config tunes the election.
type Config struct {
	// DSN is the PostgreSQL connection string.
	DSN string
	// Slot names the lock: one leader per replication slot.
	Slot string
	// PollInterval is how often a standby tries the lock and a leader checks its
	// session (default 1 s). Takeover happens within about this long after the
	// leader's session ends.
	PollInterval time.Duration
}

// Lock is a held leadership.
type Lock struct {
	conn *pgx.Conn
	lost chan struct{}
	stop chan struct{}
	done chan struct{}
	log  *zap.Logger
}

// lockKey derives the advisory lock key from the slot on the server, so every
// instance computes the same one.
const lockKey = "hashtext('outbox-streamer:' || $1)"

// HolderQuery returns the application_name of the session holding the lock of slot
// $1 (no row when nobody leads). An advisory lock on a bigint key shows in pg_locks
// as classid (high half) and objid (low half).
const HolderQuery = `SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
	WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
	  AND ((l.classid::bigint << 32) | l.objid::bigint) = ` + lockKey + `::bigint`

// Acquire waits until this process holds the slot's leader lock or ctx ends. While
// another instance leads it logs that it waits as a standby.
func Acquire(ctx context.Context, cfg Config, log *zap.Logger, onStandby func()) (*Lock, error) {
	if cfg.PollInterval <= 0 {
		cfg.PollInterval = time.Second
	}
	log = log.Named("leader").With(zap.String("slot", cfg.Slot))
	pcfg, err := pgx.ParseConfig(cfg.DSN)
	if err != nil {
		return nil, fmt.Errorf("DATABASE_URL: %w", err)
	}
	// The session's name tells operators (and `outbox-streamer status`) who leads.
	host, _ := os.Hostname()
	pcfg.RuntimeParams["application_name"] = fmt.Sprintf("outbox-streamer leader %s pid %d", host, os.Getpid())
	conn, err := pgx.ConnectConfig(ctx, pcfg)
	if err != nil {
		return nil, fmt.Errorf("connect for the leader lock: %w", err)
	}
	waitingSince := time.Time{}
	for {
		var got bool
		if err := conn.QueryRow(ctx, "SELECT pg_try_advisory_lock("+lockKey+")", cfg.Slot).Scan(&got); err != nil {
			conn.Close(context.Background())
			return nil, fmt.Errorf("try the leader lock of slot %q: %w", cfg.Slot, err)
		}
		if got {
			if !waitingSince.IsZero() {
				log.Info("took over as leader", zap.Duration("waited", time.Since(waitingSince).Round(time.Millisecond)))
			} else {
				log.Info("leading")
			}
			l := &Lock{conn: conn, lost: make(chan struct{}), stop: make(chan struct{}), done: make(chan struct{}), log: log}
			go l.watch(cfg.PollInterval)
			return l, nil
		}
		if waitingSince.IsZero() {
			waitingSince = time.Now()
			log.Info("another instance leads this slot; waiting as hot standby")
			if onStandby != nil {
				onStandby()
			}
		}
		select {
		case <-ctx.Done():
			conn.Close(context.Background())
			return nil, ctx.Err()
		case <-time.After(cfg.PollInterval):
		}
	}
}

// watch pings the lock's session: when it fails, the server has released (or will
// release) the lock and another instance may lead, so this one must stop at once.
func (l *Lock) watch(every time.Duration) {
	defer close(l.done)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-l.stop:
			return
		case <-t.C:
			ctx, cancel := context.WithTimeout(context.Background(), every*3)
			err := l.conn.Ping(ctx)
			cancel()
			if err != nil {
				l.log.Error("lost the leader lock's session; stopping streaming", zap.Error(err))
				close(l.lost)
				return
			}
		}
	}
}

// Lost is closed when the lock's session failed.
func (l *Lock) Lost() <-chan struct{} { return l.lost }

// Release gives up leadership.
func (l *Lock) Release() {
	close(l.stop)
	<-l.done
	// Closing the session releases the advisory lock.
	l.conn.Close(context.Background())
}
