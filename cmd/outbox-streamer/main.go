// Command outbox-streamer delivers events from the PostgreSQL transactional outbox
// (event_outbox) into ClickHouse through a pgoutput logical replication slot.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"go.uber.org/zap"

	"github.com/outbox-streamer/outbox-streamer/internal/config"
	"github.com/outbox-streamer/outbox-streamer/replication"
)

const usage = `outbox-streamer moves events from the PostgreSQL outbox table event_outbox into the
ClickHouse table event_log through logical replication (pgoutput).

Usage:
  outbox-streamer run [flags]              stream inserts into ClickHouse until SIGTERM
                                           (one leader per slot; others wait as standby)
  outbox-streamer run --sweep [flags]      deliver due failed rows once, print a summary
  outbox-streamer migrate up|down|status|force
                                           apply, roll back (one step, needs --yes), show or
                                           force the migrations of both databases
  outbox-streamer status [flags]           show the slot and the outbox's state
  outbox-streamer dead-letters list|requeue  inspect and re-drive rows that exhausted attempts
  outbox-streamer failures [--json] [--limit N] [--type T]
                                           why rows failed: failed and dead rows grouped by
                                           reason, then the rows with attempts and next attempt
  outbox-streamer prune [--older-than DUR] [--dry-run]
                                           remove processed rows older than OUTBOX_RETENTION once
  outbox-streamer verify [--since DUR|--from TIME] [--until TIME] [--bucket DUR] [--json] [--repair]
                                           check that ClickHouse holds every outbox row once;
                                           exit 1 when something differs
  outbox-streamer demo [flags]             write demo events and show them arrive in ClickHouse
  outbox-streamer healthcheck              probe the local /healthz (for container health checks)
  outbox-streamer version [--json]         print the version (also: --version)

Every command takes the settings below as flags or environment variables;
"outbox-streamer COMMAND --help" shows the command's synopsis and the settings it reads.

`

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprint(stdout, usage)
		fs := flag.NewFlagSet("outbox-streamer", flag.ContinueOnError)
		src := config.NewSource(fs, nil)
		config.Bind(src, &config.Config{})
		src.PrintUsage(stdout)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	var err error
	switch args[0] {
	case "run":
		err = cmdRun(args[1:], stdout, stderr)
	case "migrate":
		err = cmdMigrate(args[1:], stdout, stderr)
	case "status":
		err = cmdStatus(args[1:], stdout, stderr)
	case "demo":
		err = cmdDemo(args[1:], stdout, stderr)
	case "dead-letters":
		err = cmdDeadLetters(args[1:], stdout, stderr)
	case "failures":
		err = cmdFailures(args[1:], stdout, stderr)
	case "prune":
		err = cmdPrune(args[1:], stdout, stderr)
	case "verify":
		err = cmdVerify(args[1:], stdout, stderr)
	case "healthcheck":
		err = cmdHealthcheck(args[1:], stdout, stderr)
	case "version", "--version", "-version":
		err = cmdVersion(args[1:], stdout)
	default:
		fmt.Fprintf(stderr, "outbox-streamer: unknown command %q (want run, migrate, status, dead-letters, failures, prune, verify, demo, healthcheck or version; see --help)\n", args[0])
		return 2
	}
	var exit exitCode
	var usage usageError
	switch {
	case errors.As(err, &usage):
		fmt.Fprintf(stderr, "outbox-streamer %v\n", usage)
		return 2
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		return 0
	case errors.As(err, &exit):
		return int(exit)
	}
	var pre *replication.PreconditionError
	if errors.As(err, &pre) {
		fmt.Fprintf(stderr, "outbox-streamer: %s\n  fix: %s\n", pre.Problem, pre.Hint)
		return 1
	}
	fmt.Fprintf(stderr, "outbox-streamer: %s\n", describe(err))
	return 1
}

// describe is err as the one line a command ends with. A login PostgreSQL
// refused names the user and server (pgx lists every address it tried, TLS
// first, on lines of their own); other multi-line errors are joined.
func describe(err error) string {
	var ce *pgconn.ConnectError
	var pgErr *pgconn.PgError
	if errors.As(err, &ce) && errors.As(err, &pgErr) && strings.HasPrefix(pgErr.Code, "28") && ce.Config != nil {
		addr := net.JoinHostPort(ce.Config.Host, strconv.Itoa(int(ce.Config.Port)))
		return fmt.Sprintf("postgres at %s rejected user %q for database %q: %s (%s); check DATABASE_URL or POSTGRES_*",
			addr, ce.Config.User, ce.Config.Database, pgErr.Message, pgErr.Code)
	}
	lines := strings.Split(strings.TrimSpace(err.Error()), "\n")
	for i := range lines {
		lines[i] = strings.TrimSpace(lines[i])
	}
	return strings.Join(lines, " ")
}

// cmdVersion prints the version, or with --json the version and the Go
// release it was built with.
func cmdVersion(args []string, stdout io.Writer) error {
	if len(args) == 1 && (args[0] == "-h" || args[0] == "--help") {
		fmt.Fprintln(stdout, "Usage: outbox-streamer version [--json]")
		return nil
	}
	if len(args) == 1 && (args[0] == "--json" || args[0] == "-json") {
		return json.NewEncoder(stdout).Encode(map[string]string{"version": version, "go": runtime.Version()})
	}
	if len(args) > 0 {
		return usageError{command: "version", err: fmt.Errorf("takes no arguments but --json (got %q)", strings.Join(args, " "))}
	}
	fmt.Fprintln(stdout, "outbox-streamer", version)
	return nil
}

// exitCode ends the process with a code and no further message.
type exitCode int

func (e exitCode) Error() string { return fmt.Sprintf("exit %d", int(e)) }

// loadConfig parses a command's flags and the environment. --help prints the
// command's flags to stdout; a flag error is returned as a usageError (one
// line, exit 2) instead of a dump of every setting.
func loadConfig(name string, args []string, stdout io.Writer, extra func(*flag.FlagSet)) (*config.Config, *flag.FlagSet, error) {
	fs := flag.NewFlagSet("outbox-streamer "+name, flag.ContinueOnError)
	fs.SetOutput(io.Discard) // the error is reported once, by run
	if extra != nil {
		extra(fs)
	}
	cfg, src, err := config.Load(fs, args, os.LookupEnv)
	switch {
	case errors.Is(err, flag.ErrHelp):
		printCommandHelp(stdout, name, src)
		return nil, fs, err
	case config.IsFlagError(err):
		return nil, fs, usageError{command: name, err: err}
	case err != nil:
		return nil, fs, err
	}
	return cfg, fs, nil
}

// usageError is a command line that does not parse.
type usageError struct {
	command string
	err     error
}

func (e usageError) Error() string {
	return fmt.Sprintf("%s: %v (see outbox-streamer %s --help)", e.command, e.err, e.command)
}

// connectPostgres opens one plain connection for a short command, bounded by timeout.
func connectPostgres(cfg *config.Config, timeout time.Duration) (*pgx.Conn, context.Context, func(), error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	conn, err := pgx.Connect(ctx, cfg.PostgresDSN)
	if err != nil {
		cancel()
		return nil, nil, nil, fmt.Errorf("connect to postgres: %w", err)
	}
	return conn, ctx, func() { conn.Close(context.Background()); cancel() }, nil
}

// signalContext returns the two shutdown contexts: drain ends at the first
// SIGINT/SIGTERM (stop reading, flush the open batch), abandon at the second (stop
// without draining). abandon is drain's parent, so ending it ends both.
func signalContext(log *zap.Logger) (drain, abandon context.Context, stop func()) {
	abandon, cancelAbandon := context.WithCancel(context.Background())
	drain, cancelDrain := context.WithCancel(abandon)
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		s, ok := <-sigs
		if !ok {
			return
		}
		log.Info("stopping: flushing the open batch (signal again to abandon it)", zap.String("signal", s.String()))
		cancelDrain()
		if _, ok := <-sigs; ok {
			log.Warn("second signal: stopping without draining")
			cancelAbandon()
		}
	}()
	return drain, abandon, func() { signal.Stop(sigs); close(sigs); cancelAbandon() }
}
