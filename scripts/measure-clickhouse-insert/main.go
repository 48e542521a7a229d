// Command measure-clickhouse-insert measures what ClickHouse spends per inserted
// event for variants of the event table's DDL and insert settings: the
// streamer's insert (native protocol, LZ4, a deduplication token, 10,000 rows
// per INSERT) into each variant in turn, the server's CPU time from /proc over
// the inserts and the merges that follow them. Variants alternate (A B C A B C)
// so that the machine's load falls on each alike. It is a one-off measurement
// for the performance notes, not a test; run it under outbox-devenv on the same
// host as the server:
//
//	bin/outbox-devenv -- go run ./scripts/measure-clickhouse-insert [-rows 300000] [-rounds 3]
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
)

// eventLog is migration 1's table (modern servers, String context).
const eventLog = `CREATE TABLE %s (
    event_id UInt64, event_type LowCardinality(String), event_date_time DateTime64(6, 'UTC'),
    environment LowCardinality(String), event_context %s, metadata_version Int64,
    created_at DateTime64(6, 'UTC'), commit_lsn UInt64, inserted_at DateTime64(6, 'UTC') DEFAULT now64(6))
ENGINE = %s PARTITION BY toYYYYMM(event_date_time) ORDER BY (event_type, event_date_time, event_id)
SETTINGS non_replicated_deduplication_window = %d`

// timeIndexes is migration 3.
var timeIndexes = []string{
	`ALTER TABLE %s ADD INDEX created_at_minmax created_at TYPE minmax GRANULARITY 1`,
	`ALTER TABLE %s ADD INDEX inserted_at_minmax inserted_at TYPE minmax GRANULARITY 1`,
}

type variant struct {
	name     string
	window   int // non_replicated_deduplication_window
	context  string
	engine   string
	indexes  bool
	settings clickhouse.Settings
}

var variants = []variant{
	{"migrations 1+3 (current)", 1000, "String", "ReplacingMergeTree", true, nil},
	{"migration 1 only (no minmax indexes)", 1000, "String", "ReplacingMergeTree", false, nil},
	{"current, event_context CODEC(ZSTD(1))", 1000, "String CODEC(ZSTD(1))", "ReplacingMergeTree", true, nil},
	{"current, optimize_on_insert = 0", 1000, "String", "ReplacingMergeTree", true, clickhouse.Settings{"optimize_on_insert": 0}},
	{"current as MergeTree", 1000, "String", "MergeTree", true, nil},
	{"current without the deduplication window", 0, "String", "ReplacingMergeTree", true, nil},
}

func main() {
	rows := flag.Int("rows", 300_000, "rows per variant and round")
	batch := flag.Int("batch", 10_000, "rows per INSERT (CLICKHOUSE_BATCH_SIZE)")
	rounds := flag.Int("rounds", 3, "rounds over the variants")
	only := flag.String("variants", "", "comma-separated indexes of the variants to run (default all)")
	flag.Parse()
	host, port := os.Getenv("CLICKHOUSE_HOST"), os.Getenv("CLICKHOUSE_PORT")
	if host == "" {
		fail(fmt.Errorf("CLICKHOUSE_HOST is empty: run under bin/outbox-devenv"))
	}
	pid := serverPID(port)
	ctx := context.Background()
	conn, err := clickhouse.Open(&clickhouse.Options{
		Addr:        []string{host + ":" + port},
		Auth:        clickhouse.Auth{Username: "default"},
		Compression: &clickhouse.Compression{Method: clickhouse.CompressionLZ4},
	})
	check(err)
	defer conn.Close()
	check(conn.Exec(ctx, "CREATE DATABASE IF NOT EXISTS measure_insert"))
	defer conn.Exec(context.Background(), "DROP DATABASE IF EXISTS measure_insert SYNC") //nolint:errcheck // best effort
	var version string
	check(conn.QueryRow(ctx, "SELECT version()").Scan(&version))
	use := variants
	if *only != "" {
		use = nil
		for _, s := range strings.Split(*only, ",") {
			i, err := strconv.Atoi(s)
			check(err)
			use = append(use, variants[i])
		}
	}
	fmt.Printf("ClickHouse %s, server pid %d: %d rows per variant in INSERTs of %d, %d rounds; server CPU over the inserts and the merges after them, less the idle rate\n",
		version, pid, *rows, *batch, *rounds)
	results := make([][]float64, len(use))
	for r := range *rounds {
		for i, v := range use {
			us, err := measure(ctx, conn, pid, fmt.Sprintf("measure_insert.ev_%d_%d", r, i), v, *rows, *batch)
			check(err)
			results[i] = append(results[i], us)
		}
	}
	fmt.Printf("%-42s %12s  %s\n", "variant", "median µs/row", "runs")
	for i, v := range use {
		runs := append([]float64(nil), results[i]...)
		sort.Float64s(runs)
		fmt.Printf("%-42s %12.2f  %.2f\n", v.name, runs[len(runs)/2], results[i])
	}
}

func measure(ctx context.Context, conn driver.Conn, pid int, table string, v variant, rows, batch int) (float64, error) {
	if err := conn.Exec(ctx, fmt.Sprintf(eventLog, table, v.context, v.engine, v.window)); err != nil {
		return 0, err
	}
	if v.indexes {
		for _, q := range timeIndexes {
			if err := conn.Exec(ctx, fmt.Sprintf(q, table)); err != nil {
				return 0, err
			}
		}
	}
	// The idle rate (the blocking query of clickhouse-local, background work).
	idle0, t0 := cpuOf(pid), time.Now()
	time.Sleep(2 * time.Second)
	idle := float64(cpuOf(pid)-idle0) / time.Since(t0).Seconds()

	base := time.Now().UTC()
	cpu0, start := cpuOf(pid), time.Now()
	for done := 0; done < rows; done += batch {
		n := min(batch, rows-done)
		settings := clickhouse.Settings{"insert_deduplication_token": fmt.Sprintf("%s-%d", table, done)}
		for k, val := range v.settings {
			settings[k] = val
		}
		b, err := conn.PrepareBatch(clickhouse.Context(ctx, clickhouse.WithSettings(settings)),
			"INSERT INTO "+table+" (event_id, event_type, event_date_time, environment, event_context, metadata_version, created_at, commit_lsn)")
		if err != nil {
			return 0, err
		}
		ids, types, times, envs := make([]uint64, n), make([]string, n), make([]time.Time, n), make([]string, n)
		ctxs, vers, created, lsns := make([]string, n), make([]int64, n), make([]time.Time, n), make([]uint64, n)
		for i := range n {
			id := done + i + 1
			ids[i], types[i], envs[i], vers[i] = uint64(id), "order.created", "bench", 1
			times[i] = base.Add(time.Duration(id) * time.Microsecond)
			created[i], lsns[i] = times[i], uint64(1<<32+id*100)
			ctxs[i] = fmt.Sprintf(`{"user_id": %d, "amount": %d, "note": "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}`, id, id%997)
		}
		for i, col := range []any{ids, types, times, envs, ctxs, vers, created, lsns} {
			if err := b.Column(i).Append(col); err != nil {
				return 0, err
			}
		}
		if err := b.Send(); err != nil {
			return 0, err
		}
	}
	// Merges: wait until the parts stop changing, then a little longer.
	var parts uint64
	for range 30 {
		time.Sleep(500 * time.Millisecond)
		var p uint64
		if err := conn.QueryRow(ctx, "SELECT count() FROM system.parts WHERE active AND database = 'measure_insert' AND table = $1",
			table[strings.IndexByte(table, '.')+1:]).Scan(&p); err != nil {
			return 0, err
		}
		if p == parts {
			break
		}
		parts = p
	}
	took := time.Since(start)
	cpu := float64(cpuOf(pid)-cpu0) - idle*took.Seconds()
	if err := conn.Exec(ctx, "DROP TABLE "+table+" SYNC"); err != nil {
		return 0, err
	}
	return cpu / float64(rows) / 1000, nil // ns → µs
}

// cpuOf is the process's user+system CPU time in nanoseconds.
func cpuOf(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	check(err)
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return (ut + st) * int64(10*time.Millisecond)
}

// serverPID finds the process listening on the native port.
func serverPID(port string) int {
	out, err := exec.Command("ss", "-ltnpH", "sport = :"+port).Output()
	check(err)
	m := regexp.MustCompile(`pid=(\d+)`).FindSubmatch(out)
	if m == nil {
		fail(fmt.Errorf("no process listens on port %s: %s", port, out))
	}
	pid, _ := strconv.Atoi(string(m[1]))
	// outbox-devenv listens itself and forwards to the chDB server it
	// supervises, a child started with --tcp_port.
	dirs, err := os.ReadDir("/proc")
	check(err)
	for _, d := range dirs {
		child, err := strconv.Atoi(d.Name())
		if err != nil {
			continue
		}
		status, err1 := os.ReadFile("/proc/" + d.Name() + "/status")
		cmdline, err2 := os.ReadFile("/proc/" + d.Name() + "/cmdline")
		if err1 != nil || err2 != nil {
			continue
		}
		if strings.Contains(string(status), fmt.Sprintf("\nPPid:\t%d\n", pid)) && strings.Contains(string(cmdline), "--tcp_port") {
			return child
		}
	}
	return pid
}

func check(err error) {
	if err != nil {
		fail(err)
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "measure-clickhouse-insert:", strings.TrimSpace(err.Error()))
	os.Exit(1)
}
