package replication_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/fixture"
	"github.com/outbox-streamer/outbox-streamer/internal/harness/testenv"
	"github.com/outbox-streamer/outbox-streamer/internal/pipeline"
	"github.com/outbox-streamer/outbox-streamer/replication"
)

// binaryE2ERows are inserted alike in every run of TestBinaryEndToEnd: small
// transactions of varied values (one infinity, which must fail), then one
// transaction large enough to be streamed before its commit.
var binaryE2ERows = []string{
	`INSERT INTO event_outbox (event_type, event_date_time, environment, event_context, metadata_version, created_at) VALUES
		('e2e.a', '2026-11-23 18:49:29.123456', 'prod', '{"s": "ü€😀", "n": [1, 2.5, null]}', 9223372036854775807, '2026-11-23 18:49:30'),
		('e2e.b', '1960-01-01 00:00:00.000001', '', '{}', -9223372036854775808, '1999-12-31 23:59:59.999999'),
		('e2e.inf', 'infinity', 'prod', '{}', 1, '2026-01-01 00:00:00')`,
	`INSERT INTO event_outbox (event_type, event_date_time, environment, event_context, metadata_version, created_at)
		SELECT 'e2e.g' || (g % 7), '2026-11-30 12:00:00'::timestamp + g * interval '1.000001 second', 'env' || (g % 3),
			jsonb_build_object('n', g, 'pad', repeat('x', 200)), g, '2026-12-01 00:00:00'::timestamp + g * interval '1 ms'
		FROM generate_series(1, 2000) g`,
}

// TestBinaryEndToEnd streams the same rows with REPLICATION_BINARY off and on
// (PostgreSQL 14+, the large transaction streamed before its commit) and
// compares what ClickHouse holds and every outbox row's status: binary format
// must change nothing that is delivered.
func TestBinaryEndToEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("needs PostgreSQL and ClickHouse")
	}
	srv := testenv.ModernClickHouse(t)
	got := map[string]string{}
	for _, mode := range []string{replication.BinaryOff, replication.BinaryOn} {
		t.Run(mode, func(t *testing.T) {
			e := fixture.New(t, srv)
			logs := streamWithBinary(t, e, mode)
			for _, q := range binaryE2ERows {
				if _, err := e.Pool.Exec(context.Background(), q); err != nil {
					t.Fatal(err)
				}
			}
			fixture.WaitFor(t, 2*time.Minute, "no outbox row pending", func() bool { return e.StatusCounts(t)["pending"] == 0 })
			if n := logs.FilterMessage("streaming").FilterField(zap.Bool("binary", mode == replication.BinaryOn)).Len(); n == 0 {
				t.Fatalf("no %q log line with binary=%v: %v", "streaming", mode == replication.BinaryOn, logs.All())
			}
			got[mode] = deliveredState(t, e)
		})
	}
	off, on := got[replication.BinaryOff], got[replication.BinaryOn]
	if off == "" || on == "" {
		t.Fatal("a run did not finish")
	}
	if off != on {
		t.Errorf("ClickHouse and the outbox differ between text and binary:\n%s", firstDifference(off, on))
	}
	if !strings.Contains(off, " dead\n") || strings.Count(off, "\n") < 2003 {
		t.Errorf("unexpected state (the infinity row dead: the streamer cannot hold it; 2,002 rows delivered):\n%.2000s", off)
	}
}

// streamWithBinary runs the pipeline on e with REPLICATION_BINARY mode, every
// transaction past 64kB streamed before its commit, until the test ends. It
// returns the pipeline's log at Info.
func streamWithBinary(t *testing.T, e *fixture.Env, mode string) *observer.ObservedLogs {
	t.Helper()
	core, logs := observer.New(zapcore.InfoLevel)
	cfg := pipeline.Config{
		Replication: replication.Config{DSN: e.DSN + "?options=-c%20logical_decoding_work_mem%3D64kB", Slot: e.Slot, Publication: e.Publication,
			StatusInterval: 100 * time.Millisecond, Binary: mode},
		Run:  replication.RunConfig{BatchSize: 500, BatchTimeout: 50 * time.Millisecond},
		Sink: e.Sink,
	}
	if strings.Contains(e.DSN, "?") {
		cfg.Replication.DSN = strings.Replace(cfg.Replication.DSN, "?options", "&options", 1)
	}
	fixture.RunPipeline(t, cfg, zap.New(core))
	e.WaitStreaming(t)
	return logs
}

// deliveredState renders every event in ClickHouse (all columns the streamer
// writes but the commit LSN, which differs between databases) and every outbox
// row's id and status, one line each.
func deliveredState(t *testing.T, e *fixture.Env) string {
	t.Helper()
	ctx := context.Background()
	var b strings.Builder
	rows, err := e.CHConn.Query(ctx, `SELECT toString(event_id), event_type, toString(event_date_time), environment,
		toString(event_context), toString(metadata_version), toString(created_at) FROM `+e.Table+` ORDER BY event_id`)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var c [7]string
		if err := rows.Scan(&c[0], &c[1], &c[2], &c[3], &c[4], &c[5], &c[6]); err != nil {
			t.Fatal(err)
		}
		b.WriteString(strings.Join(c[:], "|") + "\n")
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	rows.Close()
	pg, err := e.Pool.Query(ctx, "SELECT id, status FROM event_outbox ORDER BY id")
	if err != nil {
		t.Fatal(err)
	}
	defer pg.Close()
	for pg.Next() {
		var id int64
		var status string
		if err := pg.Scan(&id, &status); err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(&b, "outbox %d %s\n", id, status)
	}
	return b.String()
}

func firstDifference(a, b string) string {
	la, lb := strings.Split(a, "\n"), strings.Split(b, "\n")
	for i := 0; i < len(la) && i < len(lb); i++ {
		if la[i] != lb[i] {
			return fmt.Sprintf("line %d:\n text   %s\n binary %s", i+1, la[i], lb[i])
		}
	}
	return fmt.Sprintf("%d lines in text, %d in binary", len(la), len(lb))
}
