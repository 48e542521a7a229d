package replication

import (
	"encoding/binary"
	"errors"
	"os"
	"testing"
	"time"

	"github.com/outbox-streamer/outbox-streamer/internal/record"
)

func TestSpillRoundTripAndAborts(t *testing.T) {
	sp, err := openSpill(t.TempDir(), 0)
	if err != nil {
		t.Fatal(err)
	}
	at := time.Date(2200, 1, 2, 3, 4, 5, 6000, time.UTC) // past UnixNano's range is fine too
	evs := []record.Event{
		{ID: 1, Type: "a", Time: at, Environment: "prod", Context: `{"k":"ü"}`, MetadataVersion: 3, CreatedAt: at.Add(time.Second)},
		{ID: 2, Type: "b", Context: "{}", Problem: "event_date_time is NULL"}, // zero times stay zero
		{ID: 3, Type: "c", Time: at, Context: "{}"},
	}
	for i := range evs {
		sub := uint32(10)
		if i == 2 {
			sub = 11 // rolled back below
		}
		if err := sp.Append(10, sub, &evs[i]); err != nil {
			t.Fatal(err)
		}
	}
	if err := sp.Append(20, 20, &evs[0]); err != nil {
		t.Fatal(err)
	}
	sp.Abort(10, 11) // a savepoint of 10
	sp.Abort(20, 20) // all of 20
	sp.Abort(30, 30) // never seen: nothing to do
	var got []record.Event
	if err := sp.Replay(10, func(ev *record.Event) error { got = append(got, *ev); return nil }); err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0] != evs[0] || got[1] != evs[1] {
		t.Fatalf("replayed %+v, want %+v", got, evs[:2])
	}
	if sp.Bytes() != 0 || sp.Open() != 0 {
		t.Fatalf("spill holds %d bytes, %d transactions after commit and abort", sp.Bytes(), sp.Open())
	}
	if entries, _ := os.ReadDir(sp.dir); len(entries) != 0 {
		t.Fatalf("%d files left", len(entries))
	}
}

func TestSpillBoundAndCleanStart(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(dir+"/xid-5", []byte("stale"), 0o600); err != nil {
		t.Fatal(err)
	}
	sp, err := openSpill(dir, 200)
	if err != nil {
		t.Fatal(err)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Fatalf("a previous session's files survived the start: %d", len(entries))
	}
	ev := record.Event{ID: 1, Type: "t", Context: string(make([]byte, 100))}
	if err := sp.Append(1, 1, &ev); err != nil {
		t.Fatal(err)
	}
	if err := sp.Append(1, 1, &ev); !errors.Is(err, ErrSpillFull) {
		t.Fatalf("second row past a 200-byte bound: %v, want ErrSpillFull", err)
	}
}

// streamStart and the other protocol 2 messages, as the server sends them.
func streamStart(xid uint32) []byte {
	return append(binary.BigEndian.AppendUint32([]byte{'S'}, xid), 1)
}

func streamAbort(xid, sub uint32) []byte {
	return binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint32([]byte{'A'}, xid), sub)
}

func streamed(msg []byte, xid uint32) []byte {
	b := append([]byte{msg[0]}, binary.BigEndian.AppendUint32(nil, xid)...)
	return append(b, msg[1:]...)
}

func TestDecodeStreamedMessages(t *testing.T) {
	d := NewDecoder("public", "event_outbox", nil)
	var m Message
	mustDecode(t, d, streamStart(42), &m)
	if m.Kind != KindStreamStart || m.Xid != 42 {
		t.Fatalf("stream start: %+v", m)
	}
	mustDecode(t, d, streamed(relationMsg(1, "public", "event_outbox", outboxCols...), 42), &m)
	mustDecode(t, d, streamed(insertMsg(1, s("9"), s("t"), s("2020-01-01 00:00:00"), s(""), s("{}"), s("1"), s("pending"), nil, nil), 43), &m)
	if m.Kind != KindInsert || !m.Streamed || m.Xid != 42 || m.SubXid != 43 || m.Event.ID != 9 || m.Event.CommitLSN != 0 {
		t.Fatalf("streamed insert: %+v", m)
	}
	mustDecode(t, d, []byte{'E'}, &m)
	// Outside the stream the aborted-to-be transaction's relation is unknown.
	if err := d.Decode(insertMsg(1, s("9")), &m); err == nil {
		t.Fatal("a relation sent only inside a streamed transaction was used outside it")
	}
	mustDecode(t, d, streamAbort(42, 42), &m)
	if m.Kind != KindStreamAbort || m.Xid != 42 || m.SubXid != 42 {
		t.Fatalf("stream abort: %+v", m)
	}
	for _, bad := range [][]byte{{'S', 0, 0}, {'A', 0, 0, 0, 1}, {'c', 0, 0, 0, 1, 0}} {
		if err := NewDecoder("public", "event_outbox", nil).Decode(bad, &m); !errors.Is(err, ErrMalformed) {
			t.Errorf("truncated %q: %v, want ErrMalformed", bad[0], err)
		}
	}
}
