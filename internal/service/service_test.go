package service

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/outbox-streamer/outbox-streamer/internal/config"
	"github.com/outbox-streamer/outbox-streamer/internal/pipeline"
	"github.com/outbox-streamer/outbox-streamer/internal/retry"
	"github.com/outbox-streamer/outbox-streamer/replication"
)

// fakeLease is a leader lock whose session is lost when lost is closed.
type fakeLease struct {
	lost     chan struct{}
	released bool
}

func (l *fakeLease) Lost() <-chan struct{} { return l.lost }
func (l *fakeLease) Release()              { l.released = true }

// step is what one start of the pipeline does: whether the server accepts
// START_REPLICATION, then how it ends.
type step struct {
	acquireErr error
	streams    bool
	// run, when set, decides the end; otherwise the step returns err at once.
	run func(drain, abandon context.Context, lease *fakeLease) error
	err error
}

// harness is a supervisor over scripted steps; past the script, a start blocks
// until drain ends and returns nil (an orderly stop).
type harness struct {
	t      *testing.T
	steps  []step
	mu     sync.Mutex
	starts int
	states []State
}

func (h *harness) supervisor(cfg *config.Config) *supervisor {
	var cur *fakeLease
	next := func() (step, bool) {
		h.mu.Lock()
		defer h.mu.Unlock()
		if h.starts >= len(h.steps) {
			h.starts++
			return step{}, false
		}
		st := h.steps[h.starts]
		h.starts++
		return st, true
	}
	var pending *step
	return &supervisor{
		cfg:    cfg,
		log:    zap.NewNop(),
		hooks:  Hooks{OnState: func(s State) { h.mu.Lock(); h.states = append(h.states, s); h.mu.Unlock() }},
		policy: retry.Policy{Initial: time.Millisecond, Max: time.Millisecond},
		acquire: func(ctx context.Context, onStandby func()) (lease, error) {
			onStandby()
			st, ok := next()
			if !ok {
				pending = nil
			} else {
				pending = &st
				if st.acquireErr != nil {
					return nil, st.acquireErr
				}
			}
			cur = &fakeLease{lost: make(chan struct{})}
			return cur, nil
		},
		stream: func(drain, abandon context.Context, cfg pipeline.Config, log *zap.Logger) error {
			if pending == nil {
				cfg.Run.OnStreaming()
				<-drain.Done()
				return nil
			}
			if pending.streams {
				cfg.Run.OnStreaming()
			}
			if pending.run != nil {
				return pending.run(drain, abandon, cur)
			}
			return pending.err
		},
	}
}

func testConfig() *config.Config {
	return &config.Config{SlotBusyTimeout: 50 * time.Millisecond}
}

// run runs the supervisor until it returns, stopping it (drain) once it is past
// the script.
func (h *harness) run(cfg *config.Config) error {
	drain, stop := context.WithCancel(context.Background())
	defer stop()
	done := make(chan error, 1)
	go func() { done <- h.supervisor(cfg).run(drain, context.Background()) }()
	deadline := time.After(10 * time.Second)
	for {
		select {
		case err := <-done:
			return err
		case <-time.After(5 * time.Millisecond):
			h.mu.Lock()
			past := h.starts > len(h.steps)
			h.mu.Unlock()
			if past {
				stop()
			}
		case <-deadline:
			h.t.Fatal("supervisor did not return")
		}
	}
}

var (
	errPermanent = errors.New("column missing")
	errDropped   = io.ErrUnexpectedEOF
)

func TestSupervisorRestartRules(t *testing.T) {
	for _, tc := range []struct {
		name       string
		steps      []step
		wantErr    error // nil: the orderly stop after the script
		wantStarts int
	}{
		{"permanent failure at start is final", []step{{err: errPermanent}}, errPermanent, 1},
		{"transient failure before the first stream is final", []step{{err: errDropped}}, errDropped, 1},
		{"lock error before the first stream is final", []step{{acquireErr: errDropped}}, errDropped, 1},
		{"transient failure after streaming is retried", []step{{streams: true, err: errDropped}, {streams: true, err: errDropped}}, nil, 3},
		{"permanent failure after streaming is final", []step{{streams: true, err: errDropped}, {streams: true, err: errPermanent}}, errPermanent, 2},
		{"lock error after streaming is retried", []step{{streams: true, err: errDropped}, {acquireErr: errDropped}}, nil, 3},
		{"a briefly busy slot is retried", []step{{err: replication.SlotInUseError("s", 1)}, {err: replication.SlotInUseError("s", 1)}}, nil, 3},
		{"lost lock is retried", []step{{streams: true, run: func(drain, abandon context.Context, l *fakeLease) error {
			close(l.lost)
			<-abandon.Done()
			if drain.Err() == nil {
				return errors.New("drain still open after the lock was lost")
			}
			return context.Canceled
		}}}, nil, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := &harness{t: t, steps: tc.steps}
			err := h.run(testConfig())
			if !errors.Is(err, tc.wantErr) || (tc.wantErr == nil && err != nil) {
				t.Fatalf("run = %v, want %v", err, tc.wantErr)
			}
			if h.starts != tc.wantStarts {
				t.Errorf("%d starts, want %d", h.starts, tc.wantStarts)
			}
		})
	}
}

func TestSupervisorSlotBusyTooLongIsFinal(t *testing.T) {
	cfg := testConfig()
	busy := replication.SlotInUseError("s", 1)
	var steps []step
	for range 1000 {
		steps = append(steps, step{run: func(context.Context, context.Context, *fakeLease) error {
			time.Sleep(5 * time.Millisecond)
			return busy
		}})
	}
	h := &harness{t: t, steps: steps}
	start := time.Now()
	if err := h.run(cfg); !errors.Is(err, busy) {
		t.Fatalf("run = %v, want the slot-busy error", err)
	}
	if took := time.Since(start); took < cfg.SlotBusyTimeout {
		t.Errorf("gave up after %s, before SlotBusyTimeout %s", took, cfg.SlotBusyTimeout)
	}
}

func TestSupervisorStopDuringStartIsOrderly(t *testing.T) {
	drain, stop := context.WithCancel(context.Background())
	h := &harness{t: t, steps: []step{{run: func(d, _ context.Context, _ *fakeLease) error {
		stop()
		<-d.Done()
		return errors.Join(errors.New("open stream"), d.Err())
	}}}}
	if err := h.supervisor(testConfig()).run(drain, context.Background()); err != nil {
		t.Fatalf("run = %v, want nil after a stop during start-up", err)
	}
}

func TestSupervisorAbandonEndsDrain(t *testing.T) {
	abandon, stop := context.WithCancel(context.Background())
	h := &harness{t: t, steps: []step{{streams: true, run: func(d, a context.Context, _ *fakeLease) error {
		stop()
		<-a.Done()
		<-d.Done() // abandoning without drain would hang here
		return context.Canceled
	}}}}
	if err := h.supervisor(testConfig()).run(context.Background(), abandon); err != nil {
		t.Fatalf("run = %v, want nil", err)
	}
}

func TestStreamAsLeaderReportsTheLostLock(t *testing.T) {
	h := &harness{t: t}
	s := h.supervisor(testConfig())
	l := &fakeLease{lost: make(chan struct{})}
	s.stream = func(drain, abandon context.Context, _ pipeline.Config, _ *zap.Logger) error {
		close(l.lost)
		<-abandon.Done()
		<-drain.Done()
		return context.Canceled
	}
	if err := s.streamAsLeader(context.Background(), context.Background(), l, func() {}); !errors.Is(err, errLeaderLost) {
		t.Fatalf("streamAsLeader = %v, want errLeaderLost", err)
	}
	// A stop by the caller is not a lost lock, even if the session also failed.
	drain, stop := context.WithCancel(context.Background())
	l = &fakeLease{lost: make(chan struct{})}
	s.stream = func(d, abandon context.Context, _ pipeline.Config, _ *zap.Logger) error {
		stop()
		close(l.lost)
		<-abandon.Done()
		return context.Canceled
	}
	if err := s.streamAsLeader(drain, context.Background(), l, func() {}); !errors.Is(err, context.Canceled) {
		t.Fatalf("streamAsLeader after a stop = %v, want context.Canceled", err)
	}
}

func TestPipelineConfigMapsSettings(t *testing.T) {
	cfg := &config.Config{PostgresDSN: "postgres://x", Slot: "s", Publication: "p", BatchSize: 10,
		ClickHouseBatchSize: 100, MaxAttempts: 3, RetryBaseDelay: time.Second, RetryMaxDelay: time.Minute,
		SweepInterval: time.Minute, Retention: time.Hour, PartitionInterval: 24 * time.Hour}
	p := PipelineConfig(cfg)
	if p.Replication.DSN != cfg.PostgresDSN || p.Replication.Slot != "s" || p.Replication.Publication != "p" ||
		p.Run.BatchSize != 10 || p.Writer.MaxInsertRows != 100 || p.Retry != RetryConfig(cfg) ||
		p.SweepInterval != time.Minute || p.Retention != time.Hour || p.PartitionInterval != 24*time.Hour {
		t.Errorf("PipelineConfig = %+v", p)
	}
	if r := RetryConfig(cfg); r.MaxAttempts != 3 || r.BaseDelay != time.Second || r.MaxDelay != time.Minute {
		t.Errorf("RetryConfig = %+v", r)
	}
}

// TestSupervisorFallsBackToProtocol1WhenTheSpillIsFull: a full spill of
// in-progress transactions ends the session; the supervisor restarts it with
// protocol 1 (the server holds such transactions) instead of failing again.
func TestSupervisorFallsBackToProtocol1WhenTheSpillIsFull(t *testing.T) {
	cfg := testConfig()
	cfg.Streaming = replication.StreamingAuto
	h := &harness{t: t, steps: []step{{streams: true, err: fmt.Errorf("receive: %w", replication.ErrSpillFull)}}}
	s := h.supervisor(cfg)
	var modes []string
	inner := s.stream
	s.stream = func(drain, abandon context.Context, pcfg pipeline.Config, log *zap.Logger) error {
		modes = append(modes, pcfg.Replication.Streaming)
		return inner(drain, abandon, pcfg, log)
	}
	drain, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.run(drain, context.Background()) }()
	waitUntil(t, func() bool { h.mu.Lock(); defer h.mu.Unlock(); return h.starts > 1 })
	stop()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if len(modes) != 2 || modes[0] != replication.StreamingAuto || modes[1] != replication.StreamingOff {
		t.Fatalf("streaming modes of the starts: %v, want [auto off]", modes)
	}
}

func waitUntil(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("timed out")
		}
		time.Sleep(5 * time.Millisecond)
	}
}
