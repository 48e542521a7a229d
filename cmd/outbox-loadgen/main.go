// Command outbox-loadgen writes synthetic events into the outbox table
// event_outbox, through package outbox, to load outbox-streamer: at a given
// rate, in transactions of a given size, some rolled back on purpose. It
// prints a progress line per second and a summary, and stops cleanly on
// SIGINT or SIGTERM (a second signal quits at once).
//
// The generator itself is package internal/loadgen, which tests drive
// directly.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/loadgen"
	"github.com/outbox-streamer/outbox-streamer/outbox"
)

const usage = `outbox-loadgen writes synthetic events into the outbox table event_outbox.

Usage:
  outbox-loadgen [flags]

It runs until --count events are committed, --duration passes or it is
interrupted, printing a progress line per second and a summary.

Flags:
`

func main() {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		<-sigs
		fmt.Fprintln(os.Stderr, "outbox-loadgen: stopping after the open transactions (signal again to quit at once)")
		cancel()
		<-sigs
		os.Exit(130)
	}()
	os.Exit(run(ctx, os.Args[1:], os.Stdout, os.Stderr, os.Getenv))
}

// run is the command without the process around it: it parses args, runs the
// load and returns the exit code.
func run(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) int {
	fs := flag.NewFlagSet("outbox-loadgen", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), usage)
		fs.PrintDefaults()
	}
	var cfg loadgen.Config
	var dsn string
	var maxContext int
	var legacy bool
	fs.Float64Var(&cfg.Rate, "rate", 0, "events per second, committed or rolled back (0: as fast as possible)")
	fs.IntVar(&cfg.TxSize, "tx-size", 10, "events per transaction")
	fs.Float64Var(&cfg.RollbackFraction, "rollback-fraction", 0, "share of transactions rolled back instead of committed (0 to 1)")
	fs.IntVar(&cfg.Connections, "connections", 4, "transactions in flight at once, one connection each")
	fs.DurationVar(&cfg.Duration, "duration", 0, "stop after this long (0: no limit)")
	fs.Int64Var(&cfg.Count, "count", 0, "stop once this many events are committed (0: no limit)")
	fs.BoolVar(&cfg.Copy, "copy", false, "write each transaction's events with one COPY (outbox.AppendBatch) instead of one INSERT per event")
	fs.StringVar(&dsn, "dsn", getenv("DATABASE_URL"), "PostgreSQL connection string (default $DATABASE_URL)")
	fs.Int64Var(&cfg.Seed, "seed", 0, "random seed (0: derived from the clock; the summary prints it)")
	fs.StringVar(&cfg.Environment, "environment", "loadgen", "the events' environment")
	fs.IntVar(&cfg.ContextBytes, "context-bytes", 0, "pad each event's context to about this many bytes")
	fs.BoolVar(&cfg.KeepGoing, "keep-going", false, "count failed transactions and carry on instead of stopping at the first")
	fs.IntVar(&maxContext, "max-context-bytes", outbox.DefaultMaxContextBytes, "largest context accepted (as the streamer's EVENT_MAX_CONTEXT_BYTES)")
	fs.BoolVar(&legacy, "legacy-clickhouse", false, "validate event times for a legacy ClickHouse DateTime (1970-2106)")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "outbox-loadgen: unexpected arguments %q\n", fs.Args())
		return 2
	}
	if dsn == "" {
		fmt.Fprintln(stderr, "outbox-loadgen: no database: set --dsn or DATABASE_URL")
		return 2
	}
	if cfg.Seed == 0 {
		cfg.Seed = time.Now().UnixNano()
	}
	cfg.Writer = outbox.New(outbox.Options{MaxContextBytes: maxContext, LegacyClickHouse: legacy})
	if err := cfg.Validate(); err != nil {
		fmt.Fprintf(stderr, "outbox-loadgen: %v\n", err)
		return 2
	}

	pool, err := connect(ctx, dsn, cfg.Connections)
	if err != nil {
		fmt.Fprintf(stderr, "outbox-loadgen: %v\n", err)
		return 1
	}
	defer pool.Close()

	var last loadgen.Stats
	stats, err := loadgen.Run(ctx, pool, cfg, func(s loadgen.Stats) {
		// The rate shown is that of the last interval; the summary gives the
		// average.
		rate := float64(s.Committed-last.Committed) / (s.Elapsed - last.Elapsed).Seconds()
		fmt.Fprintf(stdout, "[%6.1fs] committed %d events (%.0f/s), rolled back %d, failed %d, in doubt %d\n",
			s.Elapsed.Seconds(), s.Committed, rate, s.RolledBack, s.Failed, s.InDoubt)
		last = s
	})
	fmt.Fprintf(stdout, "done in %s: committed %d events in %d transactions (%.0f events/s), rolled back %d events in %d transactions, failed %d events in %d transactions, in doubt %d events (seed %d)\n",
		stats.Elapsed.Round(time.Millisecond), stats.Committed, stats.CommittedTx, stats.Rate(),
		stats.RolledBack, stats.RolledBackTx, stats.Failed, stats.FailedTx, stats.InDoubt, cfg.Seed)
	if err != nil {
		fmt.Fprintf(stderr, "outbox-loadgen: %v\n", err)
		return 1
	}
	return 0
}

// connect opens a pool with a connection per concurrent transaction and
// checks that the database answers, so that a wrong DSN fails at once.
func connect(ctx context.Context, dsn string, conns int) (*pgxpool.Pool, error) {
	pcfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		return nil, fmt.Errorf("invalid --dsn: %w", err)
	}
	pcfg.MaxConns = int32(conns)
	pool, err := pgxpool.NewWithConfig(ctx, pcfg)
	if err != nil {
		return nil, fmt.Errorf("connect to postgres: %w", err)
	}
	pingCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := pool.Ping(pingCtx); err != nil {
		pool.Close()
		return nil, fmt.Errorf("connect to postgres %s: %w", pcfg.ConnConfig.Host, err)
	}
	return pool, nil
}
