// Command bench is `make bench`: it starts its own PostgreSQL and ClickHouse 26.7 as
// local processes, measures outbox-streamer against a bare slot reader (the
// ceiling) and the earlier polling design (the baseline), and prints one table of
// medians over repetitions, with the ratios and targets the design promises.
//
//	go build -o bin/outbox-bench ./cmd/outbox-bench && bin/outbox-bench --streamer bin/outbox-streamer
//	bin/outbox-bench --reps 1 --rows 20000 --big-tx 50000 --latency-duration 5s   # a quick smoke run
//
// Scenarios (each repetition runs them in this order, so that the ratios compare
// figures measured minutes apart rather than a whole run apart):
//
//	a   bare slot reader: pglogrepl + replication.Decoder over a committed backlog
//	b   polling baseline: SELECT ... FOR UPDATE SKIP LOCKED / insert / UPDATE rounds
//	c   the real binary draining the same backlog (defaults; c10k: with --large-ch-batch,
//	    by default CLICKHOUSE_BATCH_SIZE=1000, the default before round 2: no merging)
//	h   backfill: c's backlog committed before the slot exists, then the binary's
//	    first start (new slot, backfill, the sweep delivers)
//	g   the real peer: ClickHouse's own MaterializedPostgreSQL database engine on c's
//	    backlog (from the WAL like c: started on the empty table, paused by holding
//	    its slot, resumed after the backlog; and, apart, its snapshot copy of the
//	    committed backlog), d's producer and, for at most 20 s, e's paced producer
//	d   the real binary while loadgen writes as fast as it can
//	e   commit → ClickHouse latency at a fixed rate (er: with retention)
//	f   the binary's peak RSS through one very large transaction, and how long after
//	    its commit it is all in ClickHouse
//
// Every scenario run verifies its delivery (ClickHouse holds every committed row
// exactly once, every outbox row is processed, the slot is past the last commit;
// for g: the peer's table, read with FINAL, holds every committed id once).
// go test -run TestBenchSmoke ./cmd/outbox-bench runs all of them once with tiny sizes.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/localsvc"
)

// benchConfig is what one benchmark run does.
type benchConfig struct {
	Reps            int           `json:"repetitions"`
	Rows            int           `json:"backlog_rows"`
	TxSize          int           `json:"backlog_tx_size"`
	PollBatch       int           `json:"poll_batch"`
	CHBatchLarge    int           `json:"large_clickhouse_batch_size"`
	LiveConns       int           `json:"live_producer_connections"`
	LatencyRate     float64       `json:"latency_rate"`
	LatencyTx       int           `json:"latency_tx_size"`
	LatencyWorkers  int           `json:"latency_producer_connections"`
	LatencyDuration time.Duration `json:"latency_duration_ns"`
	LatencyPoll     time.Duration `json:"latency_poll_interval_ns"`
	BigTx           int           `json:"memory_tx_rows"`
	MixedRate       float64       `json:"mixed_rate"`
	MixedBigTx      int           `json:"mixed_big_tx_rows"`
	Scenarios       string        `json:"scenarios"`
	Timeout         time.Duration `json:"timeout_ns"`
	Streamer        string        `json:"streamer"`
	PGDurable       bool          `json:"pg_durable"`
	PGAsyncCommit   bool          `json:"pg_async_commit"`
	PGSettings      settingsFlag  `json:"pg_settings,omitempty"`
	OutboxDDL       ddlFlag       `json:"outbox_ddl,omitempty"`
	JSONPath        string        `json:"-"`
	ProfileDir      string        `json:"-"`
	WorkDir         string        `json:"-"`
}

func defaultConfig() benchConfig {
	return benchConfig{
		Reps: 3, Rows: 500_000, TxSize: 1000, PollBatch: 1000, CHBatchLarge: 1000, LiveConns: 1,
		LatencyRate: 5000, LatencyTx: 10, LatencyWorkers: 2, LatencyDuration: time.Minute, LatencyPoll: 15 * time.Millisecond,
		BigTx: 1_000_000, MixedRate: 2000, MixedBigTx: 300_000, Scenarios: "a,b,c,c10k,d,e,er,f,f1,m,m1,g,h", Timeout: 15 * time.Minute,
		Streamer: "bin/outbox-streamer",
	}
}

func (c *benchConfig) bind(fs *flag.FlagSet) {
	fs.IntVar(&c.Reps, "reps", c.Reps, "repetitions; every figure is the median over them")
	fs.IntVar(&c.Rows, "rows", c.Rows, "backlog rows for a, b, c, g, h, and events written in d and g")
	fs.IntVar(&c.TxSize, "tx-size", c.TxSize, "rows per transaction of the backlog (a, b, c) and of the live producer (d)")
	fs.IntVar(&c.PollBatch, "poll-batch", c.PollBatch, "LIMIT of one polling round (b)")
	fs.IntVar(&c.CHBatchLarge, "large-ch-batch", c.CHBatchLarge, "CLICKHOUSE_BATCH_SIZE of the second drain (c10k, shown as c'; default 1000: the old default, without merging); 0 skips it")
	fs.IntVar(&c.LiveConns, "live-conns", c.LiveConns, "connections of the live producer (d)")
	fs.Float64Var(&c.LatencyRate, "latency-rate", c.LatencyRate, "events per second of the latency producer (e)")
	fs.IntVar(&c.LatencyTx, "latency-tx", c.LatencyTx, "events per transaction of the latency producer (e)")
	fs.IntVar(&c.LatencyWorkers, "latency-conns", c.LatencyWorkers, "connections of the latency producer (e), sharing one schedule")
	fs.DurationVar(&c.LatencyDuration, "latency-duration", c.LatencyDuration, "how long the latency producer runs (e)")
	fs.DurationVar(&c.LatencyPoll, "latency-poll", c.LatencyPoll, "how often the latency scenario polls ClickHouse for new events (e)")
	fs.IntVar(&c.BigTx, "big-tx", c.BigTx, "rows of the single transaction of the memory scenario (f)")
	fs.Float64Var(&c.MixedRate, "mixed-rate", c.MixedRate, "events per second of the small transactions of the mixed load (m), for --latency-duration")
	fs.IntVar(&c.MixedBigTx, "mixed-big-tx", c.MixedBigTx, "rows of the big transaction committed in the middle of the mixed load (m)")
	fs.StringVar(&c.Scenarios, "scenarios", c.Scenarios, "comma-separated subset of a,b,c,c10k,d,e,er,f,f1,m,m1,g,h, and eh (not run by default: e with STANDBY_HOLD naming a local physical standby, which then runs for every scenario; run e,eh to compare) (empty: none, e.g. with --profile)")
	fs.DurationVar(&c.Timeout, "timeout", c.Timeout, "bound on one scenario's wait for delivery")
	fs.StringVar(&c.Streamer, "streamer", c.Streamer, "the outbox-streamer binary (make build)")
	fs.BoolVar(&c.PGDurable, "pg-durable", c.PGDurable, "run PostgreSQL with fsync and full_page_writes on (default: off, localsvc's Durable: false); synchronous_commit is on either way")
	fs.BoolVar(&c.PGAsyncCommit, "pg-async-commit", c.PGAsyncCommit, "synchronous_commit=off (logical decoding then waits for the WAL writer: adds up to ~600 ms of latency)")
	fs.Var(&c.OutboxDDL, "outbox-ddl", "SQL run on every fresh outbox database after the migrations (repeatable), to measure a schema variant")
	fs.Var(&c.PGSettings, "pg-setting", "extra PostgreSQL setting name=value (repeatable), e.g. shared_preload_libraries=pg_stat_statements")
	fs.StringVar(&c.JSONPath, "json", c.JSONPath, "also write the results as JSON to this file")
	fs.StringVar(&c.ProfileDir, "profile", c.ProfileDir, "after the table, drain the backlog once more with the pipeline in-process under pprof (CPU and allocations) and write the profiles here")
	fs.StringVar(&c.WorkDir, "workdir", c.WorkDir, "directory for the streamer's logs (default: a new temporary directory)")
}

// settingsFlag collects repeated name=value flags.
type settingsFlag []string

func (f *settingsFlag) String() string { return strings.Join(*f, ",") }

func (f *settingsFlag) Set(v string) error {
	if k, _, ok := strings.Cut(v, "="); !ok || k == "" {
		return fmt.Errorf("want name=value, got %q", v)
	}
	*f = append(*f, v)
	return nil
}

// ddlFlag collects repeated SQL statements.
type ddlFlag []string

func (f *ddlFlag) String() string { return strings.Join(*f, "; ") }

func (f *ddlFlag) Set(v string) error {
	*f = append(*f, v)
	return nil
}

func (c *benchConfig) has(s string) bool {
	for _, x := range strings.Split(c.Scenarios, ",") {
		if strings.TrimSpace(x) == s {
			return true
		}
	}
	return false
}

// scenario is one row group of the table.
type scenario struct {
	key  string
	name string
	run  func(ctx context.Context, b *bench) (map[string]float64, error)
}

func scenarios(c *benchConfig) []scenario {
	all := []scenario{
		{"a", "bare slot reader", runBareReader},
		{"b", "polling baseline", runPoller},
		{"c", "streamer drain, defaults", func(ctx context.Context, b *bench) (map[string]float64, error) {
			return runDrain(ctx, b, "c")
		}},
		{"c10k", fmt.Sprintf("streamer drain, CLICKHOUSE_BATCH_SIZE=%d", c.CHBatchLarge), func(ctx context.Context, b *bench) (map[string]float64, error) {
			return runDrain(ctx, b, "c10k", fmt.Sprintf("CLICKHOUSE_BATCH_SIZE=%d", c.CHBatchLarge))
		}},
		{"h", "streamer backfill of a backlog older than the slot", runBackfill},
		{"g", "peer: ClickHouse MaterializedPostgreSQL", runPeer},
		{"d", "streamer live", runLive},
		{"e", "latency", runLatency},
		{"er", "latency with retention", runLatencyRetention},
		{"eh", "latency with STANDBY_HOLD", func(ctx context.Context, b *bench) (map[string]float64, error) {
			return runLatencyWith(ctx, b, "eh", false, "STANDBY_HOLD="+benchStandby)
		}},
		{"f", "memory, one big transaction (protocol 2)", func(ctx context.Context, b *bench) (map[string]float64, error) {
			return runMemory(ctx, b, "f")
		}},
		{"f1", "memory, one big transaction (protocol 1)", func(ctx context.Context, b *bench) (map[string]float64, error) {
			return runMemory(ctx, b, "f1", "REPLICATION_STREAMING=off")
		}},
		{"m", "mixed load: small transactions and a big one (protocol 2)", func(ctx context.Context, b *bench) (map[string]float64, error) {
			return runMixed(ctx, b, "m")
		}},
		{"m1", "mixed load: small transactions and a big one (protocol 1)", func(ctx context.Context, b *bench) (map[string]float64, error) {
			return runMixed(ctx, b, "m1", "REPLICATION_STREAMING=off")
		}},
	}
	var out []scenario
	for _, s := range all {
		if s.key == "c10k" && c.CHBatchLarge <= 0 {
			continue
		}
		if c.has(s.key) {
			out = append(out, s)
		}
	}
	return out
}

// bench is one benchmark run.
type bench struct {
	cfg     benchConfig
	srv     *servers
	workDir string
	log     io.Writer // progress

	mu      sync.Mutex
	results map[string][]map[string]float64 // per scenario, per repetition
	cpu     map[string][]cpuUse
	errs    []string // every failed scenario run
	dropped int      // how many of them left no figures (the others only left rows unmarked)
	profile *profileResult
}

func newBench(cfg benchConfig, srv *servers, progress io.Writer) (*bench, error) {
	dir := cfg.WorkDir
	if dir == "" {
		var err error
		if dir, err = os.MkdirTemp("", "outbox-bench-"); err != nil {
			return nil, err
		}
	} else if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	return &bench{cfg: cfg, srv: srv, workDir: dir, log: progress,
		results: map[string][]map[string]float64{}, cpu: map[string][]cpuUse{}}, nil
}

func (b *bench) logPath(key string) string { return filepath.Join(b.workDir, "streamer-"+key+".log") }

func (b *bench) note(key string, u cpuUse) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.cpu[key] = append(b.cpu[key], u)
}

func (b *bench) progressf(format string, args ...any) {
	fmt.Fprintf(b.log, "[%s] %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, args...))
}

// run runs every repetition of every selected scenario. A failed scenario is
// recorded and the others go on; the error lists the failures.
func (b *bench) run(ctx context.Context) error {
	list := scenarios(&b.cfg)
	b.srv.fillVersions(ctx)
	for rep := 1; rep <= b.cfg.Reps; rep++ {
		for _, s := range list {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if err := b.srv.reviveCrashed(ctx); err != nil {
				return err
			}
			b.progressf("repetition %d/%d: %s %s ...", rep, b.cfg.Reps, s.key, s.name)
			began := time.Now()
			m, err := s.run(ctx, b)
			if err != nil {
				msg := fmt.Sprintf("repetition %d, %s (%s): %v", rep, s.key, s.name, err)
				switch {
				case m != nil && isPartial(err):
					msg += " (the figures of its parts that completed are kept)"
				case m != nil:
					msg += " (its figures are kept: the delivery itself was complete)"
				}
				b.errs = append(b.errs, msg)
				b.progressf("FAILED %s", msg)
				if m == nil {
					b.dropped++
					continue
				}
			}
			if b.results[s.key] == nil {
				b.results[s.key] = make([]map[string]float64, b.cfg.Reps)
			}
			b.results[s.key][rep-1] = m
			b.progressf("repetition %d/%d: %s done in %s: %s", rep, b.cfg.Reps, s.key, time.Since(began).Round(time.Second), brief(s.key, m))
		}
	}
	if len(b.errs) > 0 {
		return fmt.Errorf("%d scenario runs failed:\n  %s", len(b.errs), strings.Join(b.errs, "\n  "))
	}
	return nil
}

// brief is a one-line progress summary of a scenario's figures.
func brief(key string, m map[string]float64) string {
	switch key {
	case "a", "b", "c", "c10k", "h":
		return fmt.Sprintf("%.0f rows/s", m["rows_per_s"])
	case "d":
		return fmt.Sprintf("producer %.0f rows/s, delivery %.0f rows/s, tail %.0f ms", m["producer_rows_per_s"], m["delivery_rows_per_s"], m["tail_after_producer_s"]*1000)
	case "e", "eh":
		return fmt.Sprintf("p50 %.0f ms, p99 %.0f ms, max %.0f ms over %.0f events", m["p50_ms"], m["p99_ms"], m["max_ms"], m["events"])
	case "m", "m1":
		return fmt.Sprintf("small events p50 %.0f ms, p99 %.0f ms, max %.0f ms; big tx in ClickHouse %.1f s after its commit; PostgreSQL spilled %.0f MiB, streamed %.0f MiB; local spill %.0f MiB; peak RSS %.1f MiB",
			m["small_p50_ms"], m["small_p99_ms"], m["small_max_ms"], m["big_ch_visible_s"], m["pg_spill_mib"], m["pg_stream_mib"], m["local_spill_mib"], m["peak_rss_mib"])
	case "f", "f1":
		return fmt.Sprintf("peak RSS %.1f MiB, all in ClickHouse %.1f s after the commit; PostgreSQL spilled %.0f MiB, streamed %.0f MiB; local spill %.0f MiB",
			m["peak_rss_mib"], m["ch_visible_s"], m["pg_spill_mib"], m["pg_stream_mib"], m["local_spill_mib"])
	case "g":
		var parts []string
		if v, ok := m["rows_per_s"]; ok {
			parts = append(parts, fmt.Sprintf("drain from the WAL %.0f rows/s", v))
		}
		if v, ok := m["snapshot_rows_per_s"]; ok {
			parts = append(parts, fmt.Sprintf("snapshot copy %.0f rows/s", v))
		}
		if v, ok := m["delivery_rows_per_s"]; ok {
			parts = append(parts, fmt.Sprintf("live: producer %.0f rows/s, delivery %.0f rows/s", m["producer_rows_per_s"], v))
		}
		if v, ok := m["latency_p99_ms"]; ok {
			parts = append(parts, fmt.Sprintf("latency p50 %.0f ms, p99 %.0f ms over %.0f events", m["latency_p50_ms"], v, m["latency_events"]))
		}
		return strings.Join(parts, "; ")
	}
	return ""
}

// benchStandby is the physical slot (and application_name) of the standby
// scenario eh holds delivery for.
const benchStandby = "bench_standby"

// startServers starts the local PostgreSQL and ClickHouse 26.7 the bench runs
// on, and a physical standby of the PostgreSQL when scenario eh runs.
func startServers(ctx context.Context, cfg benchConfig, stderr io.Writer) (*servers, func(), error) {
	// A server that dies mid-run fails that scenario; its report says why
	// (the harness removes its logs when the bench ends).
	onCrash := func(c *localsvc.Crash) { fmt.Fprintf(stderr, "outbox-bench: %v\n", c) }
	opts := localsvc.PostgresOptions{Durable: cfg.PGDurable, Settings: map[string]string{}, OnCrash: onCrash}
	if cfg.PGAsyncCommit {
		opts.Settings["synchronous_commit"] = "off"
	} else {
		// Explicitly on (PostgreSQL's default, and what applications run with):
		// logical decoding reads only flushed WAL, so with it off every commit
		// would wait for the WAL writer before the walsender sends it. With fsync
		// off its flush costs no disk wait.
		opts.Settings["synchronous_commit"] = "on"
	}
	for _, kv := range cfg.PGSettings {
		k, v, _ := strings.Cut(kv, "=")
		opts.Settings[k] = v
	}
	pg, err := localsvc.StartPostgres(ctx, opts)
	if err != nil {
		return nil, nil, fmt.Errorf("start PostgreSQL: %w", err)
	}
	var standby *localsvc.Postgres
	if cfg.has("eh") {
		// For every scenario of the run, so that e and eh differ only by the hold.
		if standby, err = pg.StartStandby(ctx, localsvc.StandbyOptions{Slot: benchStandby}); err != nil {
			_ = pg.Stop()
			return nil, nil, fmt.Errorf("start a standby: %w", err)
		}
	}
	// Direct: the reset shield's forwarding would cost throughput. A streamer
	// stopped while a ClickHouse reply is in flight resets that connection,
	// which aborts this chDB build's server (see localsvc's resetShield): the
	// scenarios stop the binary only once its client has connected, and the
	// run loop starts a crashed server again (servers.reviveCrashed).
	ch, err := localsvc.StartClickHouse(ctx, localsvc.ClickHouseOptions{Direct: true, OnCrash: onCrash})
	stop := func() {
		if ch != nil {
			_ = ch.Stop()
		}
		if standby != nil {
			_ = standby.Stop()
		}
		_ = pg.Stop()
	}
	if err != nil {
		ch = nil
		stop()
		return nil, nil, fmt.Errorf("start ClickHouse: %w", err)
	}
	revive := func(ctx context.Context) error {
		var errs []error
		if pg.Crash() != nil {
			errs = append(errs, pg.Start(ctx))
		}
		if ch.Crash() != nil {
			errs = append(errs, ch.Start(ctx))
		}
		return errors.Join(errs...)
	}
	return &servers{PGDSN: pg.DSN(), PGVersion: pg.Version, CHAddr: ch.Addr(), CHVersion: ch.Version, CHLog: ch.LogPath,
		OutboxDDL: cfg.OutboxDDL, revive: revive}, stop, nil
}

func main() {
	localsvc.RunCHDBLauncherIfRequested()
	os.Exit(realMain(os.Args[1:], os.Stdout, os.Stderr))
}

func realMain(args []string, stdout, stderr io.Writer) int {
	cfg := defaultConfig()
	fs := flag.NewFlagSet("outbox-bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	cfg.bind(fs)
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if cfg.Reps < 1 || cfg.Rows < 1 || cfg.TxSize < 1 || cfg.PollBatch < 1 || cfg.LatencyRate <= 0 || cfg.LatencyTx < 1 ||
		cfg.LatencyWorkers < 1 || cfg.LatencyPoll <= 0 || cfg.LiveConns < 1 || cfg.BigTx < 1 {
		fmt.Fprintln(stderr, "outbox-bench: sizes, rates and repetitions must be positive")
		return 2
	}
	needsBinary := cfg.has("c") || cfg.has("c10k") || cfg.has("d") || cfg.has("e") || cfg.has("eh") || cfg.has("er") || cfg.has("f") || cfg.has("f1") || cfg.has("m") || cfg.has("m1") || cfg.has("h")
	if needsBinary {
		abs, err := filepath.Abs(cfg.Streamer)
		if err == nil {
			_, err = os.Stat(abs)
		}
		if err != nil {
			fmt.Fprintf(stderr, "outbox-bench: streamer binary %s: %v (run make build, or pass --streamer)\n", cfg.Streamer, err)
			return 2
		}
		cfg.Streamer = abs
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	facts := machineFacts()
	fmt.Fprintf(stderr, "outbox-bench: starting PostgreSQL and ClickHouse (load average %s)\n", facts.LoadStart)
	sctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	srv, stopServers, err := startServers(sctx, cfg, stderr)
	cancel()
	if err != nil {
		fmt.Fprintf(stderr, "outbox-bench: %v\n", err)
		return 1
	}
	defer stopServers()
	b, err := newBench(cfg, srv, stderr)
	if err != nil {
		fmt.Fprintf(stderr, "outbox-bench: %v\n", err)
		return 1
	}
	fmt.Fprintf(stderr, "outbox-bench: PostgreSQL %s, ClickHouse %s; streamer logs in %s\n", srv.PGVersion, srv.CHVersion, b.workDir)
	began := time.Now()
	runErr := b.run(ctx)
	if cfg.ProfileDir != "" && ctx.Err() == nil {
		if err := b.runProfile(ctx); err != nil {
			runErr = fmt.Errorf("%v\nprofile: %w", runErr, err)
		}
	}
	facts.LoadEnd = loadAverage()
	rep := b.report(facts, args, time.Since(began))
	rep.printTable(stdout)
	if b.profile != nil {
		b.profile.print(stdout)
	}
	if cfg.JSONPath != "" {
		if err := rep.writeJSON(cfg.JSONPath); err != nil {
			fmt.Fprintf(stderr, "outbox-bench: %v\n", err)
			return 1
		}
	}
	if runErr != nil {
		fmt.Fprintf(stderr, "outbox-bench: %v\n", runErr)
		return 1
	}
	return 0
}
