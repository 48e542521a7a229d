package replication

import (
	"context"
	"flag"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

var measureWalsender = flag.Int("measure-walsender", 0, "drain this many outbox rows through text and binary slots and log the walsender's CPU per row (a measurement, not a test)")

// TestMeasureWalsenderBinary commits -measure-walsender rows (transactions of
// 1,000 with the shape the benchmark's producer writes), then drains them
// through ten slots created before them, text and binary alternately, with the
// session settings the streamer uses, and logs the CPU time (utime+stime from
// /proc) of each walsender. It asserts nothing: the figures are for the commit
// message. The server must run on this machine.
func TestMeasureWalsenderBinary(t *testing.T) {
	rows := *measureWalsender
	if rows == 0 {
		t.Skip("run with -measure-walsender=200000")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	dsn, conn := goldenSession(ctx, t, nil)
	plain, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close(context.Background())
	// Alternated so that neither format always drains first (the first drain
	// reads WAL the others find in the page cache).
	modes := []bool{false, true, true, false, false, true, true, false, false, true}
	conns := make([]*pgconn.PgConn, len(modes))
	for i := range modes {
		conns[i] = conn
		if i > 0 {
			conns[i] = replicationConn(ctx, t, dsn, nil)
		}
		if _, err := pglogrepl.CreateReplicationSlot(ctx, conns[i], fmt.Sprintf("measure_%d", i), "pgoutput",
			pglogrepl.CreateReplicationSlotOptions{Temporary: true}); err != nil {
			t.Fatal(err)
		}
	}
	for done := 0; done < rows; done += 1000 {
		if _, err := plain.Exec(ctx, `INSERT INTO event_outbox (event_type, event_date_time, environment, event_context, metadata_version)
			SELECT 'bench.event', (now() AT TIME ZONE 'UTC') - g * interval '1 ms', 'bench', jsonb_build_object('n', g, 'user', 'u' || g, 'amount', g * 1.5), 1
			FROM generate_series(1, $1) g`, min(1000, rows-done)); err != nil {
			t.Fatal(err)
		}
	}
	end := currentWAL(ctx, t, plain)
	cpu := map[bool][]float64{}
	for i, bin := range modes {
		us, inserts := drainSlot(ctx, t, conns[i], fmt.Sprintf("measure_%d", i), bin, end)
		if inserts != rows {
			t.Fatalf("slot %d: %d inserts drained, want %d", i, inserts, rows)
		}
		cpu[bin] = append(cpu[bin], us/float64(rows))
		t.Logf("slot %d binary=%v: walsender %.0f ms CPU, %.2f µs/row", i, bin, us/1000, us/float64(rows))
	}
	med := func(v []float64) float64 {
		slices.Sort(v)
		return v[len(v)/2]
	}
	t.Logf("walsender µs/row, median of %d: text %.2f, binary %.2f, binary/text %.3f", len(cpu[true]), med(cpu[false]), med(cpu[true]), med(cpu[true])/med(cpu[false]))
}

// drainSlot streams slot with the streamer's plugin arguments until the
// server's WAL end passes end, and returns the walsender's CPU time in µs and
// the inserts received.
func drainSlot(ctx context.Context, t *testing.T, conn *pgconn.PgConn, slot string, bin bool, end uint64) (float64, int) {
	t.Helper()
	res, err := conn.Exec(ctx, "SELECT pg_backend_pid()").ReadAll()
	if err != nil || len(res) != 1 || len(res[0].Rows) != 1 {
		t.Fatalf("walsender pid: %v", err)
	}
	pid := string(res[0].Rows[0][0])
	args := []string{"proto_version '2'", "streaming 'on'", "publication_names 'outbox_publication'"}
	if bin {
		args = append(args, "binary 'true'")
	}
	before := procCPU(t, pid)
	if err := pglogrepl.StartReplication(ctx, conn, slot, 0, pglogrepl.StartReplicationOptions{PluginArgs: args}); err != nil {
		t.Fatal(err)
	}
	inserts := 0
	receiveUntil(ctx, t, conn, end, func(wal []byte) {
		if len(wal) > 0 && wal[0] == 'I' {
			inserts++
		}
	})
	return procCPU(t, pid) - before, inserts
}

// procCPU reads utime+stime of process pid in µs.
func procCPU(t *testing.T, pid string) float64 {
	t.Helper()
	raw, err := os.ReadFile("/proc/" + pid + "/stat")
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(string(raw[strings.LastIndexByte(string(raw), ')')+2:]))
	utime, _ := strconv.ParseFloat(f[11], 64)
	stime, _ := strconv.ParseFloat(f[12], 64)
	return (utime + stime) * 1e6 / 100 // USER_HZ
}
