package main

import (
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"math"
	"os"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"
)

// machine describes where the figures were measured.
type machine struct {
	CPUs      int    `json:"nproc"`
	CPUModel  string `json:"cpu_model"`
	MemoryGiB string `json:"memory_gib"`
	Kernel    string `json:"kernel"`
	Go        string `json:"go"`
	LoadStart string `json:"load_average_start"`
	LoadEnd   string `json:"load_average_end"`
}

func machineFacts() machine {
	m := machine{CPUs: runtime.NumCPU(), Go: runtime.Version(), LoadStart: loadAverage()}
	if data, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(data), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPUModel = strings.TrimSpace(v)
				break
			}
		}
	}
	if data, err := os.ReadFile("/proc/meminfo"); err == nil {
		for _, line := range strings.Split(string(data), "\n") {
			if f := strings.Fields(line); len(f) >= 2 && f[0] == "MemTotal:" {
				kb, _ := strconv.ParseFloat(f[1], 64)
				m.MemoryGiB = strconv.FormatFloat(kb/(1<<20), 'f', 1, 64)
			}
		}
	}
	if data, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(data))
	}
	return m
}

// loadAverage is the 1, 5 and 15 minute load average.
func loadAverage() string {
	data, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(data))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

// tableRow is one figure: the median over repetitions, and every repetition.
type tableRow struct {
	Key    string    `json:"key"`
	Label  string    `json:"label"`
	Metric string    `json:"metric"`
	Unit   string    `json:"unit"`
	Median float64   `json:"median"`
	Runs   []float64 `json:"runs"`
	Valid  bool      `json:"valid"`
}

// targetRow is a promise of the design checked against the figures.
type targetRow struct {
	Name   string    `json:"name"`
	Value  float64   `json:"value"`
	Runs   []float64 `json:"runs,omitempty"`
	Op     string    `json:"op"`
	Limit  float64   `json:"limit"`
	Unit   string    `json:"unit"`
	Pass   bool      `json:"pass"`
	Valid  bool      `json:"valid"`
	Method string    `json:"method"`
}

type report struct {
	Command  string                          `json:"command"`
	Date     string                          `json:"date"`
	Took     string                          `json:"took"`
	Machine  machine                         `json:"machine"`
	Postgres string                          `json:"postgres_version"`
	CH       string                          `json:"clickhouse_version"`
	Settings []string                        `json:"settings"`
	Config   benchConfig                     `json:"config"`
	Rows     []tableRow                      `json:"rows"`
	Targets  []targetRow                     `json:"targets"`
	CPU      map[string]map[string]float64   `json:"cpu_cores_median"`
	Runs     map[string][]map[string]float64 `json:"runs"`
	Errors   []string                        `json:"errors,omitempty"`
	Profile  *profileResult                  `json:"profile,omitempty"`
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return math.NaN()
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// values are the figure's values over the repetitions that succeeded.
func (b *bench) values(key, metric string, scale float64) []float64 {
	var out []float64
	for _, m := range b.results[key] {
		if m == nil {
			continue
		}
		if v, ok := m[metric]; ok {
			out = append(out, v*scale)
		}
	}
	return out
}

// ratios are key1's metric1 / key2's metric2 per repetition (both measured in
// it; a repetition lacking either is left out).
func (b *bench) ratios(key1, key2, metric1, metric2 string) []float64 {
	r1, r2 := b.results[key1], b.results[key2]
	var out []float64
	for i := 0; i < len(r1) && i < len(r2); i++ {
		if r1[i] == nil || r2[i] == nil {
			continue
		}
		v1, ok1 := r1[i][metric1]
		v2, ok2 := r2[i][metric2]
		if !ok1 || !ok2 || v2 == 0 {
			continue
		}
		out = append(out, v1/v2)
	}
	return out
}

func (b *bench) report(facts machine, args []string, took time.Duration) *report {
	c := b.cfg
	r := &report{
		Command:  strings.Join(append([]string{os.Args[0]}, args...), " "),
		Date:     time.Now().Format(time.RFC3339),
		Took:     took.Round(time.Second).String(),
		Machine:  facts,
		Postgres: b.srv.PGVersion,
		CH:       b.srv.CHVersion,
		Config:   c,
		CPU:      map[string]map[string]float64{},
		Runs:     b.results,
		Errors:   b.errs,
		Profile:  b.profile,
	}
	pgMode := "fsync=off, full_page_writes=off (localsvc Durable: false), synchronous_commit=on"
	if c.PGDurable {
		pgMode = "fsync=on, full_page_writes=on, synchronous_commit=on (Durable: true)"
	}
	if c.PGAsyncCommit {
		pgMode = strings.Replace(pgMode, "synchronous_commit=on", "synchronous_commit=off", 1)
	}
	if len(c.PGSettings) > 0 {
		pgMode += ", " + strings.Join(c.PGSettings, ", ")
	}
	if len(c.OutboxDDL) > 0 {
		pgMode += "; outbox schema variant after the migrations: " + strings.Join(c.OutboxDDL, "; ")
	}
	r.Settings = []string{
		"PostgreSQL: local process (localsvc), " + pgMode + ", wal_level=logical; everything else default",
		"ClickHouse: local chDB 26.7 server (localsvc), defaults; event_log from the migrations (ReplacingMergeTree)",
		"streamer (c-f, h): the real binary `" + c.Streamer + " run` as a child process, all settings default (EVENT_BATCH_SIZE 1000, EVENT_BATCH_TIMEOUT 100ms, CLICKHOUSE_BATCH_SIZE 10000, EVENT_BATCH_MAX_BYTES 8 MiB, STATUS_INTERVAL 1s, EVENT_PROCESSING_INTERVAL 60s)",
		fmt.Sprintf("a: pglogrepl START_REPLICATION (proto_version 1) + this repo's replication.Decoder, ack every 1 s; backlog %s rows in tx of %s committed after the slot, VACUUM ANALYZE + CHECKPOINT before timing", thousands(float64(c.Rows)), thousands(float64(c.TxSize))),
		fmt.Sprintf("b: 1 worker, rounds of BEGIN; SELECT ... WHERE status IN ('pending','failed') ORDER BY id LIMIT %d FOR UPDATE SKIP LOCKED; one ClickHouse insert (sink.Client: PrepareBatch); UPDATE ... SET status='processed' WHERE id = ANY($1); COMMIT; partial index ON (id) WHERE status IN ('pending','failed') added", c.PollBatch),
		"c: slot created by a first start on the empty table, backlog committed, second start timed from exec until the last row is processed (max updated_at); slot confirmation past the last commit checked after",
		fmt.Sprintf("d: internal/loadgen Copy, tx %d, rate unlimited, %d connection(s), %s events; delivery = last inserted_at in ClickHouse", c.TxSize, c.LiveConns, thousands(float64(c.Rows))),
		fmt.Sprintf("e: %s events/s in tx of %d (one INSERT ... RETURNING id each, %d connections) for %s; latency from the time the commit returned to the producer to (1) the first ClickHouse poll that saw the event, polls every %s (upper bound: never before visible, at most one interval + query late) and (2) inserted_at = now64(6) of the carrying INSERT, i.e. when that INSERT query started (lower bound: misses the insert itself)", thousands(c.LatencyRate), c.LatencyTx, c.LatencyWorkers, c.LatencyDuration, c.LatencyPoll),
		fmt.Sprintf("f: one transaction of %s rows committed while the binary streams; VmHWM from /proc/PID/status; in ClickHouse = from the COMMIT's return to the 20 ms count poll that saw the last row (an upper bound)", thousands(float64(c.BigTx))),
		fmt.Sprintf("g: the peer, ClickHouse %s's MaterializedPostgreSQL database engine (allow_experimental_database_materialized_postgresql=1, materialized_postgresql_tables_list = 'event_outbox', other settings default; its own slot and publication, dropped with its database), each part on fresh databases: drain (the c / g target) = set up like c: the peer created on the empty table (its snapshot copy is empty) and seen reading its slot, then paused, c's backlog committed and settled, and resumed; timed from the resume to the first poll (every 20 ms) that saw every row, so the engine decodes the backlog from the WAL. The engine has no pause (DETACH DATABASE fails and leaves it stopped for good; no SYSTEM command), so the bench pauses it from PostgreSQL: a walsender of its own holds the engine's slot (confirming nothing; checked still holding it, the slot's confirmed_flush_lsn behind the backlog and no row in the peer before the resume), the engine's reads of the slot fail meanwhile; the resume closes that walsender and wakes the engine's consumer with ALTER DATABASE ... MODIFY SETTING materialized_postgresql_max_block_size = %d (its default, unchanged; any setting change reschedules the consumer, which otherwise would wait out its backoff of up to 10 s); after the drain the slot is checked confirmed past the backlog. snapshot copy (not a target) = c's backlog committed and settled, then CREATE DATABASE, timed from it to the poll that saw every row (the initial load copies the table from a snapshot, no WAL); live = the peer started on the empty table, then d's producer, delivery until the poll that saw the last row; latency = e's producer for %s (shorter than e), commit to the first poll (every %s) that saw the event. Delivery verified through the peer's table, which the engine reads with FINAL (ReplacingMergeTree(_version) ORDER BY id): count() = uniqExact(id) = committed rows and sum(id) = PostgreSQL's; duplicates that FINAL hides would show in the physical rows of its parts (also measured)", b.srv.CHVersion, peerBlockSize, min(c.LatencyDuration, peerLatencyMax), c.LatencyPoll),
		"h: c's backlog committed before the replication slot exists (no first start), then the binary's first start timed like c: it creates the slot and the backfill delivers the backlog beside the stream (pages of CLICKHOUSE_BATCH_SIZE, each row's final status update its claim), all settings default; verified like c, and the binary's logged backfilled_rows must equal the backlog",
		fmt.Sprintf("b is kept fair: the same PostgreSQL, with the settings above, serves every scenario; b is the earlier service's design (one worker, SELECT ... FOR UPDATE SKIP LOCKED, insert, UPDATE, COMMIT) at its batch of %s rows (--poll-batch; default 1000, EVENT_BATCH_SIZE's default), with a partial index in its favour", thousands(float64(c.PollBatch))),
	}

	add := func(key, label, metric, unit string, scale float64) {
		if !c.has(key) {
			return
		}
		v := b.values(key, metric, scale)
		row := tableRow{Key: key, Label: label, Metric: metric, Unit: unit, Median: median(v), Runs: v, Valid: len(v) > 0}
		if !row.Valid {
			row.Median = 0
		}
		r.Rows = append(r.Rows, row)
	}
	add("a", "bare slot reader (ceiling)", "rows_per_s", "rows/s", 1)
	add("b", "polling baseline (SKIP LOCKED)", "rows_per_s", "rows/s", 1)
	add("c", "streamer drain, defaults", "rows_per_s", "rows/s", 1)
	if c.CHBatchLarge > 0 {
		add("c10k", fmt.Sprintf("streamer drain, CLICKHOUSE_BATCH_SIZE=%d", c.CHBatchLarge), "rows_per_s", "rows/s", 1)
	}
	add("d", "live: producer (loadgen COPY)", "producer_rows_per_s", "rows/s", 1)
	add("d", "live: streamer delivery", "delivery_rows_per_s", "rows/s", 1)
	add("d", "live: last event in CH after producer stop", "tail_after_producer_s", "ms", 1000)
	add("e", "latency commit -> seen in ClickHouse, p50", "p50_ms", "ms", 1)
	add("e", "  p95", "p95_ms", "ms", 1)
	add("e", "  p99", "p99_ms", "ms", 1)
	add("e", "  max", "max_ms", "ms", 1)
	add("e", "latency commit -> inserted_at (lower bound), p50", "inserted_at_p50_ms", "ms", 1)
	add("e", "  p99", "inserted_at_p99_ms", "ms", 1)
	add("e", "  max", "inserted_at_max_ms", "ms", 1)
	add("e", "latency producer achieved", "producer_rate", "events/s", 1)
	add("e", "outbox size after the load, no retention", "outbox_mib", "MiB", 1)
	add("eh", "with STANDBY_HOLD (local standby): latency p50", "p50_ms", "ms", 1)
	add("eh", "  p99", "p99_ms", "ms", 1)
	add("eh", "  max", "max_ms", "ms", 1)
	add("eh", "  latency producer achieved", "producer_rate", "events/s", 1)
	add("er", "with OUTBOX_RETENTION=10s: latency p50", "p50_ms", "ms", 1)
	add("er", "  p99", "p99_ms", "ms", 1)
	add("er", "  max", "max_ms", "ms", 1)
	add("er", "  latency producer achieved", "producer_rate", "events/s", 1)
	add("er", "  outbox size after the load", "outbox_mib", "MiB", 1)
	add("er", "  outbox rows left after the load", "outbox_rows", "rows", 1)
	add("f", fmt.Sprintf("peak RSS (VmHWM), one %s-row tx", thousands(float64(c.BigTx))), "peak_rss_mib", "MiB", 1)
	add("f", "  that tx all in ClickHouse after its commit", "ch_visible_s", "ms", 1000)
	add("f", "  PostgreSQL spilled to its disk (spill_bytes)", "pg_spill_mib", "MiB", 1)
	add("f", "  PostgreSQL streamed before the commit (stream_bytes)", "pg_stream_mib", "MiB", 1)
	add("f", "  the streamer's spill at its largest", "local_spill_mib", "MiB", 1)
	add("f1", fmt.Sprintf("protocol 1 (REPLICATION_STREAMING=off): peak RSS, one %s-row tx", thousands(float64(c.BigTx))), "peak_rss_mib", "MiB", 1)
	add("f1", "  that tx all in ClickHouse after its commit", "ch_visible_s", "ms", 1000)
	add("f1", "  PostgreSQL spilled to its disk (spill_bytes)", "pg_spill_mib", "MiB", 1)
	for _, k := range []string{"m", "m1"} {
		proto := "protocol 2"
		if k == "m1" {
			proto = "protocol 1"
		}
		add(k, fmt.Sprintf("mixed (%s): %s small events/s + one %s-row tx: small events commit -> inserted_at, p50", proto, thousands(c.MixedRate), thousands(float64(c.MixedBigTx))), "small_p50_ms", "ms", 1)
		add(k, "  p99", "small_p99_ms", "ms", 1)
		add(k, "  max", "small_max_ms", "ms", 1)
		add(k, "  the big tx all in ClickHouse after its commit", "big_ch_visible_s", "ms", 1000)
		add(k, "  PostgreSQL spilled to its disk (spill_bytes)", "pg_spill_mib", "MiB", 1)
		add(k, "  the streamer's spill at its largest", "local_spill_mib", "MiB", 1)
		add(k, "  peak RSS", "peak_rss_mib", "MiB", 1)
	}
	add("g", "peer (MaterializedPostgreSQL): drain from the WAL", "rows_per_s", "rows/s", 1)
	add("g", "g snapshot copy (initial load; not a target)", "snapshot_rows_per_s", "rows/s", 1)
	add("g", "peer live: producer (loadgen COPY)", "producer_rows_per_s", "rows/s", 1)
	add("g", "peer live: delivery", "delivery_rows_per_s", "rows/s", 1)
	add("g", "peer live: last event after producer stop", "tail_after_producer_s", "ms", 1000)
	add("g", "peer latency commit -> seen, p50", "latency_p50_ms", "ms", 1)
	add("g", "  p95", "latency_p95_ms", "ms", 1)
	add("g", "  p99", "latency_p99_ms", "ms", 1)
	add("g", "  max", "latency_max_ms", "ms", 1)
	add("g", "  latency producer achieved", "latency_producer_rate", "events/s", 1)
	add("h", "streamer backfill (backlog older than the slot)", "rows_per_s", "rows/s", 1)

	ratio := func(name, k1, k2 string, limit float64) {
		if !c.has(k1) || !c.has(k2) {
			return
		}
		v := b.ratios(k1, k2, "rows_per_s", "rows_per_s")
		t := targetRow{Name: name, Value: median(v), Runs: v, Op: ">=", Limit: limit, Unit: "x", Valid: len(v) > 0,
			Method: "median over repetitions of the ratio within each repetition"}
		t.Pass = t.Valid && t.Value >= limit
		if !t.Valid {
			t.Value = 0
		}
		r.Targets = append(r.Targets, t)
	}
	ratio("c / a", "c", "a", 0.8)
	ratio("c / g (drain from the WAL, the peer)", "c", "g", 1)
	ratio("h / c (backfill / drain)", "h", "c", 0.7)
	if c.has("d") {
		v := b.ratios("d", "d", "delivery_rows_per_s", "producer_rows_per_s")
		t := targetRow{Name: "d delivery / d producer", Value: median(v), Runs: v, Op: ">=", Limit: 0.95, Unit: "x", Valid: len(v) > 0,
			Method: "median over repetitions of the ratio within each repetition"}
		t.Pass = t.Valid && t.Value >= t.Limit
		if !t.Valid {
			t.Value = 0
		}
		r.Targets = append(r.Targets, t)
	}
	if c.has("d") && c.has("g") {
		v := b.ratios("d", "g", "delivery_rows_per_s", "delivery_rows_per_s")
		t := targetRow{Name: "d delivery / g live delivery (the peer)", Value: median(v), Runs: v, Op: ">=", Limit: 1, Unit: "x", Valid: len(v) > 0,
			Method: "median over repetitions of the ratio within each repetition"}
		t.Pass = t.Valid && t.Value >= t.Limit
		if !t.Valid {
			t.Value = 0
		}
		r.Targets = append(r.Targets, t)
	}
	upper := func(name, key, metric, op, unit string, scale, limit float64) {
		if !c.has(key) {
			return
		}
		v := b.values(key, metric, scale)
		t := targetRow{Name: name, Value: median(v), Runs: v, Op: op, Limit: limit, Unit: unit, Valid: len(v) > 0, Method: "median over repetitions"}
		t.Pass = t.Valid && (t.Value < limit || op == "<=" && t.Value == limit)
		if !t.Valid {
			t.Value = 0
		}
		r.Targets = append(r.Targets, t)
	}
	upper(fmt.Sprintf("e p99 (seen in ClickHouse) at %s events/s", thousands(c.LatencyRate)), "e", "p99_ms", "<", "ms", 1, 150)
	upper("f peak RSS", "f", "peak_rss_mib", "<", "MiB", 1, 64)
	upper(fmt.Sprintf("f %s-row tx in ClickHouse after its commit", thousands(float64(c.BigTx))), "f", "ch_visible_s", "<=", "ms", 1000, 10_000)
	upper("f PostgreSQL spill_bytes with protocol 2", "f", "pg_spill_mib", "<=", "MiB", 1, 0)
	if c.has("f") && c.has("f1") {
		// Issue 17's goal: with protocol 2 the big transaction is in ClickHouse
		// in at most half of protocol 1's time after its commit.
		v := b.ratios("f", "f1", "ch_visible_s", "ch_visible_s")
		t := targetRow{Name: "f commit -> ClickHouse, protocol 2 / protocol 1", Value: median(v), Runs: v, Op: "<=", Limit: 0.5, Unit: "x",
			Valid: len(v) > 0, Method: "median over repetitions of the ratio within each repetition"}
		t.Pass = t.Valid && t.Value <= t.Limit
		if !t.Valid {
			t.Value = 0
		}
		r.Targets = append(r.Targets, t)
	}

	for key, uses := range b.cpu {
		m := map[string]float64{}
		for _, g := range cpuGroups {
			var v []float64
			for _, u := range uses {
				v = append(v, u.Cores(g))
			}
			m[g] = median(v)
		}
		r.CPU[key] = m
	}
	return r
}

// thousands formats a number with thousands separators and no decimals.
func thousands(v float64) string {
	if math.IsNaN(v) {
		return "-"
	}
	s := strconv.FormatInt(int64(math.Round(v)), 10)
	neg := strings.HasPrefix(s, "-")
	s = strings.TrimPrefix(s, "-")
	var out []byte
	for i := range len(s) {
		if i > 0 && (len(s)-i)%3 == 0 {
			out = append(out, ',')
		}
		out = append(out, s[i])
	}
	if neg {
		return "-" + string(out)
	}
	return string(out)
}

func formatValue(v float64, unit string) string {
	if math.IsNaN(v) {
		return "-"
	}
	switch unit {
	case "rows/s", "events/s":
		return thousands(v)
	case "ms":
		if math.Abs(v) < 10 {
			return strconv.FormatFloat(v, 'f', 1, 64)
		}
		return thousands(v)
	case "MiB":
		return strconv.FormatFloat(v, 'f', 1, 64)
	case "x":
		return strconv.FormatFloat(v, 'f', 2, 64)
	}
	return strconv.FormatFloat(v, 'g', 4, 64)
}

func formatRuns(v []float64, unit string) string {
	parts := make([]string, len(v))
	for i, x := range v {
		parts[i] = formatValue(x, unit)
	}
	return "[" + strings.Join(parts, "  ") + "]"
}

// printTable prints the one table with its context.
func (r *report) printTable(w io.Writer) {
	c := r.Config
	fmt.Fprintf(w, "\noutbox-streamer benchmark — %s\n", r.Date)
	fmt.Fprintf(w, "command:  %s\n", r.Command)
	fmt.Fprintf(w, "machine:  nproc %d, %s, %s GiB RAM, Linux %s; load average %s at start, %s at end\n",
		r.Machine.CPUs, r.Machine.CPUModel, r.Machine.MemoryGiB, r.Machine.Kernel, r.Machine.LoadStart, r.Machine.LoadEnd)
	fmt.Fprintf(w, "software: %s; PostgreSQL %s; ClickHouse %s\n", r.Machine.Go, r.Postgres, r.CH)
	fmt.Fprintln(w, "settings:")
	for _, s := range r.Settings {
		fmt.Fprintf(w, "  - %s\n", s)
	}
	fmt.Fprintf(w, "figures:  median of %d repetition(s) (each repetition runs the scenarios in turn); every run in brackets; took %s\n\n", c.Reps, r.Took)

	var rows [][]string
	for _, row := range r.Rows {
		key := row.Key
		if key == "c10k" {
			key = "c'"
		}
		med := formatValue(row.Median, row.Unit)
		if !row.Valid {
			med = "-"
		}
		rows = append(rows, []string{key, row.Label, med, row.Unit, formatRuns(row.Runs, row.Unit)})
	}
	printAligned(w, []string{"", "scenario", "median", "unit", "runs"}, "llrll", rows)

	fmt.Fprintln(w)
	rows = nil
	for _, t := range r.Targets {
		op := "≥"
		switch t.Op {
		case "<":
			op = "<"
		case "<=":
			op = "≤"
		}
		res := "MISS"
		switch {
		case !t.Valid:
			res = "n/a"
		case t.Pass:
			res = "PASS"
		}
		name := strings.ReplaceAll(t.Name, "c10k", "c'")
		unit := " " + t.Unit
		if t.Unit == "x" {
			unit = "×"
		}
		val := formatValue(t.Value, t.Unit) + unit
		if !t.Valid {
			val = "-"
		}
		rows = append(rows, []string{name, val, op + " " + formatValue(t.Limit, t.Unit) + unit, res, formatRuns(t.Runs, t.Unit)})
	}
	printAligned(w, []string{"target", "value", "required", "result", "runs"}, "lrlll", rows)

	if len(r.CPU) > 0 {
		fmt.Fprintf(w, "\nCPU: cores kept busy during the timed part, from /proc (median over repetitions; the machine has %d; bench = this process: the reader in a, the poller in b, producers and pollers in d-g):\n", r.Machine.CPUs)
		for _, key := range []string{"a", "b", "c", "c10k", "d", "e", "f", "f1", "m", "m1", "g", "h"} {
			m, ok := r.CPU[key]
			if !ok {
				continue
			}
			u := cpuUse{Seconds: m, Wall: 1}
			name := key
			if key == "c10k" {
				name = "c'"
			}
			fmt.Fprintf(w, "  %-4s %s\n", name, u.summary())
		}
	}
	if perRow := r.cpuPerRow(); len(perRow) > 0 {
		fmt.Fprintln(w, "\nCPU per delivered row, µs (cores kept busy ÷ rows per second; the figure that carries to another machine):")
		for _, l := range perRow {
			fmt.Fprintf(w, "  %s\n", l)
		}
	}
	if extra := r.extras(); extra != "" {
		fmt.Fprintln(w, "\nalso measured (medians):", extra)
	}
	if len(r.Errors) > 0 {
		fmt.Fprintln(w, "\nFAILED runs (left out of the medians unless noted):")
		for _, e := range r.Errors {
			fmt.Fprintf(w, "  - %s\n", e)
		}
	}
}

// printAligned prints a fixed-width table: align has one letter per column, l or r.
func printAligned(w io.Writer, header []string, align string, rows [][]string) {
	width := make([]int, len(header))
	all := append([][]string{header}, rows...)
	for _, row := range all {
		for i, cell := range row {
			width[i] = max(width[i], utf8.RuneCountInString(cell))
		}
	}
	line := func(row []string) {
		var sb strings.Builder
		for i, cell := range row {
			pad := strings.Repeat(" ", width[i]-utf8.RuneCountInString(cell))
			if i > 0 {
				sb.WriteString("  ")
			}
			if align[i] == 'r' {
				sb.WriteString(pad + cell)
			} else {
				sb.WriteString(cell + pad)
			}
		}
		fmt.Fprintln(w, strings.TrimRight(sb.String(), " "))
	}
	line(header)
	sep := make([]string, len(header))
	for i := range sep {
		sep[i] = strings.Repeat("-", width[i])
	}
	line(sep)
	for _, row := range rows {
		line(row)
	}
}

// extras are the secondary figures worth a line.
func (r *report) extras() string {
	med := func(key, metric string) float64 {
		var v []float64
		for _, m := range r.Runs[key] {
			if m != nil {
				if x, ok := m[metric]; ok {
					v = append(v, x)
				}
			}
		}
		return median(v)
	}
	var parts []string
	if v := med("c", "startup_s"); !math.IsNaN(v) {
		parts = append(parts, fmt.Sprintf("c startup (exec to streaming) %.0f ms", v*1000))
	}
	if v := med("c", "rows_per_s_from_streaming"); !math.IsNaN(v) {
		parts = append(parts, fmt.Sprintf("c rows/s counted from streaming %s", thousands(v)))
	}
	if v := med("c", "ack_after_done_s"); !math.IsNaN(v) {
		parts = append(parts, fmt.Sprintf("c slot confirmed %.0f ms after the last row was processed (STATUS_INTERVAL)", v*1000))
	}
	for _, k := range []string{"c", "c10k"} {
		if v := med(k, "rows_per_insert"); !math.IsNaN(v) {
			name := k
			if k == "c10k" {
				name = "c'"
			}
			parts = append(parts, fmt.Sprintf("%s %.0f rows per ClickHouse INSERT on average (%s INSERTs; counted as distinct inserted_at)", name, v, thousands(med(k, "ch_inserts"))))
		}
	}
	if v := med("c", "peak_rss_mib"); !math.IsNaN(v) {
		parts = append(parts, fmt.Sprintf("c peak RSS %.1f MiB", v))
	}
	if v := med("e", "rows_per_insert"); !math.IsNaN(v) {
		parts = append(parts, fmt.Sprintf("e %.0f rows per ClickHouse INSERT on average; %s polls of ClickHouse, slowest %.0f ms", v, thousands(med("e", "polls")), med("e", "slowest_poll_ms")))
	}
	if v := med("e", "producer_late_max_ms"); !math.IsNaN(v) {
		parts = append(parts, fmt.Sprintf("e producer at worst %.0f ms behind schedule", v))
	}
	if v := med("f", "idle_rss_mib"); !math.IsNaN(v) {
		parts = append(parts, fmt.Sprintf("f idle RSS %.1f MiB", v))
	}
	if v := med("f", "delivery_seconds"); !math.IsNaN(v) {
		parts = append(parts, fmt.Sprintf("f big tx processed in the outbox %.1f s after its commit", v))
	}
	if v := med("g", "physical_rows"); !math.IsNaN(v) {
		parts = append(parts, fmt.Sprintf("g drain: %s physical rows in the peer's parts after the drain for %s committed (more = duplicates that only FINAL hides); its slot was %.1f MiB of WAL behind while paused", thousands(v), thousands(med("g", "rows")), med("g", "paused_wal_mib")))
	}
	if v := med("g", "snapshot_physical_rows"); !math.IsNaN(v) {
		parts = append(parts, fmt.Sprintf("g snapshot copy: %s physical rows in the peer's parts after the load", thousands(v)))
	}
	if v := med("h", "backfill_done_s"); !math.IsNaN(v) {
		parts = append(parts, fmt.Sprintf("h backfill of %s rows done %.0f ms after exec", thousands(med("h", "backfilled_rows")), v*1000))
	}
	if v := med("h", "rows_per_insert"); !math.IsNaN(v) {
		parts = append(parts, fmt.Sprintf("h %.0f rows per ClickHouse INSERT on average", v))
	}
	if len(parts) == 0 {
		return ""
	}
	return "\n  " + strings.Join(parts, "\n  ")
}

func (r *report) writeJSON(path string) error {
	data, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(data, '\n'), 0o644)
}

// cpuPerRow is, for the drains and the live runs, each process group's CPU
// per delivered row in microseconds.
func (r *report) cpuPerRow() []string {
	var out []string
	for _, k := range []struct{ key, metric, what string }{
		{"a", "rows_per_s", "a (bare reader)"}, {"c", "rows_per_s", "c (our drain)"}, {"g", "rows_per_s", "g (peer drain)"},
		{"d", "delivery_rows_per_s", "d (our live)"},
	} {
		cores, ok := r.CPU[k.key]
		var rates []float64
		for _, run := range r.Runs[k.key] {
			if v, ok := run[k.metric]; ok && run != nil {
				rates = append(rates, v)
			}
		}
		rate := median(rates)
		if !ok || !(rate > 0) {
			continue
		}
		var parts []string
		total := 0.0
		for _, g := range slices.Sorted(maps.Keys(cores)) {
			us := cores[g] / rate * 1e6
			total += us
			if us >= 0.05 {
				parts = append(parts, fmt.Sprintf("%s %.1f", g, us))
			}
		}
		out = append(out, fmt.Sprintf("%-16s total %.1f: %s", k.what, total, strings.Join(parts, ", ")))
	}
	return out
}
