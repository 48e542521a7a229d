package replication

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/outbox-streamer/outbox-streamer/checkpoint"
	"github.com/outbox-streamer/outbox-streamer/internal/batch"
	"github.com/outbox-streamer/outbox-streamer/internal/record"
)

// benchMajor is the PostgreSQL whose capture the benchmarks decode: the
// suite's.
const benchMajor = 15

// benchMessages returns the captured protocol 1 transaction (Begin, Relation,
// Insert, Commit) from testdata.
func benchMessages(b *testing.B) (begin, rel, insert, commit []byte) {
	b.Helper()
	read := func(name string) []byte {
		data, err := os.ReadFile(filepath.Join(goldenMajorDir(benchMajor), name))
		if err != nil {
			b.Fatal(err)
		}
		return data
	}
	return read("00_begin.bin"), read("01_relation.bin"), read("02_insert.bin"), read("03_commit.bin")
}

// BenchmarkDecodeInsert decodes the captured insert of a real server: the
// decoder's cost per row.
func BenchmarkDecodeInsert(b *testing.B) {
	begin, rel, insert, _ := benchMessages(b)
	d := NewDecoder("public", "event_outbox", nil)
	var m Message
	for _, msg := range [][]byte{begin, rel} {
		if err := d.Decode(msg, &m); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportAllocs()
	b.SetBytes(int64(len(insert)))
	for b.Loop() {
		if err := d.Decode(insert, &m); err != nil || m.Kind != KindInsert {
			b.Fatalf("%v %v", err, m.Kind)
		}
	}
}

// BenchmarkReceiveRows feeds transactions of 1,000 captured inserts through
// the receive path (XLogData parsing, decoder, tracker, batch builder) with a
// consumer that resolves each batch: the streamer's cost per row before the
// writer. One op is one row.
func BenchmarkReceiveRows(b *testing.B) {
	begin, rel, insert, commit := benchMessages(b)
	s := &Stream{cfg: Config{StatusInterval: time.Hour}, dec: NewDecoder("public", "event_outbox", nil)}
	s.tracker = checkpoint.NewTracker(0)
	out := make(chan *batch.Batch, 4)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for bt := range out {
			if err := s.tracker.Resolve(bt.FirstSeq, bt.EndSeq()); err != nil {
				panic(err)
			}
		}
	}()
	r := &receiver{s: s, out: out, builder: batch.NewBuilder(1000, 0, time.Hour)}
	ctx := context.Background()
	frames := [][]byte{xlogData(1, begin), xlogData(2, rel), xlogData(3, insert), xlogData(4, commit)}
	handle := func(f []byte) {
		if err := r.handleCopyData(ctx, f); err != nil {
			b.Fatal(err)
		}
	}
	handle(frames[1])
	b.ReportAllocs()
	n := 0
	for b.Loop() {
		if n%1000 == 0 {
			handle(frames[0])
		}
		handle(frames[2])
		n++
		if n%1000 == 0 {
			handle(frames[3])
		}
	}
	b.StopTimer()
	close(out)
	<-done
}

// BenchmarkDecodeCapturedRow decodes the same captured row of the outbox
// (testdata/pgoutput/binary, TestCaptureGoldenBinary) as text and as binary:
// the decoder's cost per row both ways.
func BenchmarkDecodeCapturedRow(b *testing.B) {
	for _, c := range []struct{ name, path string }{{"text", goldenText}, {"binary", goldenBinary}} {
		b.Run(c.name, func(b *testing.B) {
			d := NewDecoder("public", "event_outbox", nil)
			var m Message
			var insert []byte
			for _, msg := range readCapture(b, c.path, captureBinaryTest) {
				if msg[0] == 'I' {
					insert = msg
					break
				}
				if err := d.Decode(msg, &m); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportAllocs()
			b.SetBytes(int64(len(insert)))
			for b.Loop() {
				if err := d.Decode(insert, &m); err != nil || m.Kind != KindInsert || m.Event.Type != "golden.binary" {
					b.Fatalf("%v %v %q", err, m.Kind, m.Event.Type)
				}
			}
		})
	}
}

// BenchmarkSpillReplay replays a spilled streamed transaction of 1,000 rows
// of the benchmark's shape: the cost per row of protocol 2's local spill on
// the way back (one op is one row).
func BenchmarkSpillReplay(b *testing.B) {
	sp, err := openSpill(b.TempDir(), 0)
	if err != nil {
		b.Fatal(err)
	}
	at := time.Date(2026, 12, 7, 10, 0, 0, 123456000, time.UTC)
	ev := record.Event{ID: 1 << 40, Type: "bench.event", Time: at, Environment: "bench",
		Context: `{"n": 123456, "user": "u123456", "amount": 185184.0}`, MetadataVersion: 1, CreatedAt: at}
	const rows = 1000
	xid := uint32(0)
	b.ReportAllocs()
	n := 0
	for b.Loop() {
		if n%rows == 0 {
			b.StopTimer()
			xid++
			for i := 0; i < rows; i++ {
				if err := sp.Append(xid, xid, &ev); err != nil {
					b.Fatal(err)
				}
			}
			b.StartTimer()
			if err := sp.Replay(xid, func(ev *record.Event) error { return nil }); err != nil {
				b.Fatal(err)
			}
		}
		n++
	}
}
