package replication

import (
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/outbox-streamer/outbox-streamer/checkpoint"
	"github.com/outbox-streamer/outbox-streamer/internal/batch"
)

// goldenStreamFile is a protocol 2 session captured with
// logical_decoding_work_mem at its minimum (64kB), so that every large
// transaction is streamed before its commit: each message as a u32 length
// and the pgoutput bytes. TestCaptureGoldenStreaming writes one per major
// from 14 (13 has no protocol 2).
const goldenStreamFile = "stream.bin"

// minStreamingMajor is the first PostgreSQL that streams in-progress
// transactions (pgoutput protocol 2).
const minStreamingMajor = 14

// The transactions of the capture, by event_type prefix: what must reach
// ClickHouse (keep) and what must not (the rest), with the row counts.
var goldenV2Want = map[string]int{
	"t1.keep": 700, "t3.keep": 600, "t4.keep": 600, "small.keep": 3,
}

// goldenV2Script is what the capture runs: t1 rolls back a savepoint and a
// nested savepoint whose inner one was released; t2 is streamed and then
// aborted; t3 and t4 run at once on two connections, their chunks
// interleaved, t4 commits first; a small transaction commits between them
// without being streamed. Before rolling t2 back it calls streamed with t2's
// xid, which must return once t2 has been streamed: PostgreSQL 18 skips
// decoding a transaction it already knows to be aborted, and the capture
// needs the abort of a streamed transaction.
func goldenV2Script(ctx context.Context, t *testing.T, dsn string, streamed func(xid uint32)) {
	rows := func(prefix string, n int) string {
		return fmt.Sprintf(`INSERT INTO event_outbox (event_type, event_date_time, environment, event_context, metadata_version)
			SELECT '%s', '2026-11-30 12:00:00'::timestamp + g * interval '1 second', 'prod', json_build_object('n', g, 'pad', repeat('x', 200))::jsonb, 1
			FROM generate_series(1, %d) g`, prefix, n)
	}
	conns := make([]*pgx.Conn, 2)
	for i := range conns {
		c, err := pgx.Connect(ctx, dsn)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close(context.Background())
		conns[i] = c
	}
	exec := func(c *pgx.Conn, sql ...string) {
		t.Helper()
		for _, q := range sql {
			if _, err := c.Exec(ctx, q); err != nil {
				t.Fatalf("%s: %v", q, err)
			}
		}
	}
	a, b := conns[0], conns[1]
	exec(a, "BEGIN", rows("t1.keep", 300), "SAVEPOINT s1", rows("t1.rolledback", 300), "ROLLBACK TO SAVEPOINT s1",
		rows("t1.keep", 200), "SAVEPOINT outer_sp", rows("t1.rolledback.outer", 200), "SAVEPOINT inner_sp",
		rows("t1.rolledback.inner", 200), "RELEASE SAVEPOINT inner_sp", "ROLLBACK TO SAVEPOINT outer_sp",
		rows("t1.keep", 200), "COMMIT")
	exec(a, "BEGIN", rows("t2.aborted", 800))
	var xid int64
	if err := a.QueryRow(ctx, "SELECT txid_current() % 4294967296").Scan(&xid); err != nil {
		t.Fatal(err)
	}
	streamed(uint32(xid))
	exec(a, "ROLLBACK")
	exec(a, "BEGIN", rows("t3.keep", 300))
	exec(b, "BEGIN", rows("t4.keep", 300))
	exec(a, rows("t3.keep", 300))
	exec(b, rows("t4.keep", 300))
	exec(b, "COMMIT")
	exec(b, "BEGIN", rows("small.keep", 3), "COMMIT")
	exec(a, "COMMIT")
}

// TestCaptureGoldenStreaming runs goldenV2Script on a real server and writes
// the protocol 2 session to testdata/pgoutput/pg<major>. It runs only with
// -update-golden.
func TestCaptureGoldenStreaming(t *testing.T) {
	if !*updateGolden {
		t.Skip("run with -update-golden to capture messages from a real server")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	dsn, conn := goldenSession(ctx, t, map[string]string{"logical_decoding_work_mem": "64kB"})
	major := serverMajor(conn.ParameterStatus("server_version"))
	if major < minStreamingMajor {
		t.Skipf("PostgreSQL %d has no protocol 2 (streaming of in-progress transactions starts with %d)", major, minStreamingMajor)
	}
	if _, err := pglogrepl.CreateReplicationSlot(ctx, conn, "golden_v2", "pgoutput", pglogrepl.CreateReplicationSlotOptions{Temporary: true}); err != nil {
		t.Fatal(err)
	}
	if err := pglogrepl.StartReplication(ctx, conn, "golden_v2", 0, pglogrepl.StartReplicationOptions{
		PluginArgs: []string{"proto_version '2'", "streaming 'on'", "publication_names 'outbox_publication'"}}); err != nil {
		t.Fatal(err)
	}
	c := &captureV2{conn: conn, streamedXid: make(chan uint32, 64), end: make(chan uint64, 1)}
	done := make(chan error, 1)
	go func() { done <- c.receive(ctx) }()
	goldenV2Script(ctx, t, dsn, func(xid uint32) {
		for {
			select {
			case x := <-c.streamedXid:
				if x == xid {
					return
				}
			case err := <-done:
				t.Fatalf("receiving ended before t2 was streamed: %v", err)
			case <-ctx.Done():
				t.Fatalf("t2 (xid %d) was not streamed: %v", xid, ctx.Err())
			}
		}
	})
	plain, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close(context.Background())
	c.end <- currentWAL(ctx, t, plain)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	writeCapture(t, filepath.Join(goldenMajorDir(major), goldenStreamFile), c.out, c.n)
}

// captureV2 receives a protocol 2 session while the script runs.
type captureV2 struct {
	conn        *pgconn.PgConn
	streamedXid chan uint32 // xids of stream start messages
	end         chan uint64 // the WAL position after the script
	out         []byte      // each message as a u32 length and its bytes
	n           int
}

// receive records messages until a keepalive reports the server's WAL end
// past the position sent on end.
func (c *captureV2) receive(ctx context.Context) error {
	var end uint64
	for {
		raw, err := c.conn.ReceiveMessage(ctx)
		if err != nil {
			return err
		}
		cd, ok := raw.(*pgproto3.CopyData)
		if !ok || len(cd.Data) == 0 {
			continue
		}
		if cd.Data[0] == pglogrepl.PrimaryKeepaliveMessageByteID {
			ka, err := pglogrepl.ParsePrimaryKeepaliveMessage(cd.Data[1:])
			if err != nil {
				return err
			}
			select {
			case end = <-c.end:
			default:
			}
			if end != 0 && uint64(ka.ServerWALEnd) >= end {
				return nil
			}
			// The walsender sends one keepalive per wait for WAL until it
			// hears from us; answer (without confirming anything) so that the
			// next one comes, a little later.
			time.Sleep(20 * time.Millisecond)
			if err := pglogrepl.SendStandbyStatusUpdate(ctx, c.conn, pglogrepl.StandbyStatusUpdate{}); err != nil {
				return err
			}
			continue
		}
		xld, err := pglogrepl.ParseXLogData(cd.Data[1:])
		if err != nil {
			return err
		}
		msg := xld.WALData
		if len(msg) >= 5 && msg[0] == 'S' {
			c.streamedXid <- binary.BigEndian.Uint32(msg[1:5])
		}
		c.out = binary.BigEndian.AppendUint32(c.out, uint32(len(msg)))
		c.out = append(c.out, msg...)
		c.n++
	}
}

// goldenMessages reads the protocol 2 capture in dir.
func goldenMessages(t *testing.T, dir string) [][]byte {
	t.Helper()
	return readCapture(t, filepath.Join(dir, goldenStreamFile), "TestCaptureGoldenStreaming")
}

// xlogData frames a pgoutput message as the server sends it.
func xlogData(walStart uint64, data []byte) []byte {
	b := []byte{pglogrepl.XLogDataByteID}
	b = binary.BigEndian.AppendUint64(b, walStart)
	b = binary.BigEndian.AppendUint64(b, walStart)
	b = binary.BigEndian.AppendUint64(b, 0)
	return append(b, data...)
}

// TestGoldenStreaming feeds the captured protocol 2 session through the real
// receive path (decoder, spill, replay, batches, tracker) and checks that
// exactly the committed rows come out, each once, in commit order, and that
// the acknowledgement never passes a transaction whose rows are unresolved.
func TestGoldenStreaming(t *testing.T) {
	forEachGoldenMajor(t, minStreamingMajor, checkGoldenStreaming)
}

// feedGolden passes the captured session in dir through a receiver with rc,
// as Run does, and returns it with every batch it handed over; its spill is
// in spillDir. each, if set, sees every message after it is handled.
func feedGolden(t *testing.T, dir string, rc RunConfig, each func(*Message)) (r *receiver, out chan *batch.Batch, spillDir string) {
	t.Helper()
	msgs := goldenMessages(t, dir)
	s := &Stream{cfg: Config{StatusInterval: time.Hour, SpillDir: t.TempDir()}, dec: NewDecoder("public", "event_outbox", nil)}
	s.tracker = checkpoint.NewTracker(0)
	rc.setDefaults()
	txns, err := openStreamed(s.cfg, rc)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(txns.close)
	out = make(chan *batch.Batch, 100000)
	r = &receiver{s: s, rc: rc, out: out, builder: batch.NewBuilder(1000, 0, time.Hour), txns: txns}
	ctx := context.Background()
	for i, m := range msgs {
		if err := r.handleCopyData(ctx, xlogData(uint64(i), m)); err != nil {
			t.Fatalf("message %d (%q): %v", i, m[0], err)
		}
		if each != nil {
			each(&r.msg)
		}
	}
	if b := r.builder.Take(); b != nil {
		out <- b
	}
	close(out)
	return r, out, s.cfg.SpillDir
}

func checkGoldenStreaming(t *testing.T, dir string) {
	kinds := map[Kind]int{}
	var lastEnd uint64
	ends := map[uint64]uint64{} // commit record start -> end
	r, out, spillDir := feedGolden(t, dir, RunConfig{}, func(m *Message) {
		kinds[m.Kind]++
		if k := m.Kind; k == KindCommit || k == KindStreamCommit {
			lastEnd = m.EndLSN
			ends[m.CommitLSN] = m.EndLSN
		}
	})
	s, sp := r.s, r.txns.spill
	for _, k := range []Kind{KindStreamStart, KindStreamStop, KindStreamCommit, KindStreamAbort, KindBegin, KindCommit} {
		if kinds[k] == 0 {
			t.Errorf("the capture has no %v message: not the session it should be (kinds %v)", k, kinds)
		}
	}
	got := map[string]int{}
	ids := map[int64]bool{}
	var order []string
	var batches []*batch.Batch
	for b := range out {
		batches = append(batches, b)
	}
	withEnd := 0
	for bi, b := range batches {
		if b.CommitEnd != 0 {
			withEnd++
		}
		for i := range b.Events {
			ev := b.Events[i]
			// STANDBY_HOLD waits for CommitEnd: it must cover every row's commit.
			if b.CommitEnd != 0 && b.CommitEnd < ends[ev.CommitLSN] {
				t.Fatalf("batch %d: commit end %X before the end %X of its row %d's commit", bi, b.CommitEnd, ends[ev.CommitLSN], ev.ID)
			}
			prefix := ev.Type
			got[prefix]++
			if ids[ev.ID] {
				t.Errorf("id %d delivered twice", ev.ID)
			}
			ids[ev.ID] = true
			if ev.CommitLSN == 0 || ev.Xid == 0 || ev.CommitTime.IsZero() || ev.CreatedAt.IsZero() || ev.Problem != "" {
				t.Fatalf("replayed event not stamped: %+v", ev)
			}
			if len(order) == 0 || order[len(order)-1] != prefix {
				order = append(order, prefix)
			}
		}
		// Acknowledgement: the last transaction's commit is confirmed only
		// once its last batch is resolved.
		if bi == len(batches)-1 && s.tracker.SafeLSN() >= lastEnd {
			t.Errorf("safe LSN %d passed the last commit (%d) before its last batch was resolved", s.tracker.SafeLSN(), lastEnd)
		}
		if err := s.tracker.Resolve(b.FirstSeq, b.EndSeq()); err != nil {
			t.Fatal(err)
		}
	}
	if s.tracker.SafeLSN() != lastEnd {
		t.Errorf("safe LSN %d after every batch was resolved, want the last commit's end %d", s.tracker.SafeLSN(), lastEnd)
	}
	// Batches handed over after their commits carry its end (all but the
	// open batch taken at the end, which emit never saw).
	if withEnd == 0 || withEnd < len(batches)-1 {
		t.Errorf("%d of %d batches carry their commit end, want all handed over", withEnd, len(batches))
	}
	for k, n := range got {
		if goldenV2Want[k] != n {
			t.Errorf("%s: %d rows delivered, want %d", k, n, goldenV2Want[k])
		}
	}
	for k, n := range goldenV2Want {
		if got[k] != n {
			t.Errorf("%s: %d rows delivered, want %d", k, got[k], n)
		}
	}
	if want := "[t1.keep t4.keep small.keep t3.keep]"; fmt.Sprint(order) != want {
		t.Errorf("commit order %v, want %s", order, want)
	}
	if sp.Bytes() != 0 || sp.Open() != 0 {
		t.Errorf("spill holds %d bytes of %d transactions after every transaction ended", sp.Bytes(), sp.Open())
	}
	entries, _ := os.ReadDir(spillDir)
	if len(entries) != 0 {
		t.Errorf("spill directory keeps %d files", len(entries))
	}
}

// TestGoldenStreamingStaged feeds the same session with staging on and plays
// the writer's staging table in memory: every streamed transaction's rows
// arrive as staging batches before its commit; at the commit its tagged
// batches carry exactly the staged rows minus rolled-back subtransactions
// (the copy's WHERE), with Rows equal to that count; the aborted transaction
// is dropped; the small transaction's batches are untagged.
func TestGoldenStreamingStaged(t *testing.T) {
	forEachGoldenMajor(t, minStreamingMajor, checkGoldenStreamingStaged)
}

func checkGoldenStreamingStaged(t *testing.T, dir string) {
	_, out, _ := feedGolden(t, dir, RunConfig{BatchSize: 1000, Stage: true}, nil)

	type row struct {
		id  int64
		sub uint32
	}
	staged := map[uint32][]row{} // the staging table
	copied := map[uint32]map[int64]bool{}
	dropped := map[uint32]bool{}
	delivered := map[string]int{}
	for b := range out {
		switch {
		case b.Streamed == nil:
			for _, ev := range b.Events {
				if ev.Type != "small.keep" {
					t.Errorf("untagged batch holds %s, a streamed transaction's row", ev.Type)
				}
				delivered[ev.Type]++
			}
		case b.Streamed.Op == batch.OpStage:
			if len(b.Streamed.SubXids) != b.Len() {
				t.Fatalf("staging batch: %d rows, %d subtransaction ids", b.Len(), len(b.Streamed.SubXids))
			}
			for i, ev := range b.Events {
				staged[b.Streamed.Xid] = append(staged[b.Streamed.Xid], row{ev.ID, b.Streamed.SubXids[i]})
			}
		case b.Streamed.Op == batch.OpDrop:
			dropped[b.Streamed.Xid] = true
			delete(staged, b.Streamed.Xid)
		case b.Streamed.Op == batch.OpCommit:
			xid := b.Streamed.Xid
			if copied[xid] == nil { // the first batch: the copy
				aborted := map[uint32]bool{}
				for _, sub := range b.Streamed.Aborted {
					aborted[sub] = true
				}
				copied[xid] = map[int64]bool{}
				for _, r := range staged[xid] {
					if !aborted[r.sub] {
						copied[xid][r.id] = true
					}
				}
				if len(copied[xid]) != b.Streamed.Rows {
					t.Errorf("xid %d: the copy would take %d rows, the commit says %d", xid, len(copied[xid]), b.Streamed.Rows)
				}
				delete(staged, xid)
			}
			for _, ev := range b.Events {
				if ev.Xid != xid || !copied[xid][ev.ID] {
					t.Errorf("xid %d: committed row %d (%s, xid %d) is not among the copied", xid, ev.ID, ev.Type, ev.Xid)
				}
				delete(copied[xid], ev.ID)
				delivered[ev.Type]++
			}
		}
	}
	for xid, left := range copied {
		if len(left) != 0 {
			t.Errorf("xid %d: %d copied rows not among its committed batches", xid, len(left))
		}
	}
	if len(copied) != 3 || len(dropped) != 1 || len(staged) != 0 {
		t.Errorf("%d transactions copied (want 3), %d dropped (want 1), %d left staged (want 0)", len(copied), len(dropped), len(staged))
	}
	for k, n := range goldenV2Want {
		if delivered[k] != n {
			t.Errorf("%s: %d rows delivered, want %d", k, delivered[k], n)
		}
	}
}
