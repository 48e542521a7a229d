package replication

import (
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Hand-built pgoutput v1 messages, as the server sends them.

func begin(finalLSN uint64, commitMicros int64, xid uint32) []byte {
	b := []byte{'B'}
	b = binary.BigEndian.AppendUint64(b, finalLSN)
	b = binary.BigEndian.AppendUint64(b, uint64(commitMicros))
	return binary.BigEndian.AppendUint32(b, xid)
}

func commit(commitLSN, endLSN uint64) []byte {
	b := []byte{'C', 0}
	b = binary.BigEndian.AppendUint64(b, commitLSN)
	b = binary.BigEndian.AppendUint64(b, endLSN)
	return binary.BigEndian.AppendUint64(b, 0)
}

func relationMsg(id uint32, ns, name string, cols ...string) []byte {
	b := []byte{'R'}
	b = binary.BigEndian.AppendUint32(b, id)
	b = append(append(b, ns...), 0)
	b = append(append(b, name...), 0)
	b = append(b, 'd')
	b = binary.BigEndian.AppendUint16(b, uint16(len(cols)))
	for _, c := range cols {
		b = append(b, 0)
		b = append(append(b, c...), 0)
		b = binary.BigEndian.AppendUint32(b, 25)
		b = binary.BigEndian.AppendUint32(b, 0xffffffff)
	}
	return b
}

// insertMsg encodes values; nil is NULL.
func insertMsg(id uint32, vals ...*string) []byte {
	b := []byte{'I'}
	b = binary.BigEndian.AppendUint32(b, id)
	b = append(b, 'N')
	b = binary.BigEndian.AppendUint16(b, uint16(len(vals)))
	for _, v := range vals {
		if v == nil {
			b = append(b, 'n')
			continue
		}
		b = append(b, 't')
		b = binary.BigEndian.AppendUint32(b, uint32(len(*v)))
		b = append(b, *v...)
	}
	return b
}

func s(v string) *string { return &v }

var outboxCols = []string{"id", "event_type", "event_date_time", "environment", "event_context", "metadata_version", "status", "created_at", "updated_at"}

func TestDecodeTransaction(t *testing.T) {
	d := NewDecoder("public", "event_outbox", nil)
	var m Message
	mustDecode(t, d, begin(0x1000, 0, 7), &m)
	if m.Kind != KindBegin || m.FinalLSN != 0x1000 || m.Xid != 7 || !m.CommitTime.Equal(postgresEpoch) {
		t.Fatalf("begin = %+v", m)
	}
	mustDecode(t, d, relationMsg(16384, "public", "event_outbox", outboxCols...), &m)
	if m.Kind != KindRelation {
		t.Fatalf("relation kind = %v", m.Kind)
	}
	mustDecode(t, d, insertMsg(16384, s("42"), s("order.created"), s("2026-11-23 18:49:29.123456"), s("prod"),
		s(`{"a": 1}`), s("3"), s("pending"), s("2026-11-23 18:49:30"), s("2026-11-23 18:49:30")), &m)
	if m.Kind != KindInsert {
		t.Fatalf("insert kind = %v (problem %q)", m.Kind, m.Event.Problem)
	}
	ev := m.Event
	want := time.Date(2026, 11, 23, 18, 49, 29, 123456000, time.UTC)
	if ev.ID != 42 || ev.Type != "order.created" || !ev.Time.Equal(want) || ev.Environment != "prod" ||
		ev.Context != `{"a": 1}` || ev.MetadataVersion != 3 || ev.CommitLSN != 0x1000 || ev.Problem != "" {
		t.Fatalf("event = %+v", ev)
	}
	mustDecode(t, d, commit(0x1000, 0x1030), &m)
	if m.Kind != KindCommit || m.CommitLSN != 0x1000 || m.EndLSN != 0x1030 {
		t.Fatalf("commit = %+v", m)
	}
}

func TestDecodeMapsColumnsByName(t *testing.T) {
	d := NewDecoder("public", "event_outbox", nil)
	var m Message
	// Reordered columns plus one the decoder does not know.
	mustDecode(t, d, relationMsg(1, "public", "event_outbox", "tenant", "event_context", "id", "event_date_time", "event_type"), &m)
	mustDecode(t, d, insertMsg(1, s("acme"), s("{}"), s("7"), s("2020-01-02 03:04:05"), s("x")), &m)
	if m.Kind != KindInsert || m.Event.ID != 7 || m.Event.Type != "x" || m.Event.Context != "{}" {
		t.Fatalf("event = %+v", m.Event)
	}
	// A schema change mid-stream: a new Relation message replaces the old mapping.
	mustDecode(t, d, relationMsg(1, "public", "event_outbox", "id", "event_type", "event_date_time"), &m)
	mustDecode(t, d, insertMsg(1, s("8"), s("y"), s("2020-01-02 03:04:05")), &m)
	if m.Event.ID != 8 || m.Event.Type != "y" {
		t.Fatalf("after relation change: event = %+v", m.Event)
	}
}

func TestDecodeProblemsAndSkips(t *testing.T) {
	cases := []struct {
		name    string
		vals    []*string
		kind    Kind
		problem string
	}{
		{"null type", []*string{s("1"), nil, s("2020-01-01 00:00:00"), s(""), s("{}"), s("1"), s("pending"), nil, nil}, KindInsert, "event_type"},
		{"infinity time", []*string{s("1"), s("t"), s("infinity"), s(""), s("{}"), s("1"), s("pending"), nil, nil}, KindInsert, "infinity"},
		{"BC time", []*string{s("1"), s("t"), s("0044-03-15 12:00:00 BC"), s(""), s("{}"), s("1"), s("pending"), nil, nil}, KindInsert, "cannot parse"},
		{"inserted as processed", []*string{s("1"), s("t"), s("2020-01-01 00:00:00"), s(""), s("{}"), s("1"), s("processed"), nil, nil}, KindIgnored, ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			d := NewDecoder("public", "event_outbox", nil)
			var m Message
			mustDecode(t, d, relationMsg(1, "public", "event_outbox", outboxCols...), &m)
			mustDecode(t, d, insertMsg(1, c.vals...), &m)
			if m.Kind != c.kind {
				t.Fatalf("kind = %v, want %v", m.Kind, c.kind)
			}
			if c.problem == "" && m.Event.Problem != "" || !strings.Contains(m.Event.Problem, c.problem) {
				t.Fatalf("problem = %q, want it to mention %q", m.Event.Problem, c.problem)
			}
		})
	}
}

func TestDecodeOtherTablesIgnored(t *testing.T) {
	d := NewDecoder("public", "event_outbox", nil)
	var m Message
	mustDecode(t, d, relationMsg(2, "public", "orders", "id"), &m)
	mustDecode(t, d, insertMsg(2, s("1")), &m)
	if m.Kind != KindIgnored {
		t.Fatalf("kind = %v, want ignored", m.Kind)
	}
}

func TestDecodeMalformed(t *testing.T) {
	full := insertMsg(1, s("1"), s("t"), s("2020-01-01 00:00:00"))
	cases := map[string][]byte{
		"empty":               {},
		"short begin":         begin(1, 2, 3)[:10],
		"short commit":        commit(1, 2)[:9],
		"unterminated name":   []byte{'R', 0, 0, 0, 1, 'p', 'u', 'b'},
		"insert before rel":   full,
		"truncated tuple":     full[:len(full)-3],
		"huge length":         append(insertMsg(1)[:8], 0, 1, 't', 0xff, 0xff, 0xff, 0xff),
		"unknown column kind": append(insertMsg(1)[:8], 0, 1, 'z'),
	}
	for name, data := range cases {
		t.Run(name, func(t *testing.T) {
			d := NewDecoder("public", "event_outbox", nil)
			var m Message
			if name != "insert before rel" {
				mustDecode(t, d, relationMsg(1, "public", "event_outbox", "id", "event_type", "event_date_time"), &m)
			}
			err := d.Decode(data, &m)
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("Decode = %v, want ErrMalformed", err)
			}
		})
	}
}

func TestParseTimestamp(t *testing.T) {
	ny, _ := time.LoadLocation("America/New_York")
	cases := []struct {
		in   string
		loc  *time.Location
		want time.Time
		ok   bool
	}{
		{"2026-11-23 18:49:29", time.UTC, time.Date(2026, 11, 23, 18, 49, 29, 0, time.UTC), true},
		{"2026-11-23 18:49:29.5", time.UTC, time.Date(2026, 11, 23, 18, 49, 29, 500000000, time.UTC), true},
		{"1960-01-01 00:00:00.000001", time.UTC, time.Date(1960, 1, 1, 0, 0, 0, 1000, time.UTC), true},
		{"2026-07-01 12:00:00", ny, time.Date(2026, 7, 1, 16, 0, 0, 0, time.UTC), true},
		{"2026-07-01 12:00:00+05:30", time.UTC, time.Date(2026, 7, 1, 6, 30, 0, 0, time.UTC), true},
		{"2026-07-01 12:00:00-03", time.UTC, time.Date(2026, 7, 1, 15, 0, 0, 0, time.UTC), true},
		{"12026-07-01 12:00:00", time.UTC, time.Date(12026, 7, 1, 12, 0, 0, 0, time.UTC), true},
		{"-infinity", time.UTC, time.Time{}, false},
		{"2026-13-01 00:00:00", time.UTC, time.Time{}, false},
		{"2026-11-23T18:49:29", time.UTC, time.Time{}, false},
		{"2026-11-23 18:49", time.UTC, time.Time{}, false},
	}
	for _, c := range cases {
		got, err := parseTimestamp([]byte(c.in), c.loc)
		if (err == nil) != c.ok {
			t.Errorf("parseTimestamp(%q) error = %v, want ok=%v", c.in, err, c.ok)
			continue
		}
		if c.ok && !got.Equal(c.want) {
			t.Errorf("parseTimestamp(%q) = %v, want %v", c.in, got, c.want)
		}
	}
}

func TestParseInt(t *testing.T) {
	for in, want := range map[string]int64{"0": 0, "42": 42, "-7": -7, "9223372036854775807": 1<<63 - 1, "-9223372036854775808": -1 << 63} {
		if got, ok := parseInt([]byte(in)); !ok || got != want {
			t.Errorf("parseInt(%q) = %d, %v", in, got, ok)
		}
	}
	for _, in := range []string{"", "-", "1a", "9223372036854775808", "99999999999999999999"} {
		if _, ok := parseInt([]byte(in)); ok {
			t.Errorf("parseInt(%q) succeeded", in)
		}
	}
}

// FuzzDecode feeds arbitrary bytes to the decoder after a real relation message: it
// must never panic, whatever arrives, in text or binary format. The corpus is seeded with
// messages captured from a real server (testdata/pgoutput/pg*/, one directory per major,
// see TestCaptureGolden; testdata/pgoutput/binary, see TestCaptureGoldenBinary) and
// hand-built ones.
func FuzzDecode(f *testing.F) {
	rel := relationMsg(1, "public", "event_outbox", outboxCols...)
	f.Add(rel)
	f.Add(begin(1, 2, 3))
	f.Add(commit(1, 2))
	f.Add(insertMsg(1, s("1"), s("t"), s("2020-01-01 00:00:00"), s(""), s("{}"), s("1"), s("pending"), nil, nil))
	f.Add(streamStart(7))
	f.Add(streamAbort(7, 8))
	f.Add(streamed(rel, 7))
	golden, _ := filepath.Glob("testdata/pgoutput/pg*/0*.bin")
	for _, g := range golden {
		if data, err := os.ReadFile(g); err == nil {
			f.Add(data)
		}
	}
	// A few of each major's captured protocol 2 messages: stream start,
	// commit, abort, a streamed relation and insert.
	streams, _ := filepath.Glob(filepath.Join(goldenDir, "pg*", goldenStreamFile))
	for _, path := range streams {
		raw, err := os.ReadFile(path)
		if err != nil {
			continue
		}
		seen := map[byte]bool{}
		for len(raw) >= 4 {
			n := int(binary.BigEndian.Uint32(raw))
			if msg := raw[4 : 4+n]; !seen[msg[0]] {
				seen[msg[0]] = true
				f.Add(msg)
			}
			raw = raw[4+n:]
		}
	}
	// The binary captures (every message: they are few), and their Relation
	// messages, which carry the real column types, to decode inserts after.
	typedRels := [][]byte{relationTyped(1, outboxTyped...)}
	for _, path := range []string{goldenText, goldenBinary} {
		raw, err := os.ReadFile(path)
		for err == nil && len(raw) >= 4 {
			n := int(binary.BigEndian.Uint32(raw))
			msg := raw[4 : 4+n]
			f.Add(msg)
			if msg[0] == 'R' && path == goldenBinary {
				typedRels = append(typedRels, msg)
			}
			raw = raw[4+n:]
		}
	}
	f.Add(insertVals(1, bin(i8(1)), bin([]byte("t")), bin(i8(0)), bin(nil), bin(jsonb("{}")), bin(i8(1)), bin([]byte("pending")), null(), null(), bin(i4(0)), null(), null()))
	f.Fuzz(func(t *testing.T, data []byte) {
		// Outside a stream and inside one: both paths must never panic.
		for _, inStream := range []bool{false, true} {
			d := NewDecoder("public", "event_outbox", nil)
			var m Message
			_ = d.Decode(rel, &m)
			if inStream {
				_ = d.Decode(streamStart(7), &m)
				_ = d.Decode(streamed(rel, 7), &m)
			}
			_ = d.Decode(data, &m)
		}
		// After Relation messages with binary-readable types (a captured one
		// has the real relation id of the captured inserts).
		for _, schema := range []string{"public", "alt"} {
			d := NewDecoder(schema, "event_outbox", nil)
			var m Message
			for _, r := range typedRels {
				_ = d.Decode(r, &m)
			}
			_ = d.Decode(data, &m)
		}
	})
}

func mustDecode(t *testing.T, d *Decoder, data []byte, m *Message) {
	t.Helper()
	if err := d.Decode(data, m); err != nil {
		t.Fatalf("Decode: %v", err)
	}
}

// TestParseCommonTimestamp checks the positional parser against the general one
// on values of every year and fraction length, in UTC and in a zone with
// daylight saving time, and that it leaves other forms to the general parser.
func TestParseCommonTimestamp(t *testing.T) {
	ny, err := time.LoadLocation("America/New_York")
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	layouts := []string{"2006-01-02 15:04:05", "2006-01-02 15:04:05.9", "2006-01-02 15:04:05.999", "2006-01-02 15:04:05.999999"}
	for i := 0; i < 100000; i++ {
		sec := rng.Int64N(time.Date(9999, 12, 31, 23, 59, 59, 0, time.UTC).Unix()-time.Date(1, 1, 1, 0, 0, 0, 0, time.UTC).Unix()) +
			time.Date(1, 1, 1, 0, 0, 0, 0, time.UTC).Unix()
		in := []byte(time.Unix(sec, rng.Int64N(1e9)/1000*1000).UTC().Format(layouts[i%len(layouts)]))
		for _, loc := range []*time.Location{time.UTC, ny} {
			fast, ok := parseCommonTimestamp(in, loc)
			want, err := parseAnyTimestamp(in, loc)
			if !ok || err != nil || fast != want {
				t.Fatalf("%s in %s: common %v (%v), general %v (%v)", in, loc, fast, ok, want, err)
			}
		}
	}
	for _, in := range []string{"2026-11-23 18:49:29+00", "12026-07-01 12:00:00", "infinity", "2026-02-29 00:00:00",
		"2024-02-30 00:00:00", "0000-01-01 00:00:00", "2026-11-23 18:49:29.", "2026-11-23 18:49:29.1234567", "2026-11-23 18:49:60",
		"2026-11-23T18:49:29", "2026-11-2a 18:49:29", "0044-03-15 12:00:00 BC"} {
		if got, ok := parseCommonTimestamp([]byte(in), time.UTC); ok {
			t.Errorf("parseCommonTimestamp(%q) = %v, want it left to the general parser", in, got)
		}
	}
}
