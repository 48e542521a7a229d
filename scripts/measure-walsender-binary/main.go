// Command measure-walsender-binary counts the instructions PostgreSQL's
// walsender spends per outbox row with pgoutput's text and binary formats
// (REPLICATION_BINARY), a figure the machine's load does not move. It creates a
// cluster of its own, commits -rows rows of the benchmark's shape to an outbox
// as migration 1 creates it behind slots made before them, restarts the server
// under valgrind's callgrind and drains the slots text and binary alternately,
// with the streamer's session settings. It is a one-off measurement for the
// performance notes, not a test; run it as root with valgrind installed:
//
//	go run ./scripts/measure-walsender-binary [-rows 50000] [-pgbin /usr/lib/postgresql/15/bin]
package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
)

const outbox = `CREATE TABLE event_outbox (id BIGSERIAL PRIMARY KEY, event_type VARCHAR(255) NOT NULL,
	event_date_time TIMESTAMP NOT NULL, environment VARCHAR(50) NOT NULL DEFAULT '',
	event_context JSONB NOT NULL DEFAULT '{}'::jsonb, metadata_version BIGINT NOT NULL DEFAULT 1,
	status VARCHAR(20) NOT NULL DEFAULT 'pending', created_at TIMESTAMP NOT NULL DEFAULT (now() AT TIME ZONE 'UTC'),
	updated_at TIMESTAMP NOT NULL DEFAULT (now() AT TIME ZONE 'UTC'), attempts INTEGER NOT NULL DEFAULT 0,
	last_error TEXT, next_attempt_at TIMESTAMPTZ)`

const rowsSQL = `INSERT INTO event_outbox (event_type, event_date_time, environment, event_context, metadata_version)
	SELECT 'bench.event', (now() AT TIME ZONE 'UTC') - g * interval '1 ms', 'bench',
		jsonb_build_object('n', g, 'user', 'u' || g, 'amount', g * 1.5), 1
	FROM generate_series(1, $1) g`

func main() {
	rows := flag.Int("rows", 50000, "rows to drain per slot (transactions of 1,000)")
	pgbin := flag.String("pgbin", "/usr/lib/postgresql/15/bin", "PostgreSQL server binaries")
	flag.Parse()
	dir, err := os.MkdirTemp("", "measure-walsender-")
	check(err)
	defer os.RemoveAll(dir)
	check(os.MkdirAll(filepath.Join(dir, "cg"), 0o777))
	run("chown", "-R", "postgres", dir)
	data := filepath.Join(dir, "data")
	run("runuser", "-u", "postgres", "--", filepath.Join(*pgbin, "initdb"), "-D", data, "-U", "postgres", "-A", "trust")
	port := freePort()
	opts := []string{"-c", "wal_level=logical", "-c", "max_wal_senders=10", "-c", "max_replication_slots=10",
		"-c", "listen_addresses=127.0.0.1", "-p", port, "-c", "unix_socket_directories=" + dir, "-c", "wal_sender_timeout=0"}
	dsn := "postgres://postgres@127.0.0.1:" + port + "/postgres"
	modes := []bool{false, true, true, false}

	// Load the rows with a plain server.
	pgctl := filepath.Join(*pgbin, "pg_ctl")
	pg := start(filepath.Join(*pgbin, "postgres"), data, opts)
	defer stop(pgctl, data, pg) // also when a step below fails
	ctx := context.Background()
	conn := connect(ctx, dsn)
	exec1(ctx, conn, outbox)
	exec1(ctx, conn, `CREATE PUBLICATION outbox_publication FOR TABLE event_outbox WITH (publish = 'insert')`)
	for i := range modes {
		exec1(ctx, conn, fmt.Sprintf(`SELECT pg_create_logical_replication_slot('m%d', 'pgoutput')`, i))
	}
	for done := 0; done < *rows; done += 1000 {
		exec1(ctx, conn, rowsSQL, min(1000, *rows-done))
	}
	var end string
	check(conn.QueryRow(ctx, "SELECT pg_current_wal_lsn()::text").Scan(&end))
	conn.Close(ctx)
	stop(pgctl, data, pg)

	// Drain under callgrind: every forked backend writes cg/cg.<pid> on exit.
	vg := append([]string{"--tool=callgrind", "--trace-children=yes", "--callgrind-out-file=" + filepath.Join(dir, "cg", "cg.%p"),
		filepath.Join(*pgbin, "postgres")}, "-D", data)
	pg = start("valgrind", "", append(vg[:len(vg):len(vg)], opts...))
	defer stop(pgctl, data, pg)
	connect(ctx, dsn).Close(ctx) // ready
	perRow := map[bool][]int64{}
	for i, bin := range modes {
		pid, n := drain(ctx, dsn, fmt.Sprintf("m%d", i), bin, end)
		if n != *rows {
			log.Panicf("slot m%d: %d inserts, want %d", i, n, *rows)
		}
		ir := waitTotal(filepath.Join(dir, "cg", "cg."+pid))
		perRow[bin] = append(perRow[bin], ir/int64(n))
		fmt.Printf("slot m%d binary=%v: walsender %d instructions, %d per row\n", i, bin, ir, ir/int64(n))
	}
	stop(pgctl, data, pg)
	t, b := avg(perRow[false]), avg(perRow[true])
	fmt.Printf("walsender instructions per row: text %d, binary %d, binary/text %.3f\n", t, b, float64(b)/float64(t))
}

// drain streams slot with the streamer's plugin arguments until the server's
// WAL end passes end, and returns the walsender's pid and the inserts received.
func drain(ctx context.Context, dsn, slot string, bin bool, end string) (string, int) {
	cfg, err := pgconn.ParseConfig(dsn)
	check(err)
	cfg.RuntimeParams["replication"] = "database"
	cfg.RuntimeParams["DateStyle"] = "ISO, YMD"
	cfg.RuntimeParams["TimeZone"] = "UTC"
	conn, err := pgconn.ConnectConfig(ctx, cfg)
	check(err)
	res, err := conn.Exec(ctx, "SELECT pg_backend_pid()").ReadAll()
	check(err)
	pid := string(res[0].Rows[0][0])
	endLSN, err := pglogrepl.ParseLSN(end)
	check(err)
	args := []string{"proto_version '2'", "streaming 'on'", "publication_names 'outbox_publication'"}
	if bin {
		args = append(args, "binary 'true'")
	}
	check(pglogrepl.StartReplication(ctx, conn, slot, 0, pglogrepl.StartReplicationOptions{PluginArgs: args}))
	inserts := 0
	for {
		raw, err := conn.ReceiveMessage(ctx)
		check(err)
		cd, ok := raw.(*pgproto3.CopyData)
		if !ok || len(cd.Data) == 0 {
			continue
		}
		if cd.Data[0] == pglogrepl.PrimaryKeepaliveMessageByteID {
			ka, err := pglogrepl.ParsePrimaryKeepaliveMessage(cd.Data[1:])
			check(err)
			if ka.ServerWALEnd >= endLSN {
				break
			}
			continue
		}
		if len(cd.Data) > 25 && cd.Data[25] == 'I' { // XLogData header, then the pgoutput message
			inserts++
		}
	}
	conn.Close(ctx)
	return pid, inserts
}

// waitTotal reads a callgrind output's total once the process has written it.
func waitTotal(path string) int64 {
	for i := 0; i < 600; i++ {
		if f, err := os.Open(path); err == nil {
			sc := bufio.NewScanner(f)
			for sc.Scan() {
				if l := sc.Text(); strings.HasPrefix(l, "totals:") || strings.HasPrefix(l, "summary:") {
					f.Close()
					n, err := strconv.ParseInt(strings.Fields(l)[1], 10, 64)
					check(err)
					return n
				}
			}
			f.Close()
		}
		time.Sleep(100 * time.Millisecond)
	}
	log.Panicf("%s: no total", path)
	return 0
}

func start(name, data string, args []string) *exec.Cmd {
	if data != "" {
		args = append([]string{"-D", data}, args...)
	}
	cmd := exec.Command("runuser", append([]string{"-u", "postgres", "--", name}, args...)...)
	check(cmd.Start())
	return cmd
}

// stop shuts the server down (fast) once; runuser does not pass signals on.
func stop(pgctl, data string, cmd *exec.Cmd) {
	if cmd.ProcessState != nil {
		return
	}
	_ = exec.Command("runuser", "-u", "postgres", "--", pgctl, "-D", data, "-m", "fast", "-w", "-t", "120", "stop").Run()
	_ = cmd.Wait()
}

func connect(ctx context.Context, dsn string) *pgx.Conn {
	for i := 0; ; i++ {
		conn, err := pgx.Connect(ctx, dsn)
		if err == nil {
			return conn
		}
		if i == 600 {
			log.Panic(err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func exec1(ctx context.Context, conn *pgx.Conn, sql string, args ...any) {
	if _, err := conn.Exec(ctx, sql, args...); err != nil {
		log.Panicf("%s: %v", sql, err)
	}
}

func run(name string, args ...string) {
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		log.Fatalf("%s: %v\n%s", name, err, out)
	}
}

func freePort() string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	check(err)
	defer l.Close()
	return strconv.Itoa(l.Addr().(*net.TCPAddr).Port)
}

func avg(v []int64) int64 {
	var s int64
	for _, x := range v {
		s += x
	}
	return s / int64(len(v))
}

// check panics rather than exit, so that the deferred stop runs.
func check(err error) {
	if err != nil {
		log.Panic(err)
	}
}
