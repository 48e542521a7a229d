package sink_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/testenv"
	"github.com/outbox-streamer/outbox-streamer/internal/record"
	"github.com/outbox-streamer/outbox-streamer/migrations"
	"github.com/outbox-streamer/outbox-streamer/sink"
)

// BenchmarkInsertCompression inserts batches of 1,000 rows of the benchmark's
// shape into a real ClickHouse (26.7) with each CLICKHOUSE_COMPRESSION: the
// streamer's cost of an insert, one op per row (under callgrind, the
// instructions of this process alone).
func BenchmarkInsertCompression(b *testing.B) {
	srv := testenv.ModernClickHouse(b)
	for _, method := range []string{sink.CompressionLZ4, sink.CompressionNone} {
		b.Run(method, func(b *testing.B) {
			ctx := context.Background()
			cfg := sink.Config{Addr: srv.Addr, Database: testenv.NewCHDatabase(b, srv), Compression: method}
			if err := cfg.Validate(); err != nil {
				b.Fatal(err)
			}
			if err := migrations.Up(ctx, migrations.Config{PostgresDSN: testenv.NewDatabase(b), Publication: "outbox_publication", ClickHouse: cfg}); err != nil {
				b.Fatal(err)
			}
			w, err := sink.Open(ctx, cfg, zap.NewNop())
			if err != nil {
				b.Fatal(err)
			}
			defer w.Close()
			const batch = 1000
			events := make([]record.Event, batch)
			at := time.Date(2026, 12, 7, 10, 0, 0, 0, time.UTC)
			var id int64
			fill := func() {
				for i := range events {
					id++
					events[i] = record.Event{ID: id, Type: "bench.event", Environment: "bench", Time: at.Add(time.Duration(id) * time.Millisecond),
						Context: fmt.Sprintf(`{"n": %d, "user": "u%d", "amount": %d.5}`, id, id, id), MetadataVersion: 1,
						CreatedAt: at, CommitLSN: uint64(id) * 100}
				}
			}
			b.ReportAllocs()
			rows := 0
			for b.Loop() {
				if rows%batch == 0 {
					b.StopTimer()
					fill()
					b.StartTimer()
					if err := w.Insert(ctx, events); err != nil {
						b.Fatal(err)
					}
				}
				rows++
			}
		})
	}
}
