package outbox

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
)

// Limits of the outbox table's columns and the streamer's defaults.
const (
	// MaxTypeLength is the most characters Event.Type may have
	// (event_type VARCHAR(255)). PostgreSQL counts characters, not bytes.
	MaxTypeLength = 255
	// MaxEnvironmentLength is the most characters Event.Environment may have
	// (environment VARCHAR(50)).
	MaxEnvironmentLength = 50
	// DefaultMaxContextBytes is the default context size limit: 1 MiB, the
	// default of the streamer's EVENT_MAX_CONTEXT_BYTES.
	DefaultMaxContextBytes = 1 << 20
	// DefaultMetadataVersion is written when Event.MetadataVersion is 0.
	DefaultMetadataVersion = 1
)

// timeLayout renders a UTC time for a TIMESTAMP (without time zone) column:
// ISO order, which PostgreSQL reads the same under every DateStyle, and
// microseconds, the column's precision. InsertSQL's documentation repeats it.
const timeLayout = "2006-01-02 15:04:05.999999"

// Event is one row to write into the outbox table.
//
// Set at most one of Context and RawContext; with neither, the context is {}.
type Event struct {
	// Type names the event, such as "order.paid". Required, at most
	// MaxTypeLength characters.
	Type string
	// Time is when the event happened. Required. Any location is fine: it
	// is stored as UTC, truncated to the microsecond, and must lie within
	// TimeRange.
	Time time.Time
	// Environment names where the event happened (dev, prod, ...); at most
	// MaxEnvironmentLength characters. When empty, the writer's
	// Options.Environment is used.
	Environment string
	// Context is the event's data, encoded with encoding/json (without
	// escaping <, > and &). A string or []byte here is refused, since it
	// would be stored as a JSON string: put already encoded JSON in
	// RawContext instead.
	Context any
	// RawContext is the event's data as encoded JSON, stored as given
	// (PostgreSQL's jsonb normalises it: whitespace, key order and duplicate
	// keys are not kept).
	RawContext json.RawMessage
	// MetadataVersion is the version of the context's schema;
	// 0 means DefaultMetadataVersion.
	MetadataVersion int64
}

// Options configures a Writer. The zero value gives the defaults.
type Options struct {
	// MaxContextBytes is the largest context accepted, measured as
	// PostgreSQL prints the jsonb value — the text the streamer receives and
	// compares with its own EVENT_MAX_CONTEXT_BYTES, so set the two alike.
	// Default (0) DefaultMaxContextBytes.
	MaxContextBytes int
	// LegacyClickHouse restricts Event.Time to what a legacy ClickHouse
	// DateTime column holds (1970-01-01 00:00:00 to 2106-02-07 06:28:15 UTC)
	// instead of DateTime64(6) (1900-01-01 to 2262-04-11). Set it when the
	// streamer writes to a ClickHouse older than 22.x.
	LegacyClickHouse bool
	// Environment is written for events whose Environment is empty.
	Environment string
	// Table is the outbox table: a table name or schema.table, such as
	// "app.event_outbox". Each part is quoted (a double quote in a name is
	// doubled), so it must be spelled as PostgreSQL stores it: lower case
	// for a table created without quotes. Names containing dots are not
	// supported. Default ("") DefaultTable, found through the session's
	// search_path.
	//
	// It must be the table the streamer reads. The streamer's migrations
	// create public.event_outbox: name it so when the producer's search_path
	// finds another event_outbox first; another table only serves a
	// streamer set up to read that one.
	Table string
}

// Validate reports whether the options can be used: the table name parses
// and the default environment fits the column. A Writer with invalid options
// fails every call, so check them at startup.
func (o Options) Validate() error {
	if err := resolveTable(o.Table).err; err != nil {
		return err
	}
	if err := checkText(o.Environment); err != "" {
		return fmt.Errorf("outbox: default environment %s", err)
	}
	if n := utf8.RuneCountInString(o.Environment); n > MaxEnvironmentLength {
		return fmt.Errorf("outbox: default environment %q has %d characters, over the %d the column holds", o.Environment, n, MaxEnvironmentLength)
	}
	return nil
}

// Writer validates events and writes them into the outbox table. It holds no
// connection: the transaction is passed to each call. A Writer is safe for
// concurrent use, and its zero value uses the default Options.
type Writer struct {
	opts  Options
	table *table // nil: defaultTable
}

// New returns a Writer with the given options. Invalid options (see
// Options.Validate) make every Append and AppendBatch fail.
func New(opts Options) *Writer {
	t := resolveTable(opts.Table)
	return &Writer{opts: opts, table: &t}
}

// tbl returns the table w writes to.
func (w *Writer) tbl() *table {
	if w.table == nil {
		return &defaultTable
	}
	return w.table
}

// defaultWriter serves the package-level functions.
var defaultWriter Writer

// Querier runs one query and returns one row: what Append needs from a
// transaction. pgx.Tx satisfies it; wrap a database/sql *sql.Tx with SQL.
//
// *pgx.Conn and *pgxpool.Pool satisfy it too, but then the event is committed
// on its own, outside any business transaction: only right for an event that
// accompanies no other change.
type Querier interface {
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// CopyFromer runs a COPY FROM STDIN: what AppendBatch needs from a
// transaction. pgx.Tx satisfies it, and so do *pgx.Conn and *pgxpool.Pool
// (with Querier's caveat: outside a transaction the events commit on their
// own), as does any wrapper with the same method, such as a tracing one.
//
// It is an interface, rather than pgx.Tx, so that code holding a narrower or
// wrapped handle can call AppendBatch without having a whole pgx.Tx.
type CopyFromer interface {
	CopyFrom(ctx context.Context, tableName pgx.Identifier, columnNames []string, rowSrc pgx.CopyFromSource) (int64, error)
}

// SQLQuerier is the method of a database/sql *sql.Tx (or *sql.Conn, *sql.DB)
// that SQL adapts.
type SQLQuerier interface {
	QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row
}

// SQL adapts a database/sql transaction for Append:
//
//	id, err := outbox.Append(ctx, outbox.SQL(tx), ev)
//
// The statement passes every value as text and casts it explicitly, so it
// does not depend on how a driver types parameters (the tests use pgx's
// stdlib driver).
func SQL(tx SQLQuerier) Querier {
	return sqlQuerier{tx}
}

type sqlQuerier struct{ tx SQLQuerier }

func (q sqlQuerier) QueryRow(ctx context.Context, query string, args ...any) pgx.Row {
	return q.tx.QueryRowContext(ctx, query, args...)
}

// Append validates ev and inserts it through tx, returning its id. Call it
// inside the transaction that makes the business change the event reports, so
// that both commit or neither does.
//
// A validation failure is a *ValidationError and sends nothing, leaving tx
// usable. A database error (for example a missing table) aborts tx, as any
// failed statement does.
func (w *Writer) Append(ctx context.Context, tx Querier, ev Event) (int64, error) {
	t := w.tbl()
	if t.err != nil {
		return 0, t.err
	}
	r, err := w.check(&ev, -1)
	if err != nil {
		return 0, err
	}
	// Every parameter is text, cast in the statement (see InsertSQL). In
	// particular the time is text without an offset cast straight to
	// timestamp: a time.Time parameter could be typed timestamptz by some
	// drivers, and the implicit timestamptz→timestamp conversion would then
	// shift it by the session's TimeZone.
	var id int64
	err = tx.QueryRow(ctx, t.insert,
		r.typ, r.at.Format(timeLayout), r.env, string(r.ctx), strconv.FormatInt(r.version, 10)).Scan(&id)
	if err != nil {
		return 0, fmt.Errorf("outbox: insert %s event into %s: %w", r.typ, t.name, err)
	}
	return id, nil
}

// AppendBatch validates every event, then writes them all with one COPY
// through tx, and returns how many rows were written. COPY cannot return the
// ids: use Append when you need them. It pays off from a few events on
// (measured with cmd/outbox-loadgen: about five times the rate of one Append
// per event at 50 events per transaction), while for a single event Append is
// quicker (COPY's protocol exchange costs more than one INSERT).
//
// Nothing is sent unless every event is valid: the first invalid one is
// reported as a *ValidationError whose Index is its position in evs, and tx
// stays usable. A database error aborts tx. An empty evs writes nothing.
//
// COPY is a pgx feature; with database/sql call Append for each event.
func (w *Writer) AppendBatch(ctx context.Context, tx CopyFromer, evs []Event) (int64, error) {
	t := w.tbl()
	if t.err != nil {
		return 0, t.err
	}
	if len(evs) == 0 {
		return 0, nil
	}
	// Validate (and encode) everything first: a failure in the middle of a
	// COPY would abort the caller's transaction, and this way the Context
	// values are marshaled exactly once.
	rows := make([]row, len(evs))
	for i := range evs {
		r, err := w.check(&evs[i], i)
		if err != nil {
			return 0, err
		}
		rows[i] = r
	}
	// Binary COPY sends the time as microseconds since 2000-01-01 with no
	// zone at all, so the session's TimeZone cannot shift it; pgx takes the
	// wall clock of the time.Time, which check made UTC.
	src := pgx.CopyFromSlice(len(rows), func(i int) ([]any, error) {
		r := &rows[i]
		return []any{r.typ, r.at, r.env, json.RawMessage(r.ctx), r.version}, nil
	})
	n, err := tx.CopyFrom(ctx, t.ident, copyColumns, src)
	if err != nil {
		return 0, fmt.Errorf("outbox: copy %d events into %s: %w", len(rows), t.name, err)
	}
	return n, nil
}

// Validate reports whether w would accept ev, without writing it: nil or a
// *ValidationError (with Index -1). Append and AppendBatch validate anyway;
// this is for checking events before a transaction is opened.
func (w *Writer) Validate(ev Event) error {
	_, err := w.check(&ev, -1)
	return err
}

// Append writes ev with the default Options; see Writer.Append.
func Append(ctx context.Context, tx Querier, ev Event) (int64, error) {
	return defaultWriter.Append(ctx, tx, ev)
}

// AppendBatch writes evs with the default Options; see Writer.AppendBatch.
func AppendBatch(ctx context.Context, tx CopyFromer, evs []Event) (int64, error) {
	return defaultWriter.AppendBatch(ctx, tx, evs)
}

// Validate checks ev against the default Options; see Writer.Validate.
func Validate(ev Event) error {
	return defaultWriter.Validate(ev)
}

// TimeRange returns the earliest and latest event times the streamer can
// deliver faithfully: what ClickHouse's DateTime64(6) holds as the streamer's
// client writes it (1900-01-01 to 2262-04-11 23:47:16.854775: the client
// goes through nanoseconds since 1970 in an int64), or with legacy the legacy DateTime (whole seconds from
// 1970-01-01 to 2106-02-07 06:28:15 UTC). ClickHouse would silently wrap a
// time outside it, so the streamer fails such rows; Append refuses them.
func TimeRange(legacy bool) (min, max time.Time) {
	// Keep in step with sink.TimeRange (a test checks); it is repeated here
	// so that producers do not import the ClickHouse client.
	if legacy {
		return time.Unix(0, 0).UTC(), time.Unix(1<<32-1, 0).UTC()
	}
	return time.Date(1900, 1, 1, 0, 0, 0, 0, time.UTC), time.Unix(0, math.MaxInt64).UTC().Truncate(time.Microsecond)
}

// row is an event that passed validation, encoded for the database.
type row struct {
	typ     string
	at      time.Time // UTC, whole microseconds
	env     string
	ctx     []byte // JSON
	version int64
}

// check validates ev and encodes it. index is reported in errors (-1: not in
// a batch).
func (w *Writer) check(ev *Event, index int) (row, error) {
	fail := func(field string, sentinel error, cause error, format string, args ...any) (row, error) {
		return row{}, &ValidationError{Index: index, Field: field, Reason: fmt.Sprintf(format, args...), Err: sentinel, Cause: cause}
	}
	r := row{typ: ev.Type, env: ev.Environment, version: ev.MetadataVersion}
	if r.env == "" {
		r.env = w.opts.Environment
	}
	if r.version == 0 {
		r.version = DefaultMetadataVersion
	}

	if r.typ == "" {
		return fail("Type", ErrEmptyType, nil, "event type is empty")
	}
	if err := checkText(r.typ); err != "" {
		return fail("Type", ErrInvalidText, nil, "event type %s", err)
	}
	if n := utf8.RuneCountInString(r.typ); n > MaxTypeLength {
		return fail("Type", ErrTypeTooLong, nil, "event type has %d characters, over the %d the column holds", n, MaxTypeLength)
	}
	if err := checkText(r.env); err != "" {
		return fail("Environment", ErrInvalidText, nil, "environment %s", err)
	}
	if n := utf8.RuneCountInString(r.env); n > MaxEnvironmentLength {
		return fail("Environment", ErrEnvironmentTooLong, nil, "environment %q has %d characters, over the %d the column holds", r.env, n, MaxEnvironmentLength)
	}

	if ev.Time.IsZero() {
		return fail("Time", ErrZeroTime, nil, "event time is not set")
	}
	// Truncate first, as the database will: the range check must see the
	// value the streamer will read back.
	r.at = ev.Time.UTC().Truncate(time.Microsecond)
	if lo, hi := TimeRange(w.opts.LegacyClickHouse); r.at.Before(lo) || r.at.After(hi) {
		kind := "DateTime64(6)"
		if w.opts.LegacyClickHouse {
			kind = "legacy DateTime"
		}
		return fail("Time", ErrTimeOutOfRange, nil, "event time %s is outside what a ClickHouse %s holds (%s to %s)",
			r.at.Format(time.RFC3339Nano), kind, lo.Format(time.RFC3339), hi.Format(time.RFC3339Nano))
	}

	ctx, err := encodeContext(ev)
	if err != nil {
		return fail("Context", ErrInvalidContext, err, "event context: %v", err)
	}
	size, err := jsonbTextLen(ctx)
	if err != nil {
		return fail("Context", ErrInvalidContext, err, "event context %v", err)
	}
	limit := w.opts.MaxContextBytes
	if limit <= 0 {
		limit = DefaultMaxContextBytes
	}
	if size > limit {
		return fail("Context", ErrContextTooLarge, nil, "event context is %d bytes as PostgreSQL prints it, over the %d-byte limit", size, limit)
	}
	r.ctx = ctx
	return r, nil
}

// checkText returns why s cannot be stored in a PostgreSQL text column, or "".
func checkText(s string) string {
	if !utf8.ValidString(s) {
		return "is not valid UTF-8"
	}
	if strings.IndexByte(s, 0) >= 0 {
		return "contains a NUL byte"
	}
	return ""
}

// emptyContext is the context of an event that has none, the column default.
var emptyContext = []byte("{}")

// encodeContext returns the event's context as JSON.
func encodeContext(ev *Event) ([]byte, error) {
	switch {
	case ev.Context != nil && len(ev.RawContext) > 0:
		return nil, fmt.Errorf("both Context and RawContext are set")
	case len(ev.RawContext) > 0:
		if !utf8.Valid(ev.RawContext) {
			return nil, fmt.Errorf("RawContext is not valid UTF-8")
		}
		if !json.Valid(ev.RawContext) {
			return nil, fmt.Errorf("RawContext is not valid JSON")
		}
		return ev.RawContext, nil
	case ev.Context == nil:
		return emptyContext, nil
	}
	switch ev.Context.(type) {
	case string, []byte:
		return nil, fmt.Errorf("Context is a %T, which would be stored as a JSON string; put encoded JSON in RawContext", ev.Context)
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	// jsonb stores the characters, not their escapes; escaping them would
	// only make the statement larger.
	enc.SetEscapeHTML(false)
	if err := enc.Encode(ev.Context); err != nil {
		return nil, fmt.Errorf("marshal Context: %w", err)
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n")), nil
}
