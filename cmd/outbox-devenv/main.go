// Command outbox-devenv starts PostgreSQL and ClickHouse as local processes
// (no Docker), runs a command with environment variables pointing at them,
// and stops them when the command ends.
//
// Usage:
//
//	outbox-devenv [--legacy] [--pg-version N] [--base-dir DIR] -- CMD [ARGS...]
//	outbox-devenv [--legacy] [--pg-version N] [--base-dir DIR]    (print the variables, wait for Ctrl-C)
//	outbox-devenv --fetch-only                    (download the chDB library and exit)
//	outbox-devenv --fetch-pg 13,14,16             (download PostgreSQL majors and exit)
//
// Servers named by OUTBOX_TEST_PG_DSN, OUTBOX_TEST_CH_ADDR or (with
// --legacy) OUTBOX_TEST_CH_LEGACY_ADDR are used as they are instead of being
// started. The exit status is the command's.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/localsvc"
)

// Variables a user sets to bring servers of their own.
const (
	envPGDSN        = "OUTBOX_TEST_PG_DSN"
	envCHAddr       = "OUTBOX_TEST_CH_ADDR"
	envCHHTTPAddr   = "OUTBOX_TEST_CH_HTTP_ADDR"
	envCHLegacyAddr = "OUTBOX_TEST_CH_LEGACY_ADDR"
)

func main() {
	// First: this binary doubles as the modern ClickHouse's launcher.
	localsvc.RunCHDBLauncherIfRequested()
	// A first run downloads 178 MB: show that it moves.
	localsvc.CHDBProgress = os.Stderr
	os.Exit(run())
}

// run does the work and returns the exit code; it returns (rather than
// exiting) so that deferred stops always run.
func run() int {
	fs := flag.NewFlagSet("outbox-devenv", flag.ContinueOnError)
	legacy := fs.Bool("legacy", false, "also start the legacy ClickHouse 18.16 (Debian's clickhouse-server)")
	baseDir := fs.String("base-dir", "", "directory for the servers' data and logs (default "+localsvc.DefaultBaseDir()+")")
	fetchOnly := fs.Bool("fetch-only", false, "download the chDB library (modern ClickHouse) into the cache and exit")
	pgVersion := fs.Int("pg-version", 0, "PostgreSQL major to start (13-18; default $"+localsvc.EnvPGVersion+" or the distribution's newest); also exported as "+localsvc.EnvPGVersion+" for servers the command starts itself")
	fetchPG := fs.String("fetch-pg", "", `download these PostgreSQL majors (comma-separated, or "all") into the cache and exit`)
	cluster := fs.String("cluster", "", `also start a local ClickHouse cluster: "replicated" (ZooKeeper + 1 shard of two 18.16 replicas) or "sharded" (2 shards of 26.7, no replication); exports CLICKHOUSE_CLUSTER and OUTBOX_TEST_CH_CLUSTER_ADDRS`)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: outbox-devenv [--legacy] [--pg-version N] [--cluster replicated|sharded] [--base-dir DIR] -- CMD [ARGS...]\n       outbox-devenv --fetch-only\n       outbox-devenv --fetch-pg 13,14,16,17,18|all\n\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(os.Args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	args := fs.Args()

	// A signal during startup cancels it; afterwards signals end the wait
	// or go to the command (see runCommand).
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	defer signal.Stop(sigs)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var startupSig os.Signal
	startupDone, watcherDone := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(watcherDone)
		select {
		case startupSig = <-sigs:
			cancel()
		case <-startupDone:
		}
	}()
	endStartup := func() {
		close(startupDone)
		<-watcherDone
	}

	if *fetchOnly {
		start := time.Now()
		lib, err := localsvc.EnsureCHDB(ctx)
		endStartup()
		if err != nil {
			logf("fetch chDB: %v", err)
			return 1
		}
		logf("chDB library ready at %s (%v)", lib, time.Since(start).Round(time.Millisecond))
		return 0
	}

	if *fetchPG != "" {
		err := fetchPGMajors(ctx, *fetchPG)
		endStartup()
		if err != nil {
			logf("fetch postgres: %v", err)
			return 1
		}
		return 0
	}
	if *pgVersion != 0 {
		if localsvc.PGDistVersion(*pgVersion) == "" {
			endStartup()
			logf("--pg-version %d: want one of %v", *pgVersion, localsvc.PGMajors())
			return 2
		}
		// Servers the command starts (private ones in tests) run the same major.
		os.Setenv(localsvc.EnvPGVersion, strconv.Itoa(*pgVersion))
	}

	crashes, err := newCrashLog()
	if err != nil {
		endStartup()
		logf("%v", err)
		return 1
	}
	defer crashes.remove()
	var kind localsvc.ClusterKind
	switch *cluster {
	case "", "replicated":
		kind = localsvc.ClusterReplicated
	case "sharded":
		kind = localsvc.ClusterSharded
	default:
		endStartup()
		logf("--cluster %q: want replicated or sharded", *cluster)
		return 2
	}
	env, stop, err := startServices(ctx, *legacy, *baseDir, crashes.report)
	if err == nil && *cluster != "" {
		var cenv []string
		var cstop func() error
		cenv, cstop, err = startCluster(ctx, kind, *baseDir, crashes.report)
		env = append(env, cenv...)
		prev := stop
		stop = func() error { return errors.Join(cstop(), prev()) }
	}
	endStartup()
	defer func() {
		if err := stop(); err != nil {
			logf("stopping services: %v", err)
		}
	}()
	if startupSig != nil {
		logf("interrupted by %v during startup", startupSig)
		return signalExitCode(startupSig)
	}
	if err != nil {
		logf("%v", err)
		return 1
	}

	env = append(env, envCrashFile+"="+crashes.path)
	if len(args) == 0 {
		for _, kv := range env {
			fmt.Printf("export %s\n", shellQuoteKV(kv))
		}
		logf("services running; press Ctrl-C to stop them")
		return signalExitCode(<-sigs)
	}
	code := runCommand(sigs, args, env)
	if n := crashes.count(); n > 0 {
		logf("%d server crash(es) while %s ran (reported above): failing", n, args[0])
		if code == 0 {
			code = 1
		}
	}
	return code
}

// envCrashFile tells tests where crash reports of our servers are appended
// (internal/testenv reads it).
const envCrashFile = "OUTBOX_TEST_CRASH_FILE"

// crashLog reports crashes of our servers the moment they happen: on stderr
// and appended to a file the command can read.
type crashLog struct {
	path string
	mu   sync.Mutex
	n    int
}

func newCrashLog() (*crashLog, error) {
	f, err := os.CreateTemp("", "outbox-devenv-crashes-*.log")
	if err != nil {
		return nil, fmt.Errorf("create crash report file: %w", err)
	}
	f.Close()
	return &crashLog{path: f.Name()}, nil
}

func (l *crashLog) report(c *localsvc.Crash) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.n++
	logf("SERVER CRASHED: %v", c)
	f, err := os.OpenFile(l.path, os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		logf("record crash in %s: %v", l.path, err)
		return
	}
	defer f.Close()
	fmt.Fprintf(f, "%v\n\n", c)
}

func (l *crashLog) count() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.n
}

func (l *crashLog) remove() { _ = os.Remove(l.path) }

// startServices starts what the environment does not provide and returns
// the variables for the command and a function stopping exactly what was
// started (newest first).
func startServices(ctx context.Context, legacy bool, baseDir string, onCrash func(*localsvc.Crash)) (env []string, stop func() error, err error) {
	var stops []func() error
	stop = func() error {
		var errs []error
		for i := len(stops) - 1; i >= 0; i-- {
			errs = append(errs, stops[i]())
		}
		stops = nil
		return errors.Join(errs...)
	}
	set := func(k, v string) { env = append(env, k+"="+v) }

	// PostgreSQL.
	if dsn := os.Getenv(envPGDSN); dsn != "" {
		logf("postgres: using %s from the environment", envPGDSN)
		set("DATABASE_URL", dsn)
		if cfg, err := pgx.ParseConfig(dsn); err == nil {
			set("POSTGRES_HOST", cfg.Host)
			set("POSTGRES_PORT", strconv.Itoa(int(cfg.Port)))
			set("POSTGRES_USER", cfg.User)
			set("POSTGRES_DB", cfg.Database)
		}
		set(envPGDSN, dsn)
	} else {
		began := time.Now()
		// The major comes from OUTBOX_PG_VERSION (set by --pg-version).
		opts := localsvc.PostgresOptions{BaseDir: baseDir, OnCrash: onCrash}
		if err := opts.AgeFromEnv(); err != nil {
			return nil, stop, err
		}
		pg, err := localsvc.StartPostgres(ctx, opts)
		if err != nil {
			return nil, stop, fmt.Errorf("start postgres: %w", err)
		}
		stops = append(stops, pg.Stop)
		logf("postgres %s at 127.0.0.1:%d (%s), data %s, xid epoch %d, next xid %d, started in %v",
			pg.Version, pg.Port, pg.DSN(), pg.Dir, opts.XIDEpoch, opts.NextXID, time.Since(began).Round(time.Millisecond))
		set("DATABASE_URL", pg.DSN())
		set("POSTGRES_HOST", "127.0.0.1")
		set("POSTGRES_PORT", strconv.Itoa(pg.Port))
		set("POSTGRES_USER", "postgres")
		set("POSTGRES_DB", "postgres")
		set(envPGDSN, pg.DSN())
	}

	// Modern ClickHouse.
	if addr := os.Getenv(envCHAddr); addr != "" {
		logf("clickhouse: using %s=%s from the environment", envCHAddr, addr)
		host, port, err := net.SplitHostPort(addr)
		if err != nil {
			return nil, stop, fmt.Errorf("%s=%q: want host:port: %w", envCHAddr, addr, err)
		}
		set("CLICKHOUSE_HOST", host)
		set("CLICKHOUSE_PORT", port)
		set(envCHAddr, addr)
		if h := os.Getenv(envCHHTTPAddr); h != "" {
			set(envCHHTTPAddr, h)
		}
	} else {
		began := time.Now()
		// OUTBOX_TEST_NO_RESET_SHIELD=1 exposes the server's own native port
		// (see internal/localsvc/shield.go for why there is a shield).
		ch, err := localsvc.StartClickHouse(ctx, localsvc.ClickHouseOptions{BaseDir: baseDir, OnCrash: onCrash,
			Direct: os.Getenv("OUTBOX_TEST_NO_RESET_SHIELD") == "1"})
		if err != nil {
			return nil, stop, fmt.Errorf("start clickhouse: %w", err)
		}
		stops = append(stops, ch.Stop)
		logf("clickhouse %s at %s (native), %s (http), data %s, started in %v",
			ch.Version, ch.Addr(), ch.HTTPAddr(), ch.Dir, time.Since(began).Round(time.Millisecond))
		set("CLICKHOUSE_HOST", ch.Host)
		set("CLICKHOUSE_PORT", strconv.Itoa(ch.TCPPort))
		set(envCHAddr, ch.Addr())
		set(envCHHTTPAddr, ch.HTTPAddr())
	}
	set("CLICKHOUSE_PROTOCOL", "native")
	set("CLICKHOUSE_USER", "default")
	set("CLICKHOUSE_PASSWORD", "")

	// Legacy ClickHouse.
	if legacy {
		if addr := os.Getenv(envCHLegacyAddr); addr != "" {
			logf("clickhouse-legacy: using %s=%s from the environment", envCHLegacyAddr, addr)
			set(envCHLegacyAddr, addr)
		} else {
			began := time.Now()
			ch, err := localsvc.StartClickHouseLegacy(ctx, localsvc.ClickHouseOptions{BaseDir: baseDir, OnCrash: onCrash})
			if errors.Is(err, localsvc.ErrNotInstalled) {
				return nil, stop, fmt.Errorf("--legacy needs Debian's ClickHouse 18.16: run `apt-get install -y clickhouse-server` (as root): %w", err)
			}
			if err != nil {
				return nil, stop, fmt.Errorf("start legacy clickhouse: %w", err)
			}
			stops = append(stops, ch.Stop)
			logf("clickhouse-legacy %s at %s (native), %s (http), data %s, started in %v",
				ch.Version, ch.Addr(), ch.HTTPAddr(), ch.Dir, time.Since(began).Round(time.Millisecond))
			set(envCHLegacyAddr, ch.Addr())
		}
	}
	return env, stop, nil
}

// fetchPGMajors downloads the PostgreSQL majors of list ("all" or
// comma-separated numbers) unless they are cached.
func fetchPGMajors(ctx context.Context, list string) error {
	var majors []int
	if list == "all" {
		majors = localsvc.PGMajors()
	} else {
		for _, f := range strings.Split(list, ",") {
			m, err := strconv.Atoi(strings.TrimSpace(f))
			if err != nil || localsvc.PGDistVersion(m) == "" {
				return fmt.Errorf("--fetch-pg %q: want majors among %v or all", list, localsvc.PGMajors())
			}
			majors = append(majors, m)
		}
	}
	for _, m := range majors {
		began := time.Now()
		bin, err := localsvc.EnsurePGDist(ctx, m)
		if err != nil {
			return err
		}
		logf("postgres %d (%s %s) ready at %s (%v)", m, localsvc.PGDistPackage, localsvc.PGDistVersion(m), bin, time.Since(began).Round(time.Millisecond))
	}
	return nil
}

// envClusterAddrs lists every node of the --cluster cluster (native
// host:port, comma-separated, shard by shard, replica by replica).
const envClusterAddrs = "OUTBOX_TEST_CH_CLUSTER_ADDRS"

// startCluster starts the --cluster cluster and returns its variables: the
// cluster's name, its nodes, and CLICKHOUSE_HOST/PORT of the first node (the
// streamer connects to one node and reaches the others through the cluster).
func startCluster(ctx context.Context, kind localsvc.ClusterKind, baseDir string, onCrash func(*localsvc.Crash)) ([]string, func() error, error) {
	began := time.Now()
	c, err := localsvc.StartCluster(ctx, localsvc.ClusterOptions{Kind: kind, BaseDir: baseDir, OnCrash: onCrash})
	if errors.Is(err, localsvc.ErrNotInstalled) {
		return nil, func() error { return nil }, fmt.Errorf("--cluster %s needs packages this machine lacks (run make deps): %w", kind, err)
	}
	if err != nil {
		return nil, func() error { return nil }, fmt.Errorf("start the clickhouse cluster: %w", err)
	}
	logf("clickhouse cluster %q, %s: %d shard(s) × %d replica(s) at %s, started in %v",
		c.Name, kind, c.Shards, c.Replicas, strings.Join(c.Addrs(), ", "), time.Since(began).Round(time.Millisecond))
	first := c.Nodes[0]
	return []string{
		"CLICKHOUSE_CLUSTER=" + c.Name,
		"CLICKHOUSE_HOST=" + first.Host,
		"CLICKHOUSE_PORT=" + strconv.Itoa(first.TCPPort),
		envClusterAddrs + "=" + strings.Join(c.Addrs(), ","),
	}, c.Stop, nil
}

// runCommand runs args with env added to our environment and inherited
// stdio, and returns its exit code (128+signal if a signal ended it).
//
// The command stays in our process group, so a Ctrl-C on the terminal
// reaches it directly; we forward SIGINT only when stdin is not a terminal
// (then it was sent to us alone), so that it does not get two. SIGTERM and
// SIGHUP are always forwarded. Our servers run in process groups of their
// own and are stopped by us after the command has exited.
func runCommand(sigs <-chan os.Signal, args, env []string) int {
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.Env = append(os.Environ(), env...)
	// If we are killed outright the servers die with us; so should the
	// command that depends on them.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	if err := localsvc.StartChild(cmd); err != nil {
		logf("run %s: %v", args[0], err)
		return 127
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	interactive := isTerminal(os.Stdin)
	for {
		select {
		case sig := <-sigs:
			if sig == syscall.SIGINT && interactive {
				continue
			}
			_ = cmd.Process.Signal(sig)
		case err := <-done:
			var exitErr *exec.ExitError
			if errors.As(err, &exitErr) {
				if ws, ok := exitErr.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
					return 128 + int(ws.Signal())
				}
				return exitErr.ExitCode()
			}
			if err != nil {
				logf("run %s: %v", args[0], err)
				return 1
			}
			return 0
		}
	}
}

// isTerminal reports whether f is a character device (a terminal).
func isTerminal(f *os.File) bool {
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}

// signalExitCode is the shell's exit code for death by sig.
func signalExitCode(sig os.Signal) int {
	if s, ok := sig.(syscall.Signal); ok {
		return 128 + int(s)
	}
	return 1
}

// shellQuoteKV quotes the value of "K=V" for a POSIX shell.
func shellQuoteKV(kv string) string {
	k, v, _ := strings.Cut(kv, "=")
	return k + "='" + strings.ReplaceAll(v, "'", `'\''`) + "'"
}

// logf prints a status line to stderr, keeping stdout for the command.
func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "outbox-devenv: "+format+"\n", args...)
}
