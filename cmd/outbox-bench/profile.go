package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/outbox-streamer/outbox-streamer/internal/config"
	"github.com/outbox-streamer/outbox-streamer/internal/metrics"
	"github.com/outbox-streamer/outbox-streamer/internal/pipeline"
	"github.com/outbox-streamer/outbox-streamer/internal/record"
	"github.com/outbox-streamer/outbox-streamer/internal/service"
)

// The profile run: scenario c once more, with the pipeline in this process
// (pipeline.Stream, configured exactly as `outbox-streamer run` configures it from
// its defaults) under runtime/pprof, and the ClickHouse writer wrapped to count the
// inserts. It is not part of the table: it explains it.

type profileRun struct {
	Name          string             `json:"name"`
	RowsPerS      float64            `json:"rows_per_s"`
	Seconds       float64            `json:"seconds"`
	Inserts       int                `json:"clickhouse_inserts"`
	RowsPerInsert float64            `json:"rows_per_insert_mean"`
	MaxInsert     int                `json:"rows_per_insert_max"`
	InsertSeconds float64            `json:"seconds_in_clickhouse_insert"`
	CPUProfile    string             `json:"cpu_profile"`
	AllocBase     string             `json:"allocs_profile_base"`
	AllocProfile  string             `json:"allocs_profile"`
	CPU           map[string]float64 `json:"cpu_cores"`
	CPUTop        string             `json:"cpu_top"`
	PGStatements  string             `json:"pg_statements,omitempty"`
	AllocTop      string             `json:"alloc_space_top"`
}

type profileResult struct {
	Dir  string       `json:"dir"`
	Runs []profileRun `json:"runs"`
}

// countingSink measures the ClickHouse inserts the writer makes.
type countingSink struct {
	pipeline.Sink
	mu      sync.Mutex
	inserts int
	rows    int
	max     int
	took    time.Duration
}

func (c *countingSink) Insert(ctx context.Context, evs []record.Event) error {
	t := time.Now()
	err := c.Sink.Insert(ctx, evs)
	d := time.Since(t)
	c.mu.Lock()
	c.inserts++
	c.rows += len(evs)
	c.max = max(c.max, len(evs))
	c.took += d
	c.mu.Unlock()
	return err
}

// inProcessConfig is what `outbox-streamer run` would run with env: the binary's
// own mapping (service.PipelineConfig), with metrics.
func inProcessConfig(env []string) (pipeline.Config, error) {
	vars := map[string]string{}
	for _, kv := range env {
		k, v, _ := strings.Cut(kv, "=")
		vars[k] = v
	}
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	cfg, _, err := config.Load(fs, nil, func(k string) (string, bool) { v, ok := vars[k]; return v, ok })
	if err != nil {
		return pipeline.Config{}, err
	}
	pcfg := service.PipelineConfig(cfg)
	pcfg.Metrics = metrics.New()
	return pcfg, nil
}

// inProcess is a pipeline.Stream running in a goroutine.
type inProcess struct {
	cancel context.CancelFunc
	done   chan error
}

func startInProcess(cfg pipeline.Config, log *zap.Logger) *inProcess {
	ctx, cancel := context.WithCancel(context.Background())
	p := &inProcess{cancel: cancel, done: make(chan error, 1)}
	// Never abandoned: stop drains, as SIGTERM does for the binary.
	go func() { p.done <- pipeline.Stream(ctx, context.Background(), cfg, log) }()
	return p
}

func (p *inProcess) err() error {
	select {
	case err := <-p.done:
		p.done <- err
		return fmt.Errorf("pipeline stopped early: %v", err)
	default:
		return nil
	}
}

func (p *inProcess) stop() error {
	p.cancel()
	select {
	case err := <-p.done:
		return err
	case <-time.After(stopTimeout):
		return fmt.Errorf("pipeline did not stop within %s", stopTimeout)
	}
}

// runProfile runs the profiled drains (defaults, and the large ClickHouse batch).
func (b *bench) runProfile(ctx context.Context) error {
	dir, err := filepath.Abs(b.cfg.ProfileDir)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	b.profile = &profileResult{Dir: dir}
	runs := []struct {
		name  string
		extra []string
	}{{"c", nil}}
	if b.cfg.CHBatchLarge > 0 {
		runs = append(runs, struct {
			name  string
			extra []string
		}{"c10k", []string{fmt.Sprintf("CLICKHOUSE_BATCH_SIZE=%d", b.cfg.CHBatchLarge)}})
	}
	for _, r := range runs {
		b.progressf("profile: %s drain of %d rows in-process under pprof ...", r.name, b.cfg.Rows)
		pr, err := b.profileDrain(ctx, dir, r.name, r.extra...)
		if err != nil {
			return fmt.Errorf("%s: %w", r.name, err)
		}
		b.progressf("profile: %s %.0f rows/s in-process, %d inserts of %.0f rows on average", r.name, pr.RowsPerS, pr.Inserts, pr.RowsPerInsert)
		b.profile.Runs = append(b.profile.Runs, *pr)
	}
	return nil
}

func (b *bench) profileDrain(ctx context.Context, dir, name string, extra ...string) (*profileRun, error) {
	e, err := newEnv(ctx, b.srv)
	if err != nil {
		return nil, err
	}
	defer e.close()
	cfg, err := inProcessConfig(e.streamerEnv(extra...))
	if err != nil {
		return nil, err
	}
	logFile, err := os.Create(filepath.Join(b.workDir, "inprocess-"+name+".log"))
	if err != nil {
		return nil, err
	}
	defer logFile.Close()
	enc := zap.NewProductionEncoderConfig()
	enc.TimeKey, enc.EncodeTime = "ts", zapcore.ISO8601TimeEncoder
	log := zap.New(zapcore.NewCore(zapcore.NewJSONEncoder(enc), zapcore.Lock(logFile), zap.InfoLevel))

	// First start on the empty table: creates the slot.
	p := startInProcess(cfg, log)
	e.watch = p.err
	if err := e.waitActive(ctx, time.Minute); err != nil {
		_ = p.stop()
		return nil, err
	}
	e.watch = nil
	if err := p.stop(); err != nil {
		return nil, err
	}
	if _, err := e.insertBacklog(ctx, b.cfg.Rows, b.cfg.TxSize); err != nil {
		return nil, err
	}
	if err := e.settle(ctx); err != nil {
		return nil, err
	}

	// With --pg-setting shared_preload_libraries=pg_stat_statements, the time
	// PostgreSQL spends in each statement of the drain is reported too.
	_, stmtErr := e.Pool.Exec(ctx, "CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
	if stmtErr == nil {
		_, stmtErr = e.Pool.Exec(ctx, "SELECT pg_stat_statements_reset()")
	}

	counter := &countingSink{}
	cfg.WrapSink = func(s pipeline.Sink) pipeline.Sink { counter.Sink = s; return counter }
	cfg.Metrics = metrics.New()
	pr := &profileRun{
		Name:         name,
		CPUProfile:   filepath.Join(dir, "cpu-"+name+".pprof"),
		AllocBase:    filepath.Join(dir, "allocs-"+name+"-before.pprof"),
		AllocProfile: filepath.Join(dir, "allocs-"+name+".pprof"),
	}
	if err := writeAllocs(pr.AllocBase); err != nil {
		return nil, err
	}
	cpuFile, err := os.Create(pr.CPUProfile)
	if err != nil {
		return nil, err
	}
	defer cpuFile.Close()
	meter := &cpuMeter{}
	c0 := meter.sample()
	if err := pprof.StartCPUProfile(cpuFile); err != nil {
		return nil, err
	}
	t0 := time.Now()
	p = startInProcess(cfg, log)
	e.watch = p.err
	err = e.waitCH(ctx, uint64(b.cfg.Rows), b.cfg.Timeout)
	pprof.StopCPUProfile()
	use := meter.sample().since(c0)
	if err != nil {
		_ = p.stop()
		return nil, err
	}
	if err := writeAllocs(pr.AllocProfile); err != nil {
		_ = p.stop()
		return nil, err
	}
	// the last batch's UPDATE may still be running when its rows are in ClickHouse
	var done time.Time
	err = poll(ctx, time.Minute, 20*time.Millisecond, "every row processed", func() (bool, error) {
		var n int64
		err := e.Pool.QueryRow(ctx, "SELECT count(*) FROM event_outbox WHERE status = 'processed'").Scan(&n)
		return n == int64(b.cfg.Rows), err
	})
	if err == nil {
		done, err = e.lastProcessed(ctx)
	}
	e.watch = nil
	if stopErr := p.stop(); err == nil {
		err = stopErr
	}
	if err != nil {
		return nil, err
	}
	if stmtErr == nil {
		pr.PGStatements = pgStatements(ctx, e)
	}
	if err := e.verifyDelivered(ctx, int64(b.cfg.Rows), nil); err != nil {
		if !isUnprocessed(err) {
			return nil, err
		}
		b.progressf("profile %s: %v", name, err)
	}
	took := done.Sub(t0)
	pr.Seconds = took.Seconds()
	pr.RowsPerS = float64(b.cfg.Rows) / took.Seconds()
	pr.Inserts, pr.MaxInsert, pr.InsertSeconds = counter.inserts, counter.max, counter.took.Seconds()
	if counter.inserts > 0 {
		pr.RowsPerInsert = float64(counter.rows) / float64(counter.inserts)
	}
	pr.CPU = map[string]float64{}
	for _, g := range cpuGroups {
		pr.CPU[g] = use.Cores(g)
	}
	pr.CPUTop = pprofTop("-top", "-nodecount=25", pr.CPUProfile)
	pr.AllocTop = pprofTop("-top", "-nodecount=20", "-sample_index=alloc_space", "-base", pr.AllocBase, pr.AllocProfile)
	return pr, nil
}

// pgStatements lists the statements of the database that took the most time.
func pgStatements(ctx context.Context, e *dbEnv) string {
	rows, err := e.Pool.Query(ctx, `SELECT calls, total_exec_time, mean_exec_time, rows, regexp_replace(left(query, 110), '\s+', ' ', 'g')
		FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
		ORDER BY total_exec_time DESC LIMIT 8`)
	if err != nil {
		return fmt.Sprintf("(pg_stat_statements: %v)", err)
	}
	defer rows.Close()
	var sb strings.Builder
	fmt.Fprintf(&sb, "%8s %10s %9s %9s  %s\n", "calls", "total ms", "mean ms", "rows", "query")
	for rows.Next() {
		var calls, nrows int64
		var total, mean float64
		var q string
		if err := rows.Scan(&calls, &total, &mean, &nrows, &q); err != nil {
			return sb.String() + err.Error()
		}
		fmt.Fprintf(&sb, "%8d %10.0f %9.2f %9d  %s\n", calls, total, mean, nrows, q)
	}
	return sb.String()
}

// writeAllocs writes the cumulative allocation profile after a GC (which publishes
// the latest samples); two of them diffed with -base give one window's allocations.
func writeAllocs(path string) error {
	runtime.GC()
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	return pprof.Lookup("allocs").WriteTo(f, 0)
}

// pprofTop runs `go tool pprof` when the go command is available.
func pprofTop(args ...string) string {
	goBin, err := exec.LookPath("go")
	if err != nil {
		return "(go not on PATH: run go tool pprof " + strings.Join(args, " ") + ")"
	}
	out, err := exec.Command(goBin, append([]string{"tool", "pprof"}, args...)...).CombinedOutput()
	if err != nil {
		return fmt.Sprintf("(go tool pprof %s: %v)\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

func (p *profileResult) print(w io.Writer) {
	fmt.Fprintf(w, "\nprofile (in-process pipeline.Stream, same defaults as the binary; profiles in %s):\n", p.Dir)
	for _, r := range p.Runs {
		name := r.Name
		if name == "c10k" {
			name = "c'"
		}
		u := cpuUse{Seconds: r.CPU, Wall: 1}
		fmt.Fprintf(w, "\n== %s: %s rows/s in-process; %d ClickHouse inserts, %.0f rows each on average (max %d), %.2f s inside Insert of %.2f s\n",
			name, thousands(r.RowsPerS), r.Inserts, r.RowsPerInsert, r.MaxInsert, r.InsertSeconds, r.Seconds)
		fmt.Fprintf(w, "   cores busy: %s (bench = the in-process pipeline)\n", u.summary())
		if r.PGStatements != "" {
			fmt.Fprintf(w, "\n-- PostgreSQL statements by total time (pg_stat_statements)\n%s", r.PGStatements)
		}
		fmt.Fprintf(w, "\n-- CPU (go tool pprof -top %s)\n%s", r.CPUProfile, r.CPUTop)
		fmt.Fprintf(w, "\n-- allocations (go tool pprof -top -sample_index=alloc_space -base %s %s)\n%s", r.AllocBase, r.AllocProfile, r.AllocTop)
	}
}
