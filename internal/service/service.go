// Package service runs outbox-streamer as a long-lived service around the
// streaming pipeline. It owns leadership of the slot (the leader lock, waiting as a
// standby), the restart policy (which failures are retried with capped backoff and
// which end the process) and the mapping of the process's settings onto the
// pipeline's. Flags, environment, logging and the operator endpoints stay in cmd/;
// they observe the supervisor through Hooks.
package service

import (
	"context"
	"errors"
	"time"

	"go.uber.org/zap"

	"github.com/outbox-streamer/outbox-streamer/internal/config"
	"github.com/outbox-streamer/outbox-streamer/internal/leader"
	"github.com/outbox-streamer/outbox-streamer/internal/metrics"
	"github.com/outbox-streamer/outbox-streamer/internal/pipeline"
	"github.com/outbox-streamer/outbox-streamer/internal/retry"
	"github.com/outbox-streamer/outbox-streamer/replication"
)

// State is what the supervisor is doing, for readiness reporting.
type State int

const (
	// Standby: another instance leads the slot; this one waits for the lock.
	Standby State = iota + 1
	// Streaming: this instance leads and the server accepted START_REPLICATION.
	Streaming
	// Retrying: the pipeline stopped with an error; the supervisor waits before
	// restarting it, or is about to return the error.
	Retrying
)

// Hooks is how the supervisor reports to the caller's observability.
type Hooks struct {
	// OnState, when set, is told each state the supervisor enters. It is called
	// from the goroutine running Run.
	OnState func(State)
	// Metrics records leadership, liveness and errors by stage, and is handed to
	// the pipeline (nil: none).
	Metrics *metrics.Metrics
}

// Run leads the slot, or waits as a standby until it can, and keeps the pipeline
// running: after a transient failure — PostgreSQL restarted, a connection dropped,
// the lock's session lost — it waits with capped backoff and resumes from the
// acknowledged position. Configuration problems are returned. Before the first
// successful start any failure is final, so a wrong setting is reported instead of
// retried forever; the one exception is a slot busy for less than
// cfg.SlotBusyTimeout (a previous leader's walsender letting go).
//
// When drain ends Run stops reading, lets the pipeline flush the open batch and
// returns nil. When abandon ends the pipeline stops without draining; abandon ending
// also ends drain.
func Run(drain, abandon context.Context, cfg *config.Config, log *zap.Logger, hooks Hooks) error {
	s := &supervisor{
		cfg:    cfg,
		log:    log,
		hooks:  hooks,
		policy: retry.Policy{Initial: 500 * time.Millisecond, Max: cfg.RetryMaxWait},
		acquire: func(ctx context.Context, onStandby func()) (lease, error) {
			lock, err := leader.Acquire(ctx, leader.Config{DSN: cfg.PostgresDSN, Slot: cfg.Slot}, log, onStandby)
			if err != nil {
				return nil, err // not a typed nil *leader.Lock in a non-nil lease
			}
			return lock, nil
		},
		stream: pipeline.Stream,
	}
	return s.run(drain, abandon)
}

// lease is a held leader lock (*leader.Lock); tests fake it.
type lease interface {
	Lost() <-chan struct{}
	Release()
}

type supervisor struct {
	cfg    *config.Config
	log    *zap.Logger
	hooks  Hooks
	policy retry.Policy
	// acquire and stream are leader.Acquire and pipeline.Stream, replaceable so
	// the restart rules can be tested without servers.
	acquire func(ctx context.Context, onStandby func()) (lease, error)
	stream  func(drain, abandon context.Context, cfg pipeline.Config, log *zap.Logger) error
	// protocol1 is set once the spill of in-progress transactions overflowed:
	// the process goes on with protocol 1, where the server holds such a
	// transaction until its commit, instead of failing on it again.
	protocol1 bool
}

func (s *supervisor) setState(st State) {
	if s.hooks.OnState != nil {
		s.hooks.OnState(st)
	}
}

func (s *supervisor) run(drain, abandon context.Context) error {
	// Abandoning implies stopping: with drain ending whenever abandon does, the
	// loop below watches drain alone.
	drain, cancel := context.WithCancel(drain)
	defer cancel()
	defer context.AfterFunc(abandon, cancel)()
	// The AfterFunc cancels drain on its own goroutine, a moment after
	// abandon ends: ask both, so that a stream that saw abandon end is never
	// taken for a failure.
	stopped := func() bool { return drain.Err() != nil || abandon.Err() != nil }

	m := s.hooks.Metrics
	streamed := false
	var busySince time.Time
	for attempt := 1; ; attempt++ {
		lock, err := s.acquire(drain, func() {
			m.SetLeader(false)
			s.setState(Standby)
		})
		if err != nil {
			if stopped() {
				return nil
			}
			m.AddError(metrics.StageLeader)
			if !streamed {
				return err
			}
		} else {
			m.SetLeader(true)
			// onStreaming runs on this goroutine (the pipeline calls it from
			// Stream's own), so it may reset the loop's variables.
			err = s.streamAsLeader(drain, abandon, lock, func() {
				streamed, attempt = true, 0
				s.setState(Streaming)
				m.SetUp(true)
			})
			lock.Release()
			m.SetLeader(false)
			if err == nil {
				return nil
			}
			if stopped() {
				// Stopped by the caller. A failure that is only the cancellation
				// (a signal during start-up) is an orderly stop.
				if errors.Is(err, context.Canceled) {
					return nil
				}
				return err
			}
		}
		s.setState(Retrying)
		m.SetUp(false)
		m.AddError(metrics.StageReplication)
		if errors.Is(err, replication.ErrSpillFull) && !s.protocol1 {
			s.protocol1 = true
			s.log.Warn("the spill of in-progress transactions is full (STREAM_SPILL_MAX_BYTES); going on with protocol 1 until the process restarts: PostgreSQL keeps such transactions until they commit", zap.Error(err))
		}
		if !transient(err) || (!streamed && !slotBusy(err)) {
			return err
		}
		if slotBusy(err) && !streamed {
			// A new leader may find the old leader's walsender still holding the slot
			// for a moment; a slot held for long is someone else's: say so.
			if busySince.IsZero() {
				busySince = time.Now()
			} else if time.Since(busySince) > s.cfg.SlotBusyTimeout {
				return err
			}
		}
		wait := s.policy.Delay(attempt)
		s.log.Warn("streaming interrupted; resuming from the acknowledged position", zap.Error(err), zap.Duration("retry_in", wait))
		t := time.NewTimer(wait)
		select {
		case <-drain.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
	}
}

// streamAsLeader runs the pipeline while the lock holds. Losing the lock's session
// abandons the stream at once, without draining: another instance may already lead,
// and a drain would race its writes.
func (s *supervisor) streamAsLeader(drain, abandon context.Context, lock lease, onStreaming func()) error {
	// The loss is recorded as the cause of runAbandon, read after Stream returns:
	// the context synchronises the watcher's write with that read.
	runAbandon, cancelAbandon := context.WithCancelCause(abandon)
	defer cancelAbandon(nil)
	runDrain, cancelDrain := context.WithCancel(drain)
	defer cancelDrain()
	defer context.AfterFunc(runAbandon, cancelDrain)()
	go func() {
		select {
		case <-lock.Lost():
			cancelAbandon(errLeaderLost)
		case <-runAbandon.Done():
		}
	}()

	pcfg := PipelineConfig(s.cfg)
	if s.protocol1 {
		pcfg.Replication.Streaming = replication.StreamingOff
	}
	pcfg.Run.OnStreaming = onStreaming
	pcfg.Metrics = s.hooks.Metrics
	err := s.stream(runDrain, runAbandon, pcfg, s.log)
	if errors.Is(context.Cause(runAbandon), errLeaderLost) && drain.Err() == nil {
		return errLeaderLost
	}
	return err
}
