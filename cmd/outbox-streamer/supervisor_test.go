package main

import (
	"bytes"
	"maps"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"
)

// What the chaos tests share: a supervisor that restarts the real binary,
// and a seed that replays a run.

// chaosSeed returns the run's seed (OUTBOX_CHAOS_SEED, else the clock),
// logged so that a failed run can be replayed, and a generator from it.
func chaosSeed(t *testing.T) (int64, *rand.Rand) {
	t.Helper()
	seed := time.Now().UnixNano()
	if s := os.Getenv("OUTBOX_CHAOS_SEED"); s != "" {
		var err error
		if seed, err = strconv.ParseInt(s, 10, 64); err != nil {
			t.Fatalf("OUTBOX_CHAOS_SEED=%q: %v", s, err)
		}
	}
	t.Logf("chaos seed %d (OUTBOX_CHAOS_SEED=%d replays it)", seed, seed)
	return seed, rand.New(rand.NewPCG(uint64(seed), 0))
}

// supervisor keeps one streamer process running, restarting it when it exits, as a
// process manager would.
type supervisor struct {
	t    *testing.T
	env  []string
	mu   sync.Mutex
	cmd  *exec.Cmd
	out  bytes.Buffer
	stop chan struct{}
	done chan struct{}
	runs int
	// exits counts how the processes ended ("signal: killed" for kill's).
	exits map[string]int
}

func superviseStreamer(t *testing.T, env []string) *supervisor {
	s := &supervisor{t: t, env: env, stop: make(chan struct{}), done: make(chan struct{}), exits: map[string]int{}}
	go s.loop()
	t.Cleanup(s.shutdown)
	return s
}

func (s *supervisor) loop() {
	defer close(s.done)
	for {
		cmd := exec.Command(binary(s.t), "run")
		cmd.Env = s.env
		s.mu.Lock()
		cmd.Stdout, cmd.Stderr = &lockedWriter{mu: &s.mu, w: &s.out}, &lockedWriter{mu: &s.mu, w: &s.out}
		err := cmd.Start()
		s.cmd = cmd
		s.runs++
		s.mu.Unlock()
		if err == nil {
			err = cmd.Wait()
		}
		s.noteExit(err)
		select {
		case <-s.stop:
			return
		case <-time.After(300 * time.Millisecond):
		}
	}
}

func (s *supervisor) noteExit(err error) {
	status := "exit status 0"
	if err != nil {
		status = err.Error()
	}
	s.mu.Lock()
	s.exits[status]++
	s.mu.Unlock()
}

// starts returns how many processes were started so far.
func (s *supervisor) starts() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.runs
}

// exitStatuses returns how many processes ended how, so far.
func (s *supervisor) exitStatuses() map[string]int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return maps.Clone(s.exits)
}

// kill sends SIGKILL to the current streamer process.
func (s *supervisor) kill() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd != nil && s.cmd.Process != nil {
		_ = s.cmd.Process.Kill()
	}
}

func (s *supervisor) shutdown() { s.stopWith(syscall.SIGKILL) }

// stopWith stops supervising and ends the current process with sig (SIGKILL
// after 5 s if it is still running). SIGQUIT makes a Go process print every
// goroutine's stack first.
func (s *supervisor) stopWith(sig os.Signal) {
	select {
	case <-s.stop:
		return
	default:
	}
	close(s.stop)
	s.mu.Lock()
	if s.cmd != nil && s.cmd.Process != nil {
		_ = s.cmd.Process.Signal(sig)
	}
	s.mu.Unlock()
	select {
	case <-s.done:
	case <-time.After(5 * time.Second):
		s.kill()
		<-s.done
	}
}

type lockedWriter struct {
	mu *sync.Mutex
	w  *bytes.Buffer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// logs returns everything the streamer processes wrote so far.
func (s *supervisor) logs() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.out.String()
}

// keepLogsOnFailure writes the streamers' output to name in the temporary
// directory when the test fails: it explains the failure. The process
// running then is stopped with SIGQUIT, so that its goroutines' stacks are
// in the output (what a hung streamer was waiting for).
func (s *supervisor) keepLogsOnFailure(name string) {
	s.t.Cleanup(func() {
		if !s.t.Failed() {
			return
		}
		s.stopWith(syscall.SIGQUIT)
		path := filepath.Join(os.TempDir(), name)
		if err := os.WriteFile(path, []byte(s.logs()), 0o644); err != nil {
			s.t.Logf("keep streamer logs: %v", err)
			return
		}
		s.t.Logf("streamer logs kept in %s", path)
	})
}
