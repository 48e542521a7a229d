package verify_test

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/testenv"
	"github.com/outbox-streamer/outbox-streamer/internal/outboxstore"
	"github.com/outbox-streamer/outbox-streamer/internal/verify"
)

// TestMillionRowBucketCost measures what verify reads for one bucket of
// 1,000,000 rows in an outbox of 3,000,000 (three such hours), on both sides:
// a clean run, then one with a row missing and one duplicated in the bucket.
// It asserts only the results, never times; it logs the figures quoted in
// docs/verify.md. Minutes of set-up: it runs only when asked,
//
//	OUTBOX_VERIFY_MEASURE=1 bin/outbox-devenv --legacy -- go test -count=1 -v -run TestMillionRowBucketCost ./internal/verify/
func TestMillionRowBucketCost(t *testing.T) {
	if os.Getenv("OUTBOX_VERIFY_MEASURE") == "" {
		t.Skip("set OUTBOX_VERIFY_MEASURE=1 to measure verify on a 1,000,000-row bucket")
	}
	const perHour = 1000000
	for _, srv := range testenv.ClickHouseServers(t) {
		t.Run(srv.Name, func(t *testing.T) {
			f := newFixture(t, srv, nil)
			ctx := context.Background()
			start := wall(2026, 11, 1, 9, 0, 0, 0)
			began := time.Now()
			// One row every 3.6 ms for three hours, with contexts like the
			// e2e producer's (about 40 bytes of JSON).
			if _, err := f.e.Pool.Exec(ctx, `INSERT INTO event_outbox (event_type, event_date_time, created_at, status, event_context)
				SELECT 'type.' || (g % 7), $1::timestamp + g * interval '3600 microseconds', $1::timestamp + g * interval '3600 microseconds',
				       'processed', jsonb_build_object('n', g, 'note', 'event ' || g)
				FROM generate_series(0, $2 - 1) AS g`, start, 3*perHour); err != nil {
				t.Fatal(err)
			}
			if _, err := f.e.Pool.Exec(ctx, "VACUUM ANALYZE event_outbox"); err != nil {
				t.Fatal(err)
			}
			at := fmt.Sprintf("fromUnixTimestamp64Micro(toInt64(%d + number * 3600), 'UTC')", start.UnixMicro())
			if srv.Legacy {
				at = fmt.Sprintf("toDateTime(%d + intDiv(number * 3600, 1000000), 'UTC')", start.Unix())
			}
			if err := f.e.CHConn.Exec(ctx, fmt.Sprintf(`INSERT INTO %s (event_id, event_type, event_date_time, environment, event_context, metadata_version, created_at, commit_lsn)
				SELECT number + 1, concat('type.', toString(number %% 7)), %s, '', concat('{"n": ', toString(number), '}'), 1, %s, 0
				FROM system.numbers LIMIT %d`, f.e.Table, at, at, 3*perHour)); err != nil {
				t.Fatal(err)
			}
			t.Logf("set-up of %d rows on each side: %s", 3*perHour, time.Since(began).Round(time.Second))

			bucket := verify.Config{From: start.Add(time.Hour), Until: start.Add(2 * time.Hour)}
			measure := func(what string, cfg verify.Config) *verify.Report {
				t.Helper()
				before := tableStats(t, f)
				t0 := time.Now()
				rep := f.verify(t, cfg)
				took := time.Since(t0)
				after := tableStats(t, f)
				c := rep.Cost
				t.Logf("%s: %s; outbox %d statements + %d id probes, %d rows read, seq scans %d, index scans %d, buffers hit %d read %d (%.1f MiB); ClickHouse %d queries, %d rows, %.1f MiB read",
					what, took.Round(time.Millisecond), c.OutboxStatements, c.OutboxProbes, c.OutboxRows,
					after.seqScan-before.seqScan, after.idxScan-before.idxScan, after.hit-before.hit, after.read-before.read,
					float64(after.hit-before.hit+after.read-before.read)*8/1024, c.ClickHouseQuery, c.ClickHouseRows, float64(c.ClickHouseBytes)/(1<<20))
				if after.seqScan != before.seqScan {
					t.Errorf("%s: %d sequential scans of the outbox", what, after.seqScan-before.seqScan)
				}
				return rep
			}
			if rep := measure("clean 1,000,000-row bucket", bucket); !rep.Match || rep.Totals.Outbox != perHour || rep.Totals.ClickHouse != perHour {
				t.Fatalf("clean run: %+v", rep.Totals)
			}
			if rep := measure("all three hours", verify.Config{From: start, Until: start.Add(3 * time.Hour)}); !rep.Match || rep.Totals.Outbox != 3*perHour {
				t.Fatalf("three hours: %+v", rep.Totals)
			}

			explain(t, f, outboxstore.VerifyScan{From: bucket.From, Until: bucket.Until, Width: time.Hour, LoID: perHour + 1})

			// One row missing, one twice: the bucket's ids are compared.
			mid := int64(perHour + perHour/2)
			f.deleteFromClickHouse(t, mid)
			if err := f.e.CHConn.Exec(ctx, fmt.Sprintf("INSERT INTO %s SELECT * FROM %s WHERE event_id = %d", f.e.Table, f.e.Table, mid+1)); err != nil {
				t.Fatal(err)
			}
			rep := measure("bucket with 1 missing and 1 duplicated row (ids compared)", bucket)
			if rep.Totals.Missing != 1 || rep.Totals.Duplicates != 1 || missingIDs(rep)[0] != mid {
				t.Fatalf("run with differences: %+v", rep.Totals)
			}
		})
	}
}

type stats struct{ seqScan, idxScan, hit, read int64 }

// tableStats reads the outbox's scan and buffer counters (the statistics
// collector's, flushed first).
func tableStats(t *testing.T, f *verifyFixture) stats {
	t.Helper()
	ctx := context.Background()
	var s stats
	if _, err := f.e.Pool.Exec(ctx, "SELECT pg_stat_force_next_flush()"); err != nil {
		t.Fatal(err)
	}
	// A fresh snapshot of the counters (they are cached per transaction).
	if _, err := f.e.Pool.Exec(ctx, "SELECT pg_stat_clear_snapshot()"); err != nil {
		t.Fatal(err)
	}
	err := f.e.Pool.QueryRow(ctx, `SELECT coalesce(t.seq_scan, 0), coalesce(t.idx_scan, 0),
		coalesce(io.heap_blks_hit, 0) + coalesce(io.idx_blks_hit, 0), coalesce(io.heap_blks_read, 0) + coalesce(io.idx_blks_read, 0)
		FROM pg_stat_user_tables t JOIN pg_statio_user_tables io USING (relid) WHERE t.relname = 'event_outbox'`).Scan(&s.seqScan, &s.idxScan, &s.hit, &s.read)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// explain logs the plan of one aggregate chunk (the bucket's first), custom and generic (pgx
// prepares statements, and PostgreSQL may switch a prepared statement to a
// generic plan after five runs).
func explain(t *testing.T, f *verifyFixture, scan outboxstore.VerifyScan) {
	t.Helper()
	ctx := context.Background()
	conn, err := f.e.Pool.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Release()
	q := scan.VerifyAggregateSQL()
	day := 24 * time.Hour
	args := []any{scan.LoID, scan.LoID + 20000, scan.From.Add(-day), scan.Until.Add(day), scan.From.UnixMicro(), time.Hour.Microseconds(), scan.Until.UnixMicro()}
	for _, mode := range []string{"auto", "force_generic_plan"} {
		if _, err := conn.Exec(ctx, "SET plan_cache_mode = "+mode); err != nil {
			t.Fatal(err)
		}
		rows, err := conn.Query(ctx, "EXPLAIN (ANALYZE, BUFFERS) "+q, args...)
		if err != nil {
			t.Fatal(err)
		}
		var plan []string
		for rows.Next() {
			var line string
			if err := rows.Scan(&line); err != nil {
				t.Fatal(err)
			}
			plan = append(plan, line)
		}
		rows.Close()
		joined := strings.Join(plan, "\n")
		t.Logf("plan of the first aggregate chunk (plan_cache_mode %s):\n%s", mode, joined)
		if strings.Contains(joined, "Seq Scan on event_outbox") {
			t.Errorf("plan_cache_mode %s: a sequential scan of the outbox", mode)
		}
	}
}
