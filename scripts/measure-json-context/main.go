// Command measure-json-context compares event_context as String and as JSON
// on the local ClickHouse 26.7 that outbox-devenv starts: the same rows (a
// million by default, contexts shaped like a sign-in event's) in two event
// tables made by the migrations, then a typical filter on a context field,
// String with JSONExtractString and JSON with the subcolumn. It reports the
// median time of several runs and the rows and (uncompressed) bytes each
// query read, from the server's progress packets. A one-off measurement for the notes, not a test:
//
//	bin/outbox-devenv -- go run ./scripts/measure-json-context [-rows 1000000]
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"sort"
	"strconv"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"go.uber.org/zap"

	"github.com/outbox-streamer/outbox-streamer/internal/record"
	"github.com/outbox-streamer/outbox-streamer/migrations"
	"github.com/outbox-streamer/outbox-streamer/sink"
)

func main() {
	rows := flag.Int("rows", 1_000_000, "rows in each table")
	runs := flag.Int("runs", 7, "runs of each query (the median is reported)")
	flag.Parse()
	host, port, dsn := os.Getenv("CLICKHOUSE_HOST"), os.Getenv("CLICKHOUSE_PORT"), os.Getenv("DATABASE_URL")
	if host == "" || dsn == "" {
		fmt.Fprintln(os.Stderr, "CLICKHOUSE_HOST or DATABASE_URL is empty: run under bin/outbox-devenv")
		os.Exit(2)
	}
	ctx := context.Background()
	type variant struct{ name, typ, query string }
	variants := []variant{
		{"String + JSONExtractString", "String", "SELECT count() FROM %s WHERE JSONExtractString(event_context, 'user_id') = 'u-4242'"},
		{"JSON subcolumn", "JSON", "SELECT count() FROM %s WHERE event_context.user_id = 'u-4242'"},
	}
	fmt.Printf("rows %d, ClickHouse at %s:%s\n", *rows, host, port)
	for _, v := range variants {
		cfg := sink.Config{Addr: host + ":" + port, User: "default", Database: "measure_json_" + v.typ, Table: "event_log"}
		if err := migrations.Up(ctx, migrations.Config{PostgresDSN: dsn, Publication: "outbox_publication", ClickHouse: cfg, ContextType: v.typ}); err != nil {
			fail(err)
		}
		w, err := sink.Open(ctx, cfg, zap.NewNop())
		if err != nil {
			fail(err)
		}
		start := time.Now()
		const chunk = 50_000
		now := time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC)
		for off := 0; off < *rows; off += chunk {
			evs := make([]record.Event, 0, chunk)
			for i := off; i < min(off+chunk, *rows); i++ {
				evs = append(evs, record.Event{ID: int64(i + 1), Type: "user.signed_in", Time: now.Add(time.Duration(i) * time.Second), CreatedAt: now,
					Environment: "prod", MetadataVersion: 1,
					Context: `{"user_id": "u-` + strconv.Itoa(i%10_000) + `", "ip": "10.0.` + strconv.Itoa(i%256) + `.` + strconv.Itoa(i%199) +
						`", "agent": "Mozilla/5.0 (X11; Linux x86_64) Gecko/20100101 Firefox/140.0", "session": {"id": "s-` + strconv.Itoa(i) + `", "mfa": ` + strconv.FormatBool(i%3 == 0) + `}}`})
			}
			if err := w.Insert(ctx, evs); err != nil {
				fail(err)
			}
		}
		load := time.Since(start)
		conn, err := sink.Connect(cfg)
		if err != nil {
			fail(err)
		}
		if err := conn.Exec(ctx, "OPTIMIZE TABLE "+w.Table()+" FINAL"); err != nil {
			fail(err)
		}
		var bytesOnDisk uint64
		if err := conn.QueryRow(ctx, "SELECT sum(data_compressed_bytes) FROM system.columns WHERE database = ? AND table = 'event_log' AND name = 'event_context'", cfg.Database).Scan(&bytesOnDisk); err != nil {
			fail(err)
		}
		q := fmt.Sprintf(v.query, w.Table())
		var times []time.Duration
		var n, readBytes, readRows uint64
		for r := 0; r < *runs; r++ {
			readBytes, readRows = 0, 0
			qctx := clickhouse.Context(ctx, clickhouse.WithSettings(clickhouse.Settings{"use_query_cache": 0}),
				clickhouse.WithProgress(func(p *clickhouse.Progress) { readBytes += p.Bytes; readRows += p.Rows }))
			t0 := time.Now()
			if err := conn.QueryRow(qctx, q).Scan(&n); err != nil {
				fail(err)
			}
			times = append(times, time.Since(t0))
		}
		sort.Slice(times, func(i, j int) bool { return times[i] < times[j] })
		fmt.Printf("%-28s load %6.1fs  event_context on disk %6.1f MiB  query median %6.1f ms (min %.1f, max %.1f)  read %.1f MiB, %d rows  -> %d matches\n",
			v.name, load.Seconds(), float64(bytesOnDisk)/(1<<20), ms(times[len(times)/2]), ms(times[0]), ms(times[len(times)-1]),
			float64(readBytes)/(1<<20), readRows, n)
		_ = conn.Exec(ctx, "DROP DATABASE IF EXISTS "+sink.QuoteIdent(cfg.Database))
		conn.Close()
		w.Close()
	}
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func fail(err error) {
	fmt.Fprintln(os.Stderr, "measure-json-context:", err)
	os.Exit(1)
}
