package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/localsvc"
	"github.com/outbox-streamer/outbox-streamer/internal/metrics"
)

// streamer is the real binary, `outbox-streamer run`, as a child process.
type streamer struct {
	cmd     *exec.Cmd
	logPath string
	// metricsAddr is where the binary serves its metrics (METRICS_ADDR).
	metricsAddr string
	Started     time.Time
	done        chan struct{}
	waitErr     error
}

// streamerEnv is the complete environment of the binary: only the settings that
// point it at e's databases, so that every other setting is its default (the
// bench's own environment does not leak in). extra adds or overrides settings.
func (e *dbEnv) streamerEnv(extra ...string) []string {
	host, port, _ := strings.Cut(e.Sink.Addr, ":")
	env := []string{
		"PATH=" + os.Getenv("PATH"),
		"DATABASE_URL=" + e.DSN,
		"CLICKHOUSE_HOST=" + host,
		"CLICKHOUSE_PORT=" + port,
		"CLICKHOUSE_SCHEMA=" + e.Sink.Database,
		"REPLICATION_SLOT_NAME=" + e.Slot,
		"PUBLICATION_NAME=" + publication,
		// The metrics endpoint stays on, as by default, but on a port free
		// now (a fixed one may be taken by another process on the machine):
		// the bench reads the backfill's figures from it.
		"METRICS_ADDR=" + freeLoopbackAddr(),
	}
	return append(env, extra...)
}

// startStreamer starts `bin run` with env, its output appended to logPath.
func startStreamer(bin string, env []string, logPath string) (*streamer, error) {
	f, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fmt.Fprintf(f, "=== %s start %s run\n", time.Now().Format(time.RFC3339Nano), bin)
	cmd := exec.Command(bin, "run")
	cmd.Env = env
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	s := &streamer{cmd: cmd, logPath: logPath, done: make(chan struct{})}
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, "METRICS_ADDR="); ok {
			s.metricsAddr = v
		}
	}
	s.Started = time.Now()
	if err := localsvc.StartChild(cmd); err != nil {
		return nil, fmt.Errorf("start %s: %w", bin, err)
	}
	go func() {
		s.waitErr = cmd.Wait()
		close(s.done)
	}()
	return s, nil
}

// Pid is the binary's process id.
func (s *streamer) Pid() int { return s.cmd.Process.Pid }

// err reports an exit before Stop (for the waits' watch).
func (s *streamer) err() error {
	select {
	case <-s.done:
		return fmt.Errorf("outbox-streamer exited early (%v); log %s:\n%s", s.waitErr, s.logPath, tailFile(s.logPath, 15))
	default:
		return nil
	}
}

// Stop sends SIGTERM (a clean drain) and waits; an exit code other than 0 is an
// error. After timeout the process is killed.
func (s *streamer) Stop(timeout time.Duration) error {
	select {
	case <-s.done:
	default:
		_ = s.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-s.done:
		case <-time.After(timeout):
			_ = s.cmd.Process.Kill()
			<-s.done
			return fmt.Errorf("outbox-streamer did not stop within %s of SIGTERM; log %s", timeout, s.logPath)
		}
	}
	if s.waitErr != nil {
		return fmt.Errorf("outbox-streamer: %v; log %s:\n%s", s.waitErr, s.logPath, tailFile(s.logPath, 15))
	}
	return nil
}

// memStatus reads VmRSS and VmHWM (peak resident set) of the process, in bytes.
func (s *streamer) memStatus() (rss, hwm int64, err error) {
	return procMem(s.Pid())
}

func procMem(pid int) (rss, hwm int64, err error) {
	data, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "status"))
	if err != nil {
		return 0, 0, err
	}
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		v, _ := strconv.ParseInt(f[1], 10, 64)
		switch f[0] {
		case "VmRSS:":
			rss = v * 1024
		case "VmHWM:":
			hwm = v * 1024
		}
	}
	if rss == 0 {
		return 0, 0, errors.New("no VmRSS in /proc status")
	}
	return rss, hwm, nil
}

// streamingAt returns the time of the last "streaming" log line (the replication
// stream started) of the current run, from the binary's JSON log.
func (s *streamer) streamingAt() (time.Time, bool) { return s.loggedAt("streaming") }

// loggedAt returns the time of the current run's last log line whose message
// is msg, from the binary's JSON log.
func (s *streamer) loggedAt(msg string) (time.Time, bool) {
	want, err := json.Marshal(msg)
	if err != nil {
		return time.Time{}, false
	}
	want = append([]byte(`"msg":`), want...)
	f, err := os.Open(s.logPath)
	if err != nil {
		return time.Time{}, false
	}
	defer f.Close()
	var at time.Time
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Bytes()
		if !bytes.Contains(line, want) {
			continue
		}
		var rec struct {
			TS string `json:"ts"`
		}
		if json.Unmarshal(line, &rec) != nil {
			continue
		}
		if t, err := time.Parse("2006-01-02T15:04:05.000Z0700", rec.TS); err == nil && !t.Before(s.Started.Add(-time.Second)) {
			at = t
		}
	}
	return at, !at.IsZero()
}

// backfilled reads from the binary's metrics what the backfill of its new
// slot delivered (metrics.ObserveBackfill): the rows and when it finished;
// ok is false until it has.
func (s *streamer) backfilled() (rows float64, at time.Time, ok bool) {
	c := http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get("http://" + s.metricsAddr + "/metrics")
	if err != nil {
		return 0, time.Time{}, false
	}
	defer resp.Body.Close()
	var done float64
	var haveRows bool
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		name, value, _ := strings.Cut(sc.Text(), " ")
		v, err := strconv.ParseFloat(value, 64)
		if err != nil {
			continue
		}
		switch name {
		case metrics.Namespace + "_backfill_rows":
			rows, haveRows = v, true
		case metrics.Namespace + "_backfill_completed_timestamp_seconds":
			done = v
		}
	}
	if !haveRows || done == 0 {
		return 0, time.Time{}, false
	}
	return rows, time.Unix(0, int64(done*1e9)), true
}

// freeLoopbackAddr is a loopback address whose port is free now, or one
// that lets the kernel choose ("127.0.0.1:0") when none can be found.
func freeLoopbackAddr() string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "127.0.0.1:0"
	}
	defer l.Close()
	return l.Addr().String()
}

// tailFile returns the last n lines of a file.
func tailFile(path string, n int) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
