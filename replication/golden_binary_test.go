package replication

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/outbox-streamer/outbox-streamer/internal/record"
)

// The binary captures: one session of goldenBinaryScript read through two
// slots created before it, one in text and one with binary 'true', each
// message as a u32 length and the pgoutput bytes. TestCaptureGoldenBinary
// writes them.
var (
	goldenText   = filepath.Join(goldenDir, "binary", "text.bin")
	goldenBinary = filepath.Join(goldenDir, "binary", "binary.bin")
)

// captureBinaryTest writes goldenText and goldenBinary.
const captureBinaryTest = "TestCaptureGoldenBinary"

// goldenBinaryScript inserts rows that exercise every outbox column type: the
// outbox of migration 1 (bigint, varchar, timestamp, jsonb) and alt.event_outbox,
// the same columns as integer, text, timestamptz, char(8), json and smallint,
// nullable. Rows hold NULLs, infinity, dates before 1970 and after 9999, the
// extremes of each integer type, multibyte text, and one row inserted as
// processed.
var goldenBinaryScript = []string{
	`CREATE SCHEMA alt`,
	`CREATE TABLE alt.event_outbox (id integer PRIMARY KEY, event_type text, event_date_time timestamptz,
		environment char(8), event_context json, metadata_version smallint, status varchar(20) DEFAULT 'pending',
		created_at timestamptz, note text)`,
	`ALTER PUBLICATION outbox_publication ADD TABLE alt.event_outbox`,
	`BEGIN`,
	`INSERT INTO event_outbox (event_type, event_date_time, environment, event_context, metadata_version) VALUES
		('golden.binary', '2026-11-23 18:49:29.123456', 'prod', '{"n": 1, "k": "v"}', 7),
		('golden.old', '1960-01-01 00:00:00.000001', '', '{}', -9223372036854775808),
		('golden.max', '2026-11-23 18:49:29', 'étoile', '{"s": "ü€😀", "a": [1, 2.5, null, true]}', 9223372036854775807),
		('golden.inf', 'infinity', 'prod', '{}', 1),
		('golden.neginf', '-infinity', 'prod', '{}', 1),
		('golden.far', '12026-07-01 12:00:00.5', 'prod', '{}', 1)`,
	`INSERT INTO event_outbox (event_type, event_date_time, environment, event_context, metadata_version, created_at, last_error, next_attempt_at, attempts)
		VALUES ('golden.created', '2026-01-01 00:00:00', 'prod', '{}', 1, '2025-12-31 23:59:59.999999', 'boom', '2026-01-02 00:00:00+00', 3)`,
	`INSERT INTO event_outbox (event_type, event_date_time, status) VALUES ('golden.processed', '2026-01-01 00:00:00', 'processed')`,
	`COMMIT`,
	`INSERT INTO alt.event_outbox (id, event_type, event_date_time, environment, event_context, metadata_version, created_at) VALUES
		(1, 'alt.row', '2026-11-23 18:49:29.123456+05:30', 'prod', '{"a":[1, 2]}', 3, '2026-11-23 00:00:00+00'),
		(-2147483648, 'alt.min', '1999-12-31 23:59:59.999999+00', 'x', '{}', -32768, NULL),
		(2147483647, 'alt.max', '2000-01-01 00:00:00+00', '', '[]', 32767, '-infinity'),
		(2, 'alt.nulls', '2026-11-23 18:49:29+00', NULL, NULL, NULL, NULL),
		(3, NULL, NULL, 'prod', '{}', 1, NULL),
		(4, 'alt.inf', 'infinity', 'prod', '{}', 1, NULL)`,
}

// replicationConn opens a replication connection with the streamer's settings
// (ConnConfig) plus extra ones.
func replicationConn(ctx context.Context, t *testing.T, dsn string, extra map[string]string) *pgconn.PgConn {
	t.Helper()
	rcfg, err := ConnConfig(dsn)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range extra {
		rcfg.RuntimeParams[k] = v
	}
	conn, err := pgconn.ConnectConfig(ctx, rcfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}

// TestCaptureGoldenBinary runs goldenBinaryScript on a real server and writes
// the session as text and as binary to testdata. It runs only with
// -update-golden.
func TestCaptureGoldenBinary(t *testing.T) {
	if !*updateGolden {
		t.Skip("run with -update-golden to capture messages from a real server")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	dsn, textConn := goldenSession(ctx, t, nil)
	binConn := replicationConn(ctx, t, dsn, nil)
	if v := textConn.ParameterStatus("server_version"); serverMajor(v) < 14 {
		t.Fatalf("PostgreSQL %s sends no binary values", v)
	}
	for conn, slot := range map[*pgconn.PgConn]string{textConn: "golden_text", binConn: "golden_binary"} {
		if _, err := pglogrepl.CreateReplicationSlot(ctx, conn, slot, "pgoutput", pglogrepl.CreateReplicationSlotOptions{Temporary: true}); err != nil {
			t.Fatal(err)
		}
	}
	plain, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close(context.Background())
	for _, q := range goldenBinaryScript {
		if _, err := plain.Exec(ctx, q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	end := currentWAL(ctx, t, plain)
	args := []string{"proto_version '1'", "publication_names 'outbox_publication'"}
	captureSession(ctx, t, textConn, "golden_text", args, end, goldenText)
	captureSession(ctx, t, binConn, "golden_binary", append(args, "binary 'true'"), end, goldenBinary)
}

// captureSession streams slot until the server's WAL end passes end and writes
// every pgoutput message to path.
func captureSession(ctx context.Context, t *testing.T, conn *pgconn.PgConn, slot string, args []string, end uint64, path string) {
	t.Helper()
	if err := pglogrepl.StartReplication(ctx, conn, slot, 0, pglogrepl.StartReplicationOptions{PluginArgs: args}); err != nil {
		t.Fatal(err)
	}
	var out []byte
	n := 0
	receiveUntil(ctx, t, conn, end, func(wal []byte) {
		out = binary.BigEndian.AppendUint32(out, uint32(len(wal)))
		out = append(out, wal...)
		n++
	})
	writeCapture(t, path, out, n)
}

// writeCapture writes a capture of n messages (each a u32 length and its
// bytes) to path.
func writeCapture(t *testing.T, path string, out []byte, n int) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, out, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("%s: %d messages, %d bytes", path, n, len(out))
}

// currentWAL is the server's current WAL position.
func currentWAL(ctx context.Context, t *testing.T, plain *pgx.Conn) uint64 {
	t.Helper()
	var cur string
	if err := plain.QueryRow(ctx, "SELECT pg_current_wal_lsn()::text").Scan(&cur); err != nil {
		t.Fatal(err)
	}
	end, err := parseLSN(cur)
	if err != nil {
		t.Fatal(err)
	}
	return end
}

// readCapture reads a length-prefixed capture that the test named capture
// writes.
func readCapture(t testing.TB, path, capture string) [][]byte {
	t.Helper()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (capture it: go test ./replication -run %s -update-golden)", err, capture)
	}
	var msgs [][]byte
	for len(raw) >= 4 {
		n := int(binary.BigEndian.Uint32(raw))
		msgs = append(msgs, raw[4:4+n])
		raw = raw[4+n:]
	}
	return msgs
}

// decodeCapture decodes a capture for one table and returns its rows.
func decodeCapture(t *testing.T, msgs [][]byte, schema string) []record.Event {
	t.Helper()
	d := NewDecoder(schema, "event_outbox", nil)
	var m Message
	var out []record.Event
	for i, msg := range msgs {
		if err := d.Decode(msg, &m); err != nil {
			t.Fatalf("%s message %d (%q): %v", schema, i, msg[0], err)
		}
		if m.Kind == KindInsert {
			out = append(out, m.Event)
		}
	}
	return out
}

// binaryValues counts the values in binary format among the captured inserts.
func binaryValues(t *testing.T, msgs [][]byte) int {
	t.Helper()
	n := 0
	for _, msg := range msgs {
		if msg[0] != 'I' {
			continue
		}
		r := reader{buf: msg[1:]}
		r.u32()
		r.u8()
		for i, cols := 0, int(r.u16()); i < cols && r.err == nil; i++ {
			if kind := r.u8(); kind == 't' || kind == 'b' {
				if kind == 'b' {
					n++
				}
				r.bytes(int(r.u32()))
			}
		}
		if r.err != nil {
			t.Fatalf("insert: %v", r.err)
		}
	}
	return n
}

// TestGoldenBinaryMatchesText decodes the session captured from PostgreSQL 15
// in text and in binary format: every row must decode to the same event both
// ways (a problem in one is a problem in the other), and the rows must be what
// the script inserted.
func TestGoldenBinaryMatchesText(t *testing.T) {
	text, bin := readCapture(t, goldenText, captureBinaryTest), readCapture(t, goldenBinary, captureBinaryTest)
	if binaryValues(t, text) != 0 {
		t.Fatal("the text capture holds binary values")
	}
	if n := binaryValues(t, bin); n < 100 {
		t.Fatalf("the binary capture holds %d binary values: not a binary session", n)
	}
	for _, schema := range []string{"public", "alt"} {
		te, be := decodeCapture(t, text, schema), decodeCapture(t, bin, schema)
		if len(te) != len(be) || len(te) < 6 {
			t.Fatalf("%s: %d rows in text, %d in binary", schema, len(te), len(be))
		}
		for i := range te {
			a, b := te[i], be[i]
			if (a.Problem == "") != (b.Problem == "") {
				t.Errorf("%s row %d (%s): problem %q in text, %q in binary", schema, i, a.Type, a.Problem, b.Problem)
			}
			a.Problem, b.Problem = "", ""
			if !reflect.DeepEqual(a, b) {
				t.Errorf("%s row %d:\n text   %+v\n binary %+v", schema, i, a, b)
			}
		}
	}
	byType := map[string]record.Event{}
	for _, schema := range []string{"public", "alt"} {
		for _, ev := range decodeCapture(t, bin, schema) {
			byType[ev.Type] = ev
		}
	}
	check := func(typ string, ok func(ev record.Event) bool) {
		t.Helper()
		if ev, found := byType[typ]; !found || !ok(ev) {
			t.Errorf("%s: %+v", typ, ev)
		}
	}
	utc := func(s string) time.Time {
		tm, err := time.Parse("2006-01-02 15:04:05.999999 -07:00", s)
		if err != nil {
			t.Fatal(err)
		}
		return tm.UTC()
	}
	check("golden.binary", func(ev record.Event) bool {
		return ev.Time == utc("2026-11-23 18:49:29.123456 +00:00") && ev.Environment == "prod" &&
			ev.Context == `{"k": "v", "n": 1}` && ev.MetadataVersion == 7 && ev.ID > 0 && ev.Problem == "" && !ev.CreatedAt.IsZero()
	})
	check("golden.old", func(ev record.Event) bool {
		return ev.Time == utc("1960-01-01 00:00:00.000001 +00:00") && ev.MetadataVersion == -1<<63 && ev.Problem == ""
	})
	check("golden.max", func(ev record.Event) bool {
		return ev.Environment == "étoile" && ev.Context == `{"a": [1, 2.5, null, true], "s": "ü€😀"}` && ev.MetadataVersion == 1<<63-1
	})
	check("golden.inf", func(ev record.Event) bool {
		return ev.Problem == "event_date_time: infinity cannot be stored in ClickHouse"
	})
	check("golden.neginf", func(ev record.Event) bool {
		return ev.Problem == "event_date_time: -infinity cannot be stored in ClickHouse"
	})
	check("golden.far", func(ev record.Event) bool { return ev.Time == time.Date(12026, 7, 1, 12, 0, 0, 5e8, time.UTC) })
	check("golden.created", func(ev record.Event) bool { return ev.CreatedAt == utc("2025-12-31 23:59:59.999999 +00:00") })
	check("alt.row", func(ev record.Event) bool {
		return ev.ID == 1 && ev.Time == utc("2026-11-23 18:49:29.123456 +05:30") && ev.Environment == "prod    " &&
			ev.Context == `{"a":[1, 2]}` && ev.MetadataVersion == 3 && ev.CreatedAt == utc("2026-11-23 00:00:00 +00:00")
	})
	check("alt.min", func(ev record.Event) bool {
		return ev.ID == -1<<31 && ev.MetadataVersion == -1<<15 && ev.Time == utc("1999-12-31 23:59:59.999999 +00:00") && ev.CreatedAt == ev.CommitTime
	})
	check("alt.max", func(ev record.Event) bool {
		return ev.ID == 1<<31-1 && ev.MetadataVersion == 1<<15-1 && ev.Context == "[]" && ev.Problem == "created_at: -infinity cannot be stored in ClickHouse"
	})
	check("alt.nulls", func(ev record.Event) bool {
		return ev.Environment == "" && ev.Context == "{}" && ev.MetadataVersion == 0 && ev.Problem == ""
	})
	check("alt.inf", func(ev record.Event) bool {
		return ev.Problem == "event_date_time: infinity cannot be stored in ClickHouse"
	})
	if _, found := byType["golden.processed"]; found {
		t.Error("a row inserted as processed was decoded as an insert to deliver")
	}
	if fmt.Sprint(len(byType)) != "13" {
		t.Errorf("%d distinct rows decoded, want 13 (12 with a type, one with a NULL type)", len(byType))
	}
}

// TestChooseBinary reads the outbox's column types on a real server: binary
// format for the outbox migration 1 creates, text (auto) or a precondition
// error (on) once a column the decoder reads has a type without a binary
// reader, text whenever it is off.
func TestChooseBinary(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	dsn, _ := goldenSession(ctx, t, nil)
	plain, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close(context.Background())
	if v := plain.PgConn().ParameterStatus("server_version"); serverMajor(v) < 14 {
		t.Skipf("PostgreSQL %s: binary format needs 14", v)
	}
	cfg := Config{DSN: dsn}
	choose := func(mode string) (bool, error) {
		cfg.Binary = mode
		if err := cfg.Validate(); err != nil {
			t.Fatal(err)
		}
		return chooseBinary(ctx, plain, cfg)
	}
	for mode, want := range map[string]bool{BinaryAuto: true, BinaryOn: true, BinaryOff: false} {
		if got, err := choose(mode); err != nil || got != want {
			t.Errorf("%s on the migrated outbox: %v, %v; want %v", mode, got, err, want)
		}
	}
	// An unread column of any type changes nothing; a read one does.
	for _, q := range []string{`ALTER TABLE event_outbox ADD COLUMN extra numeric`,
		`ALTER TABLE event_outbox ALTER COLUMN metadata_version TYPE numeric`} {
		if _, err := plain.Exec(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	if got, err := choose(BinaryAuto); err != nil || got {
		t.Errorf("auto with a numeric metadata_version: %v, %v; want text", got, err)
	}
	var pe *PreconditionError
	if _, err := choose(BinaryOn); !errors.As(err, &pe) || !strings.Contains(pe.Problem, "metadata_version") || !strings.Contains(pe.Problem, "numeric") {
		t.Errorf("on with a numeric metadata_version: %v, want a precondition error naming the column and type", err)
	}
}

// receiveUntil hands fn the pgoutput message of every XLogData the slot
// streams, until a keepalive reports the server's WAL at or past end.
func receiveUntil(ctx context.Context, t testing.TB, conn *pgconn.PgConn, end uint64, fn func(wal []byte)) {
	t.Helper()
	for {
		raw, err := conn.ReceiveMessage(ctx)
		if err != nil {
			t.Fatal(err)
		}
		cd, ok := raw.(*pgproto3.CopyData)
		if !ok || len(cd.Data) == 0 {
			continue
		}
		if cd.Data[0] == pglogrepl.PrimaryKeepaliveMessageByteID {
			ka, err := pglogrepl.ParsePrimaryKeepaliveMessage(cd.Data[1:])
			if err != nil {
				t.Fatal(err)
			}
			if uint64(ka.ServerWALEnd) >= end {
				return
			}
			continue
		}
		xld, err := pglogrepl.ParseXLogData(cd.Data[1:])
		if err != nil {
			t.Fatal(err)
		}
		fn(xld.WALData)
	}
}
