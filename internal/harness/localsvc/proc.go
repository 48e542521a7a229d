package localsvc

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// ErrNotInstalled reports that the binaries or the library a service needs
// are not on this machine. Errors wrapping it say what to install.
var ErrNotInstalled = errors.New("not installed")

// errExited reports that a server process exited while we waited for it to
// become ready.
var errExited = errors.New("server process exited")

const (
	// defaultStartTimeout bounds the readiness wait of every service.
	defaultStartTimeout = 30 * time.Second
	// defaultStopTimeout bounds a clean shutdown before we escalate to SIGKILL.
	defaultStopTimeout = 30 * time.Second
	// logTailLines is how many log lines errors quote.
	logTailLines = 20
	// ownerFile marks a directory we created and may delete once its owner
	// process is gone (see sweepStale).
	ownerFile = "owner.pid"
	// portAttempts is how often a start is retried when a port we picked
	// was taken by someone else between picking and binding.
	portAttempts = 3
)

// process is one running server process and the goroutine waiting for it.
type process struct {
	cmd  *exec.Cmd
	done chan struct{} // closed when the process has exited
	err  error         // Wait's result, readable after done is closed

	mu       sync.Mutex
	intended bool             // we asked it to stop or killed it: its exit is no crash
	onCrash  func(exit error) // armed once the server was ready; see arm
	hungNote string           // set when the harness killed a server that hung after a fatal error
}

// Crash reports a server that ended without being asked to: it exited, died
// of a signal, or hung after its own fatal-error handler ran (the modern
// ClickHouse does that) and was killed by the harness.
type Crash struct {
	// Service names the server, e.g. "clickhouse (modern) on 127.0.0.1:9000".
	Service string
	// Pid is the server process's pid.
	Pid int
	// At is when the harness noticed.
	At time.Time
	// Status is how it ended: "signal: aborted", "exit status 1", ...
	Status string
	// Log holds the lines of its logs that explain it.
	Log string
}

func (c *Crash) Error() string {
	return fmt.Sprintf("%s (pid %d) crashed at %s: %s\n--- its logs ---\n%s",
		c.Service, c.Pid, c.At.Format("15:04:05.000"), c.Status, c.Log)
}

// arm makes the process call onCrash (once, from its wait goroutine) if it
// exits without markIntended having been called. It is armed only after the
// server became ready, so a failed start is reported by the start itself.
func (p *process) arm(onCrash func(exit error)) {
	p.mu.Lock()
	p.onCrash = onCrash
	p.mu.Unlock()
	// It may have died between becoming ready and being armed. Report from
	// another goroutine: the caller may hold the lock the callback takes.
	if p.exited() {
		go p.reportExit()
	}
}

// markIntended records that we are stopping or killing the process.
func (p *process) markIntended() {
	p.mu.Lock()
	p.intended = true
	p.mu.Unlock()
}

// reportExit calls the crash callback if the exit was not intended.
func (p *process) reportExit() {
	p.mu.Lock()
	f := p.onCrash
	p.onCrash = nil
	intended := p.intended
	note := p.hungNote
	p.mu.Unlock()
	if f == nil || intended {
		return
	}
	exit := p.err
	if note != "" {
		exit = errors.New(note)
	} else if exit == nil {
		exit = errors.New("exit status 0")
	}
	f(exit)
}

// killHung kills a process that is alive but no longer serving, recording
// why, so that the crash report says so instead of "signal: killed".
func (p *process) killHung(note string) {
	p.mu.Lock()
	p.hungNote = note
	p.mu.Unlock()
	_ = p.signalTree(syscall.SIGKILL)
}

// spawnRequests carries commands to the one goroutine that starts children.
var (
	spawnOnce     sync.Once
	spawnRequests chan spawnRequest
)

type spawnRequest struct {
	cmd *exec.Cmd
	err chan error
}

// StartChild starts cmd from a goroutine locked to an OS thread that lives
// as long as this process. The kernel sends a child's parent-death signal
// (SysProcAttr.Pdeathsig) when the thread that forked it exits, not when the
// process does (golang/go#27505); forking from a thread that never exits
// makes the signal mean what it says: "our process died".
func StartChild(cmd *exec.Cmd) error {
	spawnOnce.Do(func() {
		spawnRequests = make(chan spawnRequest)
		go func() {
			// Never unlocked: a goroutine that exits locked would end the
			// thread, and this one never exits.
			runtime.LockOSThread()
			for r := range spawnRequests {
				r.err <- r.cmd.Start()
			}
		}()
	})
	r := spawnRequest{cmd: cmd, err: make(chan error, 1)}
	spawnRequests <- r
	return <-r.err
}

// startProcess starts cmd with stdout and stderr appended to logPath.
// It puts the process into a process group of its own (so that a terminal's
// Ctrl-C reaches only our process, which then stops servers in order) and
// asks the kernel to send it pdeathsig when our process dies.
//
// The parent-death signal is tied to the OS thread that forks the child,
// so the fork happens on a thread that never exits (see StartChild).
func startProcess(cmd *exec.Cmd, logPath string, pdeathsig syscall.Signal) (*process, error) {
	logFile, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open log file: %w", err)
	}
	// The child keeps its own copy of the descriptor; ours is not needed
	// after Start.
	defer logFile.Close()
	if cmd.Stdout == nil {
		cmd.Stdout = logFile
	}
	cmd.Stderr = logFile
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Setpgid = true
	cmd.SysProcAttr.Pdeathsig = pdeathsig
	fmt.Fprintf(logFile, "\n=== %s starting: %s\n", time.Now().Format(time.RFC3339Nano), strings.Join(cmd.Args, " "))
	if err := StartChild(cmd); err != nil {
		return nil, fmt.Errorf("start %s: %w", cmd.Path, err)
	}
	p := &process{cmd: cmd, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
		p.reportExit()
	}()
	return p, nil
}

// exited reports whether the process has exited.
func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// signal sends sig to the process (not its group).
func (p *process) signal(sig syscall.Signal) error {
	if p.exited() {
		return nil
	}
	if err := p.cmd.Process.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("send %v to pid %d: %w", sig, p.cmd.Process.Pid, err)
	}
	return nil
}

// signalGroup sends sig to the process group the process leads (itself and
// any children that stayed in its group).
func (p *process) signalGroup(sig syscall.Signal) error {
	// Once the leader has been reaped its pid, and so the group id, could
	// be reused by an unrelated process: leave it alone.
	if p.exited() {
		return nil
	}
	err := syscall.Kill(-p.cmd.Process.Pid, sig)
	if err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("send %v to process group %d: %w", sig, p.cmd.Process.Pid, err)
	}
	return nil
}

// signalTree sends sig to the process, its process group and all its
// descendants. The group alone is not enough: PostgreSQL backends call
// setsid() and so leave the postmaster's group. For SIGKILL and SIGSTOP the
// leader is stopped first so that it cannot fork while we walk its children.
func (p *process) signalTree(sig syscall.Signal) error {
	if p.exited() {
		return nil
	}
	pid := p.cmd.Process.Pid
	if sig == syscall.SIGKILL || sig == syscall.SIGSTOP {
		_ = syscall.Kill(pid, syscall.SIGSTOP)
	}
	for _, d := range descendants(pid) {
		_ = syscall.Kill(d, sig)
	}
	return p.signalGroup(sig)
}

// descendants lists the pids of all descendants of pid, read from /proc.
func descendants(pid int) []int {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	children := map[int][]int{}
	for _, e := range entries {
		child, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		data, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// "pid (comm) state ppid ...": comm may hold spaces and parentheses.
		i := bytes.LastIndexByte(data, ')')
		if i < 0 {
			continue
		}
		fields := strings.Fields(string(data[i+1:]))
		if len(fields) < 2 {
			continue
		}
		ppid, err := strconv.Atoi(fields[1])
		if err != nil {
			continue
		}
		children[ppid] = append(children[ppid], child)
	}
	var out []int
	queue := []int{pid}
	for len(queue) > 0 {
		next := queue[0]
		queue = queue[1:]
		for _, c := range children[next] {
			out = append(out, c)
			queue = append(queue, c)
		}
	}
	return out
}

// wait waits up to timeout for the process to exit and reports whether it did.
func (p *process) wait(timeout time.Duration) bool {
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-p.done:
		return true
	case <-t.C:
		return false
	}
}

// stop asks the process to exit with the request function, waits up to
// timeout, then kills the process and its descendants. It returns once the
// process has exited.
func (p *process) stop(request func() error, timeout time.Duration) error {
	var reqErr error
	p.markIntended()
	if !p.exited() {
		// A frozen server would not act on the request until resumed.
		_ = p.thaw()
		reqErr = request()
		if !p.wait(timeout) {
			reqErr = errors.Join(reqErr, fmt.Errorf("pid %d did not exit within %v: killed", p.cmd.Process.Pid, timeout))
			_ = p.signalTree(syscall.SIGKILL)
			<-p.done
		}
	}
	return reqErr
}

// kill kills the process and its descendants with SIGKILL and waits for
// the process.
func (p *process) kill() error {
	p.markIntended()
	var ds []int
	if !p.exited() {
		ds = descendants(p.cmd.Process.Pid)
	}
	err := p.signalTree(syscall.SIGKILL)
	<-p.done
	// Killed children of the leader exit asynchronously; one still alive
	// can keep resources a restart needs (PostgreSQL refuses to start while
	// a backend still has the old shared memory attached).
	waitGone(ds, 5*time.Second)
	return err
}

// waitGone waits up to timeout until none of pids is alive (zombies count
// as gone: they hold no resources, and orphans are reaped by someone else).
func waitGone(pids []int, timeout time.Duration) {
	deadline := time.Now().Add(timeout)
	for _, pid := range pids {
		for alive(pid) && time.Now().Before(deadline) {
			time.Sleep(5 * time.Millisecond) // bounded poll: no exit notification for non-children
		}
	}
}

// alive reports whether pid exists and is not a zombie.
func alive(pid int) bool {
	data, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return false
	}
	i := bytes.LastIndexByte(data, ')')
	if i < 0 || i+2 >= len(data) {
		return false
	}
	return data[i+2] != 'Z'
}

// freeze stops (SIGSTOP) the process and its descendants and returns once
// every thread of them is stopped: the signal is asynchronous, and a thread
// waiting for a CPU on a loaded machine runs on until it is scheduled.
func (p *process) freeze() error {
	if p.exited() {
		return nil
	}
	if err := p.signalTree(syscall.SIGSTOP); err != nil {
		return err
	}
	pids := append([]int{p.cmd.Process.Pid}, descendants(p.cmd.Process.Pid)...)
	deadline := time.Now().Add(5 * time.Second)
	for {
		running := runningThreads(pids)
		if len(running) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("freeze pid %d: threads %v still running 5s after SIGSTOP", p.cmd.Process.Pid, running)
		}
		time.Sleep(time.Millisecond) // bounded poll: no notification of a stop to a non-parent
	}
}

// runningThreads lists the threads (as pid/tid) of pids that are neither
// stopped nor gone.
func runningThreads(pids []int) []string {
	var out []string
	for _, pid := range pids {
		tasks, err := os.ReadDir(filepath.Join("/proc", strconv.Itoa(pid), "task"))
		if err != nil {
			continue // exited
		}
		for _, t := range tasks {
			data, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "task", t.Name(), "stat"))
			if err != nil {
				continue
			}
			i := bytes.LastIndexByte(data, ')')
			if i < 0 || i+2 >= len(data) {
				continue
			}
			switch data[i+2] {
			case 'T', 't', 'Z', 'X':
			default:
				out = append(out, fmt.Sprintf("%d/%s:%c", pid, t.Name(), data[i+2]))
			}
		}
	}
	return out
}

// thaw resumes (SIGCONT) the process and its descendants.
func (p *process) thaw() error { return p.signalTree(syscall.SIGCONT) }

// waitReady polls check until it succeeds, the process exits, ctx is done or
// timeout passes. The polling interval starts small because servers are
// often ready within a few hundred milliseconds.
func waitReady(ctx context.Context, p *process, timeout time.Duration, check func(ctx context.Context) error) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	interval := 20 * time.Millisecond
	var lastErr error
	for {
		if p.exited() {
			return fmt.Errorf("%w (%v); last readiness check: %v", errExited, p.err, lastErr)
		}
		attemptCtx, attemptCancel := context.WithTimeout(ctx, 2*time.Second)
		lastErr = check(attemptCtx)
		attemptCancel()
		if lastErr == nil {
			return nil
		}
		t := time.NewTimer(interval)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("not ready within %v: %w (last check: %v)", timeout, ctx.Err(), lastErr)
		case <-p.done:
			t.Stop()
		case <-t.C:
		}
		if interval < 200*time.Millisecond {
			interval *= 2
		}
	}
}

// freePort asks the kernel for a free loopback TCP port. Someone else may
// take it before the server binds it; callers retry on bind failures.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("pick a free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// portFree reports whether nothing accepts connections on 127.0.0.1:port.
func portFree(port int) bool {
	c, err := net.DialTimeout("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), time.Second)
	if err != nil {
		return true
	}
	c.Close()
	return false
}

// PortFree reports whether nothing accepts TCP connections on
// 127.0.0.1:port. Tests use it to check that a stopped server is gone.
func PortFree(port int) bool { return portFree(port) }

// tailFile returns the last n lines of the file at path, or a note saying
// why it could not be read.
func tailFile(path string, n int) string {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	defer f.Close()
	const maxRead = 64 << 10
	if st, err := f.Stat(); err == nil && st.Size() > maxRead {
		if _, err := f.Seek(st.Size()-maxRead, io.SeekStart); err != nil {
			return fmt.Sprintf("(log unreadable: %v)", err)
		}
	}
	data, err := io.ReadAll(f)
	if err != nil {
		return fmt.Sprintf("(log unreadable: %v)", err)
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// withLog wraps err with the tail of the log at path.
func withLog(err error, path string) error {
	return fmt.Errorf("%w\n--- last lines of %s ---\n%s", err, path, tailFile(path, logTailLines))
}

// DefaultBaseDir is where services keep their directories unless told
// otherwise: $TMPDIR/outbox-localsvc-UID. The UID keeps users apart on
// shared machines.
func DefaultBaseDir() string {
	return filepath.Join(os.TempDir(), "outbox-localsvc-"+strconv.Itoa(os.Geteuid()))
}

// newServiceDir creates a fresh directory for one service under base (or
// DefaultBaseDir) and records our pid in it, so that a later run can remove
// it if we die without cleaning up. The base is world-traversable because
// PostgreSQL runs as another user when we are root.
func newServiceDir(base, prefix string) (string, error) {
	if base == "" {
		base = DefaultBaseDir()
	}
	if err := os.MkdirAll(base, 0o755); err != nil {
		return "", fmt.Errorf("create base dir: %w", err)
	}
	sweepStale(base)
	dir, err := os.MkdirTemp(base, prefix+"-")
	if err != nil {
		return "", fmt.Errorf("create service dir: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, ownerFile), []byte(strconv.Itoa(os.Getpid())), 0o644); err != nil {
		return "", fmt.Errorf("write owner file: %w", err)
	}
	return dir, nil
}

// sweepStale removes service directories under base whose owner process no
// longer exists: they are left over from runs that were killed (their
// servers died with them through the parent-death signal). Failures are
// ignored: sweeping is housekeeping, not something to fail a start over.
func sweepStale(base string) {
	entries, err := os.ReadDir(base)
	if err != nil {
		return
	}
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		dir := filepath.Join(base, e.Name())
		data, err := os.ReadFile(filepath.Join(dir, ownerFile))
		if err != nil {
			continue
		}
		pid, err := strconv.Atoi(string(bytes.TrimSpace(data)))
		if err != nil || pid <= 0 {
			continue
		}
		if err := syscall.Kill(pid, 0); errors.Is(err, syscall.ESRCH) {
			_ = os.RemoveAll(dir)
		}
	}
}
