package outbox_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-streamer/outbox-streamer/outbox"
)

// What Append and AppendBatch accept: a transaction, a connection or a pool.
var (
	_ outbox.Querier    = pgx.Tx(nil)
	_ outbox.Querier    = (*pgx.Conn)(nil)
	_ outbox.Querier    = (*pgxpool.Pool)(nil)
	_ outbox.CopyFromer = pgx.Tx(nil)
	_ outbox.CopyFromer = (*pgx.Conn)(nil)
	_ outbox.CopyFromer = (*pgxpool.Pool)(nil)
)

// fakeDB records what Append and AppendBatch send. The tests against a real
// PostgreSQL are in the streamer's module (internal/producertest), which has
// the servers and the migrations; these need neither.
type fakeDB struct {
	queries []query
	copies  []copyCall
	err     error // returned by every call
}

type query struct {
	sql  string
	args []any
}

type copyCall struct {
	table   pgx.Identifier
	columns []string
	rows    [][]any
}

func (db *fakeDB) QueryRow(_ context.Context, sql string, args ...any) pgx.Row {
	db.queries = append(db.queries, query{sql, args})
	return fakeRow{id: int64(len(db.queries)), err: db.err}
}

func (db *fakeDB) CopyFrom(_ context.Context, table pgx.Identifier, columns []string, src pgx.CopyFromSource) (int64, error) {
	c := copyCall{table: table, columns: columns}
	for src.Next() {
		vals, err := src.Values()
		if err != nil {
			return 0, err
		}
		c.rows = append(c.rows, vals)
	}
	db.copies = append(db.copies, c)
	if db.err != nil {
		return 0, db.err
	}
	return int64(len(c.rows)), src.Err()
}

func (db *fakeDB) sent() int { return len(db.queries) + len(db.copies) }

type fakeRow struct {
	id  int64
	err error
}

func (r fakeRow) Scan(dest ...any) error {
	if r.err != nil {
		return r.err
	}
	*dest[0].(*int64) = r.id
	return nil
}

func TestInsertStatement(t *testing.T) {
	tests := []struct {
		table  string
		quoted string // "" when the name is refused
	}{
		{"", `"event_outbox"`},
		{"event_outbox", `"event_outbox"`},
		{"app.event_outbox", `"app"."event_outbox"`},
		{"order", `"order"`}, // a keyword
		{"App.Events", `"App"."Events"`},
		{`my "odd" table`, `"my ""odd"" table"`},
		{"é.ü", `"é"."ü"`},
		{"a.b.c", ""},
		{".event_outbox", ""},
		{"app.", ""},
		{"a..b", ""},
		{`"event_outbox"`, ""},
		{"event\x00outbox", ""},
		{"\xff", ""},
	}
	for _, tc := range tests {
		got, err := outbox.InsertStatement(tc.table)
		if tc.quoted == "" {
			if err == nil || got != "" {
				t.Errorf("InsertStatement(%q) = %q, %v; want an error", tc.table, got, err)
			} else if !strings.Contains(err.Error(), fmt.Sprintf("%q", tc.table)) {
				t.Errorf("InsertStatement(%q): error %q does not name the table", tc.table, err)
			}
			if err := (outbox.Options{Table: tc.table}).Validate(); err == nil {
				t.Errorf("Options{Table: %q}.Validate() = nil", tc.table)
			}
			continue
		}
		if err != nil {
			t.Errorf("InsertStatement(%q): %v", tc.table, err)
			continue
		}
		want := strings.Replace(outbox.InsertSQL, `"event_outbox"`, tc.quoted, 1)
		if got != want {
			t.Errorf("InsertStatement(%q) = %q, want %q", tc.table, got, want)
		}
		if err := (outbox.Options{Table: tc.table}).Validate(); err != nil {
			t.Errorf("Options{Table: %q}.Validate() = %v", tc.table, err)
		}
	}
	if !strings.HasPrefix(outbox.InsertSQL, `INSERT INTO "event_outbox" (`) || outbox.DefaultTable != "event_outbox" {
		t.Fatalf("InsertSQL does not insert into %s: %s", outbox.DefaultTable, outbox.InsertSQL)
	}
}

// TestAppendExecutesInsertSQL: the exported statement is the one Append
// sends, with the parameters in the documented order and form.
func TestAppendExecutesInsertSQL(t *testing.T) {
	ctx := context.Background()
	paris, err := time.LoadLocation("Europe/Paris")
	if err != nil {
		t.Fatal(err)
	}
	ev := outbox.Event{
		Type:        "order.paid",
		Time:        time.Date(2024, 7, 14, 23, 30, 15, 123456789, paris),
		Environment: "test",
		Context:     map[string]any{"id": 42, "note": "<é & 😀>"},
	}
	wantArgs := []any{"order.paid", "2024-07-14 21:30:15.123456", "test", `{"id":42,"note":"<é & 😀>"}`, "1"}

	for _, tc := range []struct {
		name  string
		w     *outbox.Writer
		table string
	}{
		{"package function", nil, ""},
		{"zero Writer", new(outbox.Writer), ""},
		{"New with defaults", outbox.New(outbox.Options{}), ""},
		{"schema-qualified table", outbox.New(outbox.Options{Table: "app.event_outbox"}), "app.event_outbox"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			db := new(fakeDB)
			var id int64
			var err error
			if tc.w == nil {
				id, err = outbox.Append(ctx, db, ev)
			} else {
				id, err = tc.w.Append(ctx, db, ev)
			}
			if err != nil || id != 1 {
				t.Fatalf("Append = %d, %v", id, err)
			}
			want, err := outbox.InsertStatement(tc.table)
			if err != nil {
				t.Fatal(err)
			}
			if tc.table == "" && want != outbox.InsertSQL {
				t.Fatalf("InsertStatement(\"\") differs from InsertSQL:\n%s\n%s", want, outbox.InsertSQL)
			}
			if len(db.queries) != 1 || db.queries[0].sql != want {
				t.Fatalf("sent %q, want %q", db.queries, want)
			}
			if !reflect.DeepEqual(db.queries[0].args, wantArgs) {
				t.Fatalf("arguments %q, want %q", db.queries[0].args, wantArgs)
			}
		})
	}

	// An explicit metadata version, a default environment and no context.
	db := new(fakeDB)
	w := outbox.New(outbox.Options{Environment: "staging"})
	if _, err := w.Append(ctx, db, outbox.Event{Type: "bare", Time: time.Date(2031, 1, 2, 3, 4, 5, 0, time.UTC), MetadataVersion: 3}); err != nil {
		t.Fatal(err)
	}
	if got, want := db.queries[0].args, []any{"bare", "2031-01-02 03:04:05", "staging", "{}", "3"}; !reflect.DeepEqual(got, want) {
		t.Fatalf("arguments %q, want %q", got, want)
	}
}

// TestAppendBatchCopies: one COPY of every event into the configured table.
func TestAppendBatchCopies(t *testing.T) {
	ctx := context.Background()
	at := time.Date(2025, 3, 9, 6, 59, 59, 999999999, time.FixedZone("UTC+5:30", 5*3600+1800))
	utc := time.Date(2025, 3, 9, 1, 29, 59, 999999000, time.UTC)
	evs := []outbox.Event{
		{Type: "a", Time: at, Environment: "prod", RawContext: json.RawMessage(`{"n": 1}`), MetadataVersion: 2},
		{Type: "b", Time: at},
	}
	wantColumns := []string{"event_type", "event_date_time", "environment", "event_context", "metadata_version"}
	wantRows := [][]any{
		{"a", utc, "prod", json.RawMessage(`{"n": 1}`), int64(2)},
		{"b", utc, "", json.RawMessage(`{}`), int64(1)},
	}
	for _, tc := range []struct {
		table string
		want  pgx.Identifier
	}{
		{"", pgx.Identifier{"event_outbox"}},
		{"app.event_outbox", pgx.Identifier{"app", "event_outbox"}},
	} {
		db := new(fakeDB)
		n, err := outbox.New(outbox.Options{Table: tc.table}).AppendBatch(ctx, db, evs)
		if err != nil || n != 2 {
			t.Fatalf("table %q: AppendBatch = %d, %v", tc.table, n, err)
		}
		if len(db.copies) != 1 || len(db.queries) != 0 {
			t.Fatalf("table %q: %d COPY and %d queries, want one COPY", tc.table, len(db.copies), len(db.queries))
		}
		c := db.copies[0]
		if !reflect.DeepEqual(c.table, tc.want) || !reflect.DeepEqual(c.columns, wantColumns) {
			t.Fatalf("table %q: COPY %v %v, want %v %v", tc.table, c.table, c.columns, tc.want, wantColumns)
		}
		// The COPY's table, quoted, is the INSERT's: both name one table.
		insert, err := outbox.InsertStatement(tc.table)
		if err != nil || !strings.HasPrefix(insert, "INSERT INTO "+c.table.Sanitize()+" (") {
			t.Fatalf("table %q: COPY into %s but InsertStatement is %q (%v)", tc.table, c.table.Sanitize(), insert, err)
		}
		if !reflect.DeepEqual(c.rows, wantRows) {
			t.Fatalf("table %q: rows %v, want %v", tc.table, c.rows, wantRows)
		}
	}

	// No events: nothing sent.
	db := new(fakeDB)
	if n, err := outbox.AppendBatch(ctx, db, nil); n != 0 || err != nil || db.sent() != 0 {
		t.Fatalf("AppendBatch(nil) = %d, %v after %d calls", n, err, db.sent())
	}
}

// TestDatabaseErrors: a database error is wrapped with the table's name and
// stays matchable.
func TestDatabaseErrors(t *testing.T) {
	ctx := context.Background()
	errDB := errors.New("relation does not exist")
	db := &fakeDB{err: errDB}
	w := outbox.New(outbox.Options{Table: "app.events"})
	ev := outbox.Event{Type: "x", Time: time.Now()}
	if _, err := w.Append(ctx, db, ev); !errors.Is(err, errDB) || !strings.Contains(err.Error(), "app.events") {
		t.Fatalf("Append: %v", err)
	}
	if _, err := w.AppendBatch(ctx, db, []outbox.Event{ev}); !errors.Is(err, errDB) || !strings.Contains(err.Error(), "app.events") {
		t.Fatalf("AppendBatch: %v", err)
	}
}

// TestInvalidTable: a Writer whose table name is unusable sends nothing.
func TestInvalidTable(t *testing.T) {
	ctx := context.Background()
	w := outbox.New(outbox.Options{Table: "a.b.c"})
	db := new(fakeDB)
	ev := outbox.Event{Type: "x", Time: time.Now()}
	if _, err := w.Append(ctx, db, ev); err == nil || !strings.Contains(err.Error(), `"a.b.c"`) {
		t.Fatalf("Append: %v", err)
	}
	if _, err := w.AppendBatch(ctx, db, []outbox.Event{ev}); err == nil {
		t.Fatal("AppendBatch: no error")
	}
	if db.sent() != 0 {
		t.Fatalf("%d calls sent", db.sent())
	}
}

func TestOptionsValidate(t *testing.T) {
	if err := (outbox.Options{}).Validate(); err != nil {
		t.Fatal(err)
	}
	ok := outbox.Options{MaxContextBytes: 10, LegacyClickHouse: true, Environment: strings.Repeat("é", outbox.MaxEnvironmentLength), Table: "app.event_outbox"}
	if err := ok.Validate(); err != nil {
		t.Fatal(err)
	}
	for _, o := range []outbox.Options{
		{Environment: strings.Repeat("e", outbox.MaxEnvironmentLength+1)},
		{Environment: "a\x00"},
		{Table: "a.b.c"},
	} {
		if err := o.Validate(); err == nil {
			t.Errorf("%+v is valid", o)
		}
	}
}

// unmarshalable fails to marshal with an error of its own.
type unmarshalable struct{}

var errCustom = errors.New("custom marshal failure")

func (unmarshalable) MarshalJSON() ([]byte, error) { return nil, errCustom }

// TestValidationErrors: every rule, through Validate, Append and AppendBatch.
// A refused event sends nothing at all, which is why the transaction stays
// usable (internal/producertest checks that on a real one).
func TestValidationErrors(t *testing.T) {
	ctx := context.Background()
	now := time.Now()
	ok := outbox.Event{Type: "ok", Time: now}
	with := func(f func(*outbox.Event)) outbox.Event {
		ev := ok
		f(&ev)
		return ev
	}
	big := strings.Repeat("x", outbox.DefaultMaxContextBytes)
	modernMin, modernMax := outbox.TimeRange(false)
	legacyMin, legacyMax := outbox.TimeRange(true)

	tests := []struct {
		name   string
		opts   outbox.Options
		ev     outbox.Event
		want   error
		field  string
		cause  any // a pointer to an error type errors.As must find, or nil
		target error
	}{
		{name: "empty type", ev: with(func(e *outbox.Event) { e.Type = "" }), want: outbox.ErrEmptyType, field: "Type"},
		{name: "type of 256 bytes", ev: with(func(e *outbox.Event) { e.Type = strings.Repeat("t", 256) }), want: outbox.ErrTypeTooLong, field: "Type"},
		{name: "type of 256 characters", ev: with(func(e *outbox.Event) { e.Type = strings.Repeat("é", 256) }), want: outbox.ErrTypeTooLong, field: "Type"},
		{name: "type invalid UTF-8", ev: with(func(e *outbox.Event) { e.Type = "a\xffb" }), want: outbox.ErrInvalidText, field: "Type"},
		{name: "type with NUL", ev: with(func(e *outbox.Event) { e.Type = "a\x00b" }), want: outbox.ErrInvalidText, field: "Type"},
		{name: "environment of 51", ev: with(func(e *outbox.Event) { e.Environment = strings.Repeat("e", 51) }), want: outbox.ErrEnvironmentTooLong, field: "Environment"},
		{name: "environment invalid UTF-8", ev: with(func(e *outbox.Event) { e.Environment = "\xc3" }), want: outbox.ErrInvalidText, field: "Environment"},
		{name: "zero time", ev: with(func(e *outbox.Event) { e.Time = time.Time{} }), want: outbox.ErrZeroTime, field: "Time"},
		{name: "before 1900", ev: with(func(e *outbox.Event) { e.Time = modernMin.Add(-time.Microsecond) }), want: outbox.ErrTimeOutOfRange, field: "Time"},
		{name: "after 2262-04-11", ev: with(func(e *outbox.Event) { e.Time = modernMax.Add(time.Microsecond) }), want: outbox.ErrTimeOutOfRange, field: "Time"},
		{name: "legacy before 1970", opts: outbox.Options{LegacyClickHouse: true}, ev: with(func(e *outbox.Event) { e.Time = legacyMin.Add(-time.Microsecond) }), want: outbox.ErrTimeOutOfRange, field: "Time"},
		{name: "legacy after 2106", opts: outbox.Options{LegacyClickHouse: true}, ev: with(func(e *outbox.Event) { e.Time = legacyMax.Add(time.Microsecond) }), want: outbox.ErrTimeOutOfRange, field: "Time"},
		{name: "raw context not JSON", ev: with(func(e *outbox.Event) { e.RawContext = json.RawMessage(`{"a":`) }), want: outbox.ErrInvalidContext, field: "Context"},
		{name: "raw context invalid UTF-8", ev: with(func(e *outbox.Event) { e.RawContext = json.RawMessage("\"\xff\"") }), want: outbox.ErrInvalidContext, field: "Context"},
		{name: "raw context with \\u0000", ev: with(func(e *outbox.Event) { e.RawContext = json.RawMessage(`{"a":"x\u0000"}`) }), want: outbox.ErrInvalidContext, field: "Context"},
		{name: "raw context with lone surrogate", ev: with(func(e *outbox.Event) { e.RawContext = json.RawMessage(`["\ud800"]`) }), want: outbox.ErrInvalidContext, field: "Context"},
		{name: "raw context number overflow", ev: with(func(e *outbox.Event) { e.RawContext = json.RawMessage(`{"n":1e131072}`) }), want: outbox.ErrInvalidContext, field: "Context"},
		{name: "context with NUL in a string", ev: with(func(e *outbox.Event) { e.Context = map[string]string{"a": "x\x00"} }), want: outbox.ErrInvalidContext, field: "Context"},
		{name: "context unsupported type", ev: with(func(e *outbox.Event) { e.Context = map[string]any{"c": make(chan int)} }), want: outbox.ErrInvalidContext, field: "Context", cause: new(*json.UnsupportedTypeError)},
		{name: "context NaN", ev: with(func(e *outbox.Event) { e.Context = []float64{math.NaN()} }), want: outbox.ErrInvalidContext, field: "Context", cause: new(*json.UnsupportedValueError)},
		{name: "context MarshalJSON error", ev: with(func(e *outbox.Event) { e.Context = unmarshalable{} }), want: outbox.ErrInvalidContext, field: "Context", target: errCustom},
		{name: "context is a string", ev: with(func(e *outbox.Event) { e.Context = `{"a":1}` }), want: outbox.ErrInvalidContext, field: "Context"},
		{name: "context is []byte", ev: with(func(e *outbox.Event) { e.Context = []byte(`{"a":1}`) }), want: outbox.ErrInvalidContext, field: "Context"},
		{name: "both contexts", ev: with(func(e *outbox.Event) { e.Context = 1; e.RawContext = json.RawMessage(`1`) }), want: outbox.ErrInvalidContext, field: "Context"},
		{name: "context over 1 MiB", ev: with(func(e *outbox.Event) { e.Context = map[string]string{"pad": big} }), want: outbox.ErrContextTooLarge, field: "Context"},
		{name: "context over a custom limit", opts: outbox.Options{MaxContextBytes: 10}, ev: with(func(e *outbox.Event) { e.RawContext = json.RawMessage(`{"a":12345}`) }), want: outbox.ErrContextTooLarge, field: "Context"},
		// 1e+21 is 5 bytes as sent but 22 as jsonb prints it.
		{name: "context small as sent, large as printed", opts: outbox.Options{MaxContextBytes: 20}, ev: with(func(e *outbox.Event) { e.Context = 1e21 }), want: outbox.ErrContextTooLarge, field: "Context"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			w := outbox.New(tc.opts)
			checkErr := func(t *testing.T, err error, index int) {
				t.Helper()
				if !errors.Is(err, tc.want) {
					t.Fatalf("got %v, want %v", err, tc.want)
				}
				var ve *outbox.ValidationError
				if !errors.As(err, &ve) {
					t.Fatalf("%v is not a *ValidationError", err)
				}
				if ve.Index != index || ve.Field != tc.field {
					t.Fatalf("Index %d Field %q, want %d %q (%v)", ve.Index, ve.Field, index, tc.field, err)
				}
				if index >= 0 && !strings.HasPrefix(err.Error(), fmt.Sprintf("outbox: event %d: ", index)) {
					t.Fatalf("message %q does not name event %d", err, index)
				}
				if tc.cause != nil && !errors.As(err, tc.cause) {
					t.Fatalf("errors.As(%v, %T) is false", err, tc.cause)
				}
				if tc.target != nil && !errors.Is(err, tc.target) {
					t.Fatalf("errors.Is(%v, %v) is false", err, tc.target)
				}
			}
			checkErr(t, w.Validate(tc.ev), -1)

			db := new(fakeDB)
			_, err := w.Append(ctx, db, tc.ev)
			checkErr(t, err, -1)
			_, err = w.AppendBatch(ctx, db, []outbox.Event{ok, ok, tc.ev, ok})
			checkErr(t, err, 2)
			if db.sent() != 0 {
				t.Fatalf("%d statements sent for a refused event", db.sent())
			}
		})
	}

	// The writer's default environment is held to the same limit.
	w := outbox.New(outbox.Options{Environment: strings.Repeat("e", 51)})
	if err := w.Validate(ok); !errors.Is(err, outbox.ErrEnvironmentTooLong) {
		t.Fatalf("default environment of 51 characters: got %v, want ErrEnvironmentTooLong", err)
	}
}
