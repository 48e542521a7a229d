package replication

import (
	"encoding/binary"
	"errors"
	"math"
	"strings"
	"testing"
	"time"
)

// typedCol is a column of a hand-built Relation message with its type.
type typedCol struct {
	name string
	oid  uint32
}

func relationTyped(id uint32, cols ...typedCol) []byte {
	b := []byte{'R'}
	b = binary.BigEndian.AppendUint32(b, id)
	b = append(b, "public\x00event_outbox\x00d"...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(cols)))
	for _, c := range cols {
		b = append(b, 0)
		b = append(append(b, c.name...), 0)
		b = binary.BigEndian.AppendUint32(b, c.oid)
		b = binary.BigEndian.AppendUint32(b, 0xffffffff)
	}
	return b
}

// val is a value of a hand-built insert: kind 't', 'b' or 'n'.
type val struct {
	kind byte
	b    []byte
}

func bin(b []byte) val  { return val{'b', b} }
func txt(s string) val  { return val{'t', []byte(s)} }
func null() val         { return val{kind: 'n'} }
func i8(v int64) []byte { return binary.BigEndian.AppendUint64(nil, uint64(v)) }
func i4(v int32) []byte { return binary.BigEndian.AppendUint32(nil, uint32(v)) }
func i2(v int16) []byte { return binary.BigEndian.AppendUint16(nil, uint16(v)) }

// ts is a binary timestamp: microseconds since 2000-01-01 of t's wall clock.
func ts(t time.Time) []byte {
	return i8((t.Unix()-pgEpochUnix)*1e6 + int64(t.Nanosecond()/1000))
}

func jsonb(s string) []byte { return append([]byte{1}, s...) }

func insertVals(id uint32, vals ...val) []byte {
	b := []byte{'I'}
	b = binary.BigEndian.AppendUint32(b, id)
	b = append(b, 'N')
	b = binary.BigEndian.AppendUint16(b, uint16(len(vals)))
	for _, v := range vals {
		b = append(b, v.kind)
		if v.kind == 't' || v.kind == 'b' {
			b = binary.BigEndian.AppendUint32(b, uint32(len(v.b)))
			b = append(b, v.b...)
		}
	}
	return b
}

// The outbox as migration 1 creates it, plus the unmapped columns.
var outboxTyped = []typedCol{{"id", oidInt8}, {"event_type", oidVarchar}, {"event_date_time", oidTimestamp},
	{"environment", oidVarchar}, {"event_context", oidJSONB}, {"metadata_version", oidInt8}, {"status", oidVarchar},
	{"created_at", oidTimestamp}, {"updated_at", oidTimestamp}, {"attempts", oidInt4}, {"last_error", oidText},
	{"next_attempt_at", oidTimestampTZ}}

func TestDecodeBinaryRow(t *testing.T) {
	at := time.Date(2026, 11, 23, 18, 49, 29, 123456000, time.UTC)
	created := time.Date(1960, 1, 1, 0, 0, 0, 1000, time.UTC)
	d := NewDecoder("public", "event_outbox", nil)
	var m Message
	mustDecode(t, d, relationTyped(1, outboxTyped...), &m)
	mustDecode(t, d, insertVals(1, bin(i8(1<<40+5)), bin([]byte("order.created")), bin(ts(at)), bin([]byte("prod")),
		bin(jsonb(`{"a": 1}`)), bin(i8(-3)), bin([]byte("pending")), bin(ts(created)), bin(ts(at)), bin(i4(0)), null(), null()), &m)
	ev := m.Event
	if m.Kind != KindInsert || ev.ID != 1<<40+5 || ev.Type != "order.created" || ev.Time != at || ev.Environment != "prod" ||
		ev.Context != `{"a": 1}` || ev.MetadataVersion != -3 || ev.CreatedAt != created || ev.Problem != "" {
		t.Fatalf("kind %v, event %+v", m.Kind, ev)
	}
	mustDecode(t, d, insertVals(1, bin(i8(2)), bin([]byte("t")), bin(ts(at)), bin(nil), bin(jsonb("{}")), bin(i8(1)),
		bin([]byte("processed")), bin(ts(at)), bin(ts(at)), bin(i4(0)), null(), null()), &m)
	if m.Kind != KindIgnored {
		t.Fatalf("a row inserted as processed: kind %v, want ignored", m.Kind)
	}
}

// TestDecodeBinaryTypes reads every type the decoder has a binary reader for,
// in the outbox columns that may have it.
func TestDecodeBinaryTypes(t *testing.T) {
	ny, err := time.LoadLocation("America/New_York")
	if err != nil {
		t.Fatal(err)
	}
	wall := time.Date(2026, 7, 1, 12, 0, 0, 5000, time.UTC)
	cases := []struct {
		name    string
		loc     *time.Location
		cols    []typedCol
		vals    []val
		check   func(m *Message) bool
		problem string
	}{
		{"int4 and int2", nil, []typedCol{{"id", oidInt4}, {"event_type", oidText}, {"event_date_time", oidTimestamp}, {"metadata_version", oidInt2}},
			[]val{bin(i4(-7)), bin([]byte("x")), bin(ts(wall)), bin(i2(-2))},
			func(m *Message) bool { return m.Event.ID == -7 && m.Event.MetadataVersion == -2 }, ""},
		{"bpchar and json", nil, []typedCol{{"id", oidInt8}, {"event_type", oidBpchar}, {"event_date_time", oidTimestamp}, {"event_context", oidJSON}},
			[]val{bin(i8(1)), bin([]byte("x  ")), bin(ts(wall)), bin([]byte(`{"k":[1]}`))},
			func(m *Message) bool { return m.Event.Type == "x  " && m.Event.Context == `{"k":[1]}` }, ""},
		{"text context", nil, []typedCol{{"id", oidInt8}, {"event_type", oidText}, {"event_date_time", oidTimestamp}, {"event_context", oidText}},
			[]val{bin(i8(1)), bin([]byte("x")), bin(ts(wall)), bin([]byte(`{}`))},
			func(m *Message) bool { return m.Event.Context == `{}` }, ""},
		{"timestamp in the decoder's zone", ny, []typedCol{{"id", oidInt8}, {"event_type", oidText}, {"event_date_time", oidTimestamp}},
			[]val{bin(i8(1)), bin([]byte("x")), bin(ts(wall))},
			func(m *Message) bool { return m.Event.Time == wall.Add(4*time.Hour) }, ""},
		{"timestamptz is an instant", ny, []typedCol{{"id", oidInt8}, {"event_type", oidText}, {"event_date_time", oidTimestampTZ}, {"created_at", oidTimestampTZ}},
			[]val{bin(i8(1)), bin([]byte("x")), bin(ts(wall)), bin(ts(wall.Add(-time.Microsecond)))},
			func(m *Message) bool { return m.Event.Time == wall && m.Event.CreatedAt == wall.Add(-time.Microsecond) }, ""},
		{"NULL context and created_at", nil, []typedCol{{"id", oidInt8}, {"event_type", oidText}, {"event_date_time", oidTimestamp}, {"event_context", oidJSONB}, {"created_at", oidTimestamp}},
			[]val{bin(i8(1)), bin([]byte("x")), bin(ts(wall)), null(), null()},
			func(m *Message) bool { return m.Event.Context == "{}" && m.Event.CreatedAt == m.Event.CommitTime }, ""},
		{"NULL type", nil, []typedCol{{"id", oidInt8}, {"event_type", oidText}, {"event_date_time", oidTimestamp}},
			[]val{bin(i8(1)), null(), bin(ts(wall))}, nil, "event_type is NULL"},
		{"NULL time", nil, []typedCol{{"id", oidInt8}, {"event_type", oidText}, {"event_date_time", oidTimestamp}},
			[]val{bin(i8(1)), bin([]byte("x")), null()}, nil, "event_date_time is NULL"},
		{"infinity", nil, []typedCol{{"id", oidInt8}, {"event_type", oidText}, {"event_date_time", oidTimestamp}},
			[]val{bin(i8(1)), bin([]byte("x")), bin(i8(math.MaxInt64))}, nil, "event_date_time: infinity cannot be stored"},
		{"-infinity", nil, []typedCol{{"id", oidInt8}, {"event_type", oidText}, {"event_date_time", oidTimestamp}, {"created_at", oidTimestampTZ}},
			[]val{bin(i8(1)), bin([]byte("x")), bin(ts(wall)), bin(i8(math.MinInt64))}, nil, "created_at: -infinity cannot be stored"},
		{"BC", nil, []typedCol{{"id", oidInt8}, {"event_type", oidText}, {"event_date_time", oidTimestamp}},
			[]val{bin(i8(1)), bin([]byte("x")), bin(ts(time.Date(-43, 3, 15, 12, 0, 0, 0, time.UTC)))}, nil, "BC dates"},
		{"short timestamp", nil, []typedCol{{"id", oidInt8}, {"event_type", oidText}, {"event_date_time", oidTimestamp}},
			[]val{bin(i8(1)), bin([]byte("x")), bin(i4(1))}, nil, "not 8 bytes"},
		{"int8 of 4 bytes", nil, []typedCol{{"id", oidInt8}, {"event_type", oidText}, {"event_date_time", oidTimestamp}},
			[]val{bin(i4(1)), bin([]byte("x")), bin(ts(wall))}, nil, "id (binary 00000001) is not an integer"},
		{"text and binary mixed", nil, []typedCol{{"id", oidInt8}, {"event_type", oidText}, {"event_date_time", oidTimestamp}},
			[]val{bin(i8(9)), txt("x"), txt("2026-07-01 12:00:00.000005")},
			func(m *Message) bool { return m.Event.ID == 9 && m.Event.Time == wall }, ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			d := NewDecoder("public", "event_outbox", c.loc)
			var m Message
			mustDecode(t, d, begin(0x10, 0, 3), &m)
			mustDecode(t, d, relationTyped(1, c.cols...), &m)
			mustDecode(t, d, insertVals(1, c.vals...), &m)
			if m.Kind != KindInsert {
				t.Fatalf("kind %v", m.Kind)
			}
			if c.problem != "" {
				if !strings.Contains(m.Event.Problem, c.problem) {
					t.Fatalf("problem %q, want it to mention %q", m.Event.Problem, c.problem)
				}
				return
			}
			if m.Event.Problem != "" || !c.check(&m) {
				t.Fatalf("event %+v", m.Event)
			}
		})
	}
}

// TestDecodeBinaryUnknownType: a binary value of a type the decoder cannot read
// fails the message with ErrBinaryType (a new session then asks for text).
func TestDecodeBinaryUnknownType(t *testing.T) {
	const oidNumeric = 1700
	d := NewDecoder("public", "event_outbox", nil)
	var m Message
	mustDecode(t, d, relationTyped(1, typedCol{"id", oidNumeric}, typedCol{"event_type", oidText}, typedCol{"event_date_time", oidTimestamp}), &m)
	err := d.Decode(insertVals(1, bin([]byte{0, 1, 0, 0, 0, 0, 0, 1}), bin([]byte("x")), bin(i8(0))), &m)
	if !errors.Is(err, ErrBinaryType) || !strings.Contains(err.Error(), `"id" (type oid 1700)`) {
		t.Fatalf("Decode = %v, want ErrBinaryType naming the column", err)
	}
	// The same type in text is read as before.
	mustDecode(t, d, insertVals(1, txt("5"), txt("x"), txt("2020-01-01 00:00:00")), &m)
	if m.Kind != KindInsert || m.Event.ID != 5 || m.Event.Problem != "" {
		t.Fatalf("text value of a numeric id: %+v", m.Event)
	}
}

// TestDecodeBinaryJSONBVersion: a jsonb in a format the decoder does not know
// fails the message rather than deliver a wrong context.
func TestDecodeBinaryJSONBVersion(t *testing.T) {
	d := NewDecoder("public", "event_outbox", nil)
	var m Message
	mustDecode(t, d, relationTyped(1, typedCol{"id", oidInt8}, typedCol{"event_type", oidText}, typedCol{"event_date_time", oidTimestamp}, typedCol{"event_context", oidJSONB}), &m)
	for _, ctx := range [][]byte{{2, '{', '}'}, {}} {
		err := d.Decode(insertVals(1, bin(i8(1)), bin([]byte("x")), bin(i8(0)), bin(ctx)), &m)
		if !errors.Is(err, ErrBinaryType) || !strings.Contains(err.Error(), "version 1") {
			t.Errorf("context %x: Decode = %v, want ErrBinaryType about the version", ctx, err)
		}
	}
}

func TestBinaryDecodable(t *testing.T) {
	for _, c := range []struct {
		col  string
		oid  uint32
		want bool
	}{
		{"id", oidInt8, true}, {"id", oidText, false}, {"id", 1700, false},
		{"event_context", oidJSONB, true}, {"event_context", oidJSON, true}, {"event_context", oidTimestamp, false},
		{"event_date_time", oidTimestampTZ, true}, {"event_date_time", 1082 /* date */, false},
		{"status", oidVarchar, true}, {"status", 16 /* bool */, false},
		{"last_error", 1700, true}, // not read by the pipeline
	} {
		if got := BinaryDecodable(c.col, c.oid); got != c.want {
			t.Errorf("BinaryDecodable(%q, %d) = %v, want %v", c.col, c.oid, got, c.want)
		}
	}
}
