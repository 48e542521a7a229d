package localsvc

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
)

// EnvCHLegacyBin names the legacy clickhouse-server binary, overriding the
// search of /usr/bin, /usr/sbin and PATH.
const EnvCHLegacyBin = "OUTBOX_CH_LEGACY_BIN"

// ClickHouseOptions configures StartClickHouse and StartClickHouseLegacy.
// The zero value is a good default.
type ClickHouseOptions struct {
	// BaseDir is where a fresh service directory is created. Default:
	// DefaultBaseDir(). Ignored when Dir is set.
	BaseDir string
	// Dir, when set, is used as the service directory (data in Dir/data,
	// logs next to it) and is kept on Stop; data already in it is reused.
	Dir string
	// TCPPort and HTTPPort to listen on; 0 picks free ones.
	TCPPort, HTTPPort int
	// StartTimeout bounds the wait for the server to answer /ping.
	// Default 30 s.
	StartTimeout time.Duration

	// Library is libchdb.so for the modern server. Default: EnsureCHDB.
	Library string
	// Launcher is the executable run with OUTBOX_CHDB_LAUNCHER=1 for the
	// modern server. Default: os.Executable(), which must call
	// RunCHDBLauncherIfRequested first thing.
	Launcher string

	// Binary is the legacy clickhouse-server. Default: $OUTBOX_CH_LEGACY_BIN,
	// else /usr/bin/clickhouse-server, /usr/sbin/clickhouse-server (where
	// Debian 12 puts it) or clickhouse-server on PATH.
	Binary string

	// Direct lets clients reach the modern server's native port without the
	// reset shield (see shield.go), for benchmarks that must not pay for a
	// forwarder and never reset a connection mid-query. The legacy server is
	// always direct: it does not have the bug.
	Direct bool
	// OnCrash, when set, is called (from another goroutine) as soon as the
	// server ends, or hangs after a fatal error, without Halt, Kill,
	// Restart or Stop having asked it to.
	OnCrash func(*Crash)
}

// ClickHouse is a ClickHouse server started by StartClickHouse (modern,
// 26.7 from chDB) or StartClickHouseLegacy (Debian's 18.16).
type ClickHouse struct {
	// Host is the address the server listens on: 127.0.0.1.
	Host string
	// TCPPort is the native-protocol port clients use (the reset shield's
	// for the modern server), HTTPPort the HTTP port.
	TCPPort, HTTPPort int
	// Version is what SELECT version() returns, e.g. "26.7.2.1".
	Version string
	// Legacy is true for the 18.16 server.
	Legacy bool
	// Dir is the service directory; DataDir the server's data path in it.
	Dir, DataDir string
	// LogPath is the server's log; OutputPath the process's stdout/stderr.
	LogPath, OutputPath string

	opts    ClickHouseOptions
	ownsDir bool
	exe     string // launcher (modern) or clickhouse-server (legacy)
	lib     string // libchdb.so (modern)

	mu         sync.Mutex
	proc       *process
	stdin      io.WriteCloser // modern: closing it stops the server cleanly
	stopped    bool
	nativePort int           // the server's own native port (0 until known)
	shield     *resetShield  // nil when clients connect directly
	crash      *Crash        // the last crash since the last start
	log        *fatalScanner // what the server logged since the last start
}

// Addr returns the native-protocol address, "127.0.0.1:TCPPort".
func (c *ClickHouse) Addr() string { return net.JoinHostPort(c.Host, strconv.Itoa(c.TCPPort)) }

// HTTPAddr returns the HTTP address, "127.0.0.1:HTTPPort".
func (c *ClickHouse) HTTPAddr() string { return net.JoinHostPort(c.Host, strconv.Itoa(c.HTTPPort)) }

// StartClickHouse starts a modern ClickHouse (26.7): clickhouse-local from
// the chDB library with its TCP and HTTP listeners switched on, run by a
// re-executed copy of this binary (see RunCHDBLauncherIfRequested). Its
// `default` database uses the Overlay engine: create databases of your own.
func StartClickHouse(ctx context.Context, opts ClickHouseOptions) (*ClickHouse, error) {
	exe := opts.Launcher
	if exe == "" {
		if !launcherChecked.Load() {
			return nil, errors.New("clickhouse: call localsvc.RunCHDBLauncherIfRequested first thing in main or TestMain (the server runs as a re-executed copy of this binary)")
		}
		var err error
		if exe, err = os.Executable(); err != nil {
			return nil, fmt.Errorf("clickhouse: find own executable: %w", err)
		}
	}
	lib := opts.Library
	if lib == "" {
		var err error
		if lib, err = EnsureCHDB(ctx); err != nil {
			return nil, fmt.Errorf("clickhouse: %w", err)
		}
	}
	c := &ClickHouse{exe: exe, lib: lib}
	if err := c.init(opts, "ch"); err != nil {
		return nil, err
	}
	if !opts.Direct {
		// Clients get the shield's port; the server's own is chosen freely.
		c.shield = &resetShield{port: c.TCPPort}
		c.TCPPort = 0
	} else {
		c.nativePort = c.TCPPort
	}
	// Port 0 lets the server bind any free port and report it, which
	// avoids the race of picking a port ourselves.
	if err := c.Start(ctx); err != nil {
		c.removeDir()
		return nil, err
	}
	return c, nil
}

// StartClickHouseLegacy starts Debian's clickhouse-server 18.16 with a
// configuration of its own. It returns an error wrapping ErrNotInstalled
// when the server is not installed.
func StartClickHouseLegacy(ctx context.Context, opts ClickHouseOptions) (*ClickHouse, error) {
	bin, err := FindClickHouseLegacy(opts.Binary)
	if err != nil {
		return nil, err
	}
	c := &ClickHouse{exe: bin, Legacy: true}
	if err := c.init(opts, "chlegacy"); err != nil {
		return nil, err
	}
	pick := c.TCPPort == 0 || c.HTTPPort == 0
	for attempt := 1; ; attempt++ {
		if pick {
			if c.TCPPort, err = freePort(); err != nil {
				break
			}
			if c.HTTPPort, err = freePort(); err != nil {
				break
			}
			if c.HTTPPort == c.TCPPort {
				continue
			}
		}
		c.nativePort = c.TCPPort
		err = c.Start(ctx)
		if err == nil {
			return c, nil
		}
		if !pick || attempt >= portAttempts || !errors.Is(err, errPortInUse) {
			break
		}
	}
	c.removeDir()
	return nil, err
}

// FindClickHouseLegacy returns the path of the legacy clickhouse-server:
// bin if set, else $OUTBOX_CH_LEGACY_BIN, else /usr/bin, /usr/sbin or PATH.
// The error wraps ErrNotInstalled and says what to install.
func FindClickHouseLegacy(bin string) (string, error) {
	if bin == "" {
		bin = os.Getenv(EnvCHLegacyBin)
	}
	if bin != "" {
		if _, err := os.Stat(bin); err != nil {
			return "", fmt.Errorf("clickhouse-server %s: %w", bin, err)
		}
		return bin, nil
	}
	for _, p := range []string{"/usr/bin/clickhouse-server", "/usr/sbin/clickhouse-server"} {
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	if p, err := exec.LookPath("clickhouse-server"); err == nil {
		return p, nil
	}
	return "", fmt.Errorf("legacy clickhouse-server not found (install it with `apt-get install -y clickhouse-server clickhouse-client`): %w", ErrNotInstalled)
}

func (c *ClickHouse) init(opts ClickHouseOptions, prefix string) error {
	if opts.StartTimeout == 0 {
		opts.StartTimeout = defaultStartTimeout
	}
	c.opts = opts
	c.Host = "127.0.0.1"
	c.TCPPort, c.HTTPPort = opts.TCPPort, opts.HTTPPort
	if opts.Dir != "" {
		c.Dir = opts.Dir
		if err := os.MkdirAll(c.Dir, 0o755); err != nil {
			return fmt.Errorf("clickhouse: create dir: %w", err)
		}
	} else {
		var err error
		if c.Dir, err = newServiceDir(opts.BaseDir, prefix); err != nil {
			return fmt.Errorf("clickhouse: %w", err)
		}
		c.ownsDir = true
	}
	c.DataDir = filepath.Join(c.Dir, "data") + "/"
	c.LogPath = filepath.Join(c.Dir, "clickhouse.log")
	c.OutputPath = filepath.Join(c.Dir, "output.log")
	if err := os.MkdirAll(c.DataDir, 0o755); err != nil {
		return fmt.Errorf("clickhouse: create data dir: %w", err)
	}
	return nil
}

// Start starts the server again after Halt or Kill, on the same ports with
// the same data. It is a no-op when the server is running.
func (c *ClickHouse) Start(ctx context.Context) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.stopped {
		return errors.New("clickhouse: Start after Stop")
	}
	if c.proc != nil && !c.proc.exited() {
		return nil
	}
	return c.startLocked(ctx)
}

func (c *ClickHouse) startLocked(ctx context.Context) error {
	c.log = newFatalScanner(c.LogPath)
	var err error
	if c.Legacy {
		err = c.startLegacyProcess()
	} else {
		err = c.startModernProcess()
	}
	if err != nil {
		return err
	}
	portsFile := filepath.Join(c.Dir, "ports.tsv")
	err = waitReady(ctx, c.proc, c.opts.StartTimeout, func(ctx context.Context) error {
		if !c.Legacy && (c.nativePort == 0 || c.HTTPPort == 0) {
			if err := c.readPorts(portsFile); err != nil {
				return err
			}
		}
		return ping(ctx, c.HTTPAddr())
	})
	if err == nil {
		err = c.openClientPort()
	}
	if err == nil {
		err = c.queryVersion(ctx)
	}
	if err != nil {
		c.haltLocked(5 * time.Second)
		logs := tailFile(c.OutputPath, logTailLines) + "\n" + tailFile(c.LogPath, logTailLines)
		if strings.Contains(logs, "Address already in use") {
			err = fmt.Errorf("%w: %w", errPortInUse, err)
		}
		return c.withLogs(fmt.Errorf("clickhouse (%s) on ports %d/%d: %w", c.kind(), c.nativePort, c.HTTPPort, err))
	}
	c.crash = nil
	proc, scanner := c.proc, c.log
	proc.arm(func(exit error) { c.reportCrash(proc, scanner, exit) })
	go watchFatal(proc, scanner)
	return nil
}

// openClientPort makes the native port reachable for clients: through the
// reset shield (which forwards to the server's own port) or directly.
func (c *ClickHouse) openClientPort() error {
	if c.shield == nil {
		c.TCPPort = c.nativePort
		return nil
	}
	c.shield.upstream = net.JoinHostPort(c.Host, strconv.Itoa(c.nativePort))
	if err := c.shield.listen(); err != nil {
		return err
	}
	c.TCPPort = c.shield.port
	return nil
}

// closeClientPort stops new client connections through the shield while the
// server is down, so that clients see "connection refused" as they would
// without it.
func (c *ClickHouse) closeClientPort() {
	if c.shield != nil {
		c.shield.pause()
	}
}

// reportCrash records and reports a crash of proc.
func (c *ClickHouse) reportCrash(proc *process, scanner *fatalScanner, exit error) {
	cr := &Crash{
		Service: fmt.Sprintf("clickhouse (%s) on %s", c.kind(), net.JoinHostPort(c.Host, strconv.Itoa(c.nativePort))),
		Pid:     proc.cmd.Process.Pid,
		At:      time.Now(),
		Status:  exit.Error(),
		Log:     scanner.excerpt() + "\n--- last lines of " + c.OutputPath + " ---\n" + tailFile(c.OutputPath, 5),
	}
	c.mu.Lock()
	if c.proc == proc {
		c.crash = cr
		c.closeClientPort()
	}
	c.mu.Unlock()
	if c.opts.OnCrash != nil {
		c.opts.OnCrash(cr)
	}
}

// Crash returns how the server crashed, if it did since it was last
// started; nil otherwise.
func (c *ClickHouse) Crash() *Crash {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.crash
}

func (c *ClickHouse) kind() string {
	if c.Legacy {
		return "legacy"
	}
	return "modern"
}

// withLogs wraps err with the tails of the process output and server log.
func (c *ClickHouse) withLogs(err error) error {
	return withLog(withLog(err, c.OutputPath), c.LogPath)
}

// startModernProcess starts the chDB launcher. The last query reads stdin
// until EOF, which keeps clickhouse-local (and its listeners) alive for as
// long as we hold the pipe open; closing it is a clean shutdown, and it
// also happens by itself when we die.
func (c *ClickHouse) startModernProcess() error {
	portsFile := filepath.Join(c.Dir, "ports.tsv")
	_ = os.Remove(portsFile)
	// getServerPort reports the ports actually bound, which is what lets us
	// pass 0 and have the kernel choose. Ports are still written on
	// restarts (with fixed ports), which is harmless.
	query := "SYSTEM START LISTEN TCP; SYSTEM START LISTEN HTTP; " +
		"SELECT getServerPort('tcp_port'), getServerPort('http_port') INTO OUTFILE " + quoteCH(portsFile) + " TRUNCATE FORMAT TSV; " +
		"SELECT count() FROM file('/dev/stdin', 'LineAsString') FORMAT Null"
	cmd := exec.Command(c.exe,
		"--path="+c.DataDir,
		"--listen_host="+c.Host,
		"--tcp_port="+strconv.Itoa(c.nativePort),
		"--http_port="+strconv.Itoa(c.HTTPPort),
		"--logger.log="+c.LogPath,
		"--log-level=information",
		"--query", query)
	// clickhouse-local reads ./config.xml when present: run it where only
	// our files are.
	cmd.Dir = c.Dir
	cmd.Env = append(os.Environ(), EnvCHDBLauncher+"=1", EnvCHDBLib+"="+c.lib)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return fmt.Errorf("clickhouse: stdin pipe: %w", err)
	}
	// SIGTERM as a second line of defence: our death closes the pipe anyway.
	proc, err := startProcess(cmd, c.OutputPath, syscall.SIGTERM)
	if err != nil {
		stdin.Close()
		return fmt.Errorf("clickhouse: %w", err)
	}
	c.proc, c.stdin = proc, stdin
	return nil
}

// readPorts reads the ports the modern server reported after binding.
func (c *ClickHouse) readPorts(path string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("ports not reported yet: %w", err)
	}
	// The file is complete once its line ends.
	if !strings.HasSuffix(string(data), "\n") {
		return errors.New("ports file incomplete")
	}
	f := strings.Fields(string(data))
	if len(f) != 2 {
		return fmt.Errorf("unexpected ports file %q", data)
	}
	tcp, err1 := strconv.Atoi(f[0])
	http, err2 := strconv.Atoi(f[1])
	if err := errors.Join(err1, err2); err != nil || tcp == 0 || http == 0 {
		return fmt.Errorf("unexpected ports file %q: %v", data, err)
	}
	c.nativePort, c.HTTPPort = tcp, http
	return nil
}

// startLegacyProcess writes the configuration and starts clickhouse-server.
func (c *ClickHouse) startLegacyProcess() error {
	cfg := filepath.Join(c.Dir, "config.xml")
	if err := c.writeLegacyConfig(cfg); err != nil {
		return err
	}
	cmd := exec.Command(c.exe, "--config-file="+cfg)
	cmd.Dir = c.Dir
	proc, err := startProcess(cmd, c.OutputPath, syscall.SIGTERM)
	if err != nil {
		return fmt.Errorf("clickhouse legacy: %w", err)
	}
	c.proc, c.stdin = proc, nil
	return nil
}

// writeLegacyConfig writes config.xml and users.xml for clickhouse-server
// 18.16: loopback only, our ports, every path inside the service directory,
// small caches (the defaults reserve gigabytes), and a passwordless
// `default` user.
func (c *ClickHouse) writeLegacyConfig(path string) error {
	usersPath := filepath.Join(c.Dir, "users.xml")
	for _, sub := range []string{"tmp", "user_files", "format_schemas"} {
		if err := os.MkdirAll(filepath.Join(c.DataDir, sub), 0o755); err != nil {
			return fmt.Errorf("clickhouse legacy: create %s: %w", sub, err)
		}
	}
	config := fmt.Sprintf(`<?xml version="1.0"?>
<yandex>
    <logger>
        <level>information</level>
        <log>%[1]s</log>
        <errorlog>%[2]s</errorlog>
        <size>100M</size>
        <count>2</count>
        <console>0</console>
    </logger>
    <listen_host>%[3]s</listen_host>
    <tcp_port>%[4]d</tcp_port>
    <http_port>%[5]d</http_port>
    <path>%[6]s</path>
    <tmp_path>%[6]stmp/</tmp_path>
    <user_files_path>%[6]suser_files/</user_files_path>
    <format_schema_path>%[6]sformat_schemas/</format_schema_path>
    <users_config>%[7]s</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <max_connections>1024</max_connections>
    <max_concurrent_queries>100</max_concurrent_queries>
    <keep_alive_timeout>3</keep_alive_timeout>
    <mark_cache_size>67108864</mark_cache_size>
    <uncompressed_cache_size>67108864</uncompressed_cache_size>
    <mlock_executable>false</mlock_executable>
    <!-- Tests stop merges of their tables (a merge would hide duplicates);
         18.16 would otherwise delay inserts past 150 parts and refuse them
         past 300. -->
    <merge_tree>
        <parts_to_delay_insert>5000</parts_to_delay_insert>
        <parts_to_throw_insert>10000</parts_to_throw_insert>
    </merge_tree>
</yandex>
`, xmlEscape(c.LogPath), xmlEscape(filepath.Join(c.Dir, "clickhouse.err.log")), c.Host, c.nativePort, c.HTTPPort,
		xmlEscape(c.DataDir), xmlEscape(usersPath))
	users := `<?xml version="1.0"?>
<yandex>
    <profiles>
        <default>
            <max_memory_usage>4000000000</max_memory_usage>
            <load_balancing>random</load_balancing>
        </default>
    </profiles>
    <users>
        <default>
            <password></password>
            <networks>
                <ip>::/0</ip>
            </networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
    </users>
    <quotas>
        <default>
            <interval>
                <duration>3600</duration>
                <queries>0</queries>
                <errors>0</errors>
                <result_rows>0</result_rows>
                <read_rows>0</read_rows>
                <execution_time>0</execution_time>
            </interval>
        </default>
    </quotas>
</yandex>
`
	if err := os.WriteFile(path, []byte(config), 0o644); err != nil {
		return fmt.Errorf("clickhouse legacy: write config: %w", err)
	}
	if err := os.WriteFile(usersPath, []byte(users), 0o644); err != nil {
		return fmt.Errorf("clickhouse legacy: write users config: %w", err)
	}
	return nil
}

// queryVersion checks the native protocol end to end and records the version.
func (c *ClickHouse) queryVersion(ctx context.Context) error {
	conn, err := clickhouse.Open(&clickhouse.Options{
		Addr:        []string{c.Addr()},
		Protocol:    clickhouse.Native,
		DialTimeout: 5 * time.Second,
	})
	if err != nil {
		return fmt.Errorf("open native connection: %w", err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := conn.QueryRow(ctx, "SELECT version()").Scan(&c.Version); err != nil {
		return fmt.Errorf("SELECT version() over native protocol: %w", err)
	}
	return nil
}

// pingClient does not keep connections alive: an idle keep-alive connection
// makes ClickHouse wait for it (keep_alive_timeout) when shutting down.
var pingClient = &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}

// ping asks the HTTP interface's /ping, which answers "Ok." when ready.
func ping(ctx context.Context, addr string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/ping", nil)
	if err != nil {
		return err
	}
	resp, err := pingClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("/ping: HTTP %s", resp.Status)
	}
	return nil
}

// Halt shuts the server down cleanly and keeps its data; Start brings it
// back on the same ports.
func (c *ClickHouse) Halt() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.haltLocked(defaultStopTimeout)
}

func (c *ClickHouse) haltLocked(timeout time.Duration) error {
	c.closeClientPort()
	if c.proc == nil {
		return nil
	}
	request := func() error { return c.proc.signal(syscall.SIGTERM) }
	if c.stdin != nil {
		request = func() error { return c.stdin.Close() }
	}
	err := c.proc.stop(request, timeout)
	if c.stdin != nil {
		_ = c.stdin.Close()
		c.stdin = nil
	}
	if err != nil {
		return fmt.Errorf("clickhouse (%s): halt: %w", c.kind(), err)
	}
	return nil
}

// Kill kills the server with SIGKILL, like a crash; data already written
// is kept and Start brings the server back.
func (c *ClickHouse) Kill() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closeClientPort()
	if c.proc == nil {
		return nil
	}
	err := c.proc.kill()
	if c.stdin != nil {
		_ = c.stdin.Close()
		c.stdin = nil
	}
	return err
}

// Freeze stops (SIGSTOP) the server: connections stay open but nothing
// answers, as with a hung server or a network partition. Thaw resumes it.
func (c *ClickHouse) Freeze() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.proc == nil {
		return nil
	}
	return c.proc.freeze()
}

// Thaw resumes a server stopped by Freeze.
func (c *ClickHouse) Thaw() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.proc == nil {
		return nil
	}
	return c.proc.thaw()
}

// Running reports whether the server process is alive.
func (c *ClickHouse) Running() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.proc != nil && !c.proc.exited()
}

// Restart halts the server and starts it again on the same ports with the
// same data.
func (c *ClickHouse) Restart(ctx context.Context) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.stopped {
		return errors.New("clickhouse: Restart after Stop")
	}
	if err := c.haltLocked(defaultStopTimeout); err != nil {
		return err
	}
	return c.startLocked(ctx)
}

// Stop shuts the server down and removes its directory (unless it was given
// as ClickHouseOptions.Dir). It is safe to call more than once.
func (c *ClickHouse) Stop() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.stopped {
		return nil
	}
	c.stopped = true
	err := c.haltLocked(defaultStopTimeout)
	c.removeDir()
	return err
}

func (c *ClickHouse) removeDir() {
	if c.ownsDir {
		_ = os.RemoveAll(c.Dir)
	}
}

// quoteCH quotes s as a ClickHouse string literal.
func quoteCH(s string) string {
	return "'" + strings.NewReplacer(`\`, `\\`, `'`, `\'`).Replace(s) + "'"
}

// xmlEscape escapes s for XML text content.
func xmlEscape(s string) string {
	return strings.NewReplacer("&", "&amp;", "<", "&lt;", ">", "&gt;").Replace(s)
}

// Pid returns the server process's pid, or 0 when it is not running.
func (c *ClickHouse) Pid() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.proc == nil || c.proc.exited() {
		return 0
	}
	return c.proc.cmd.Process.Pid
}
