package producertest

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/testenv"
	"github.com/outbox-streamer/outbox-streamer/migrations"
	"github.com/outbox-streamer/outbox-streamer/outbox"
	"github.com/outbox-streamer/outbox-streamer/sink"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// newOutboxDB creates a fresh database with the outbox schema and returns its DSN
// and a pool. Only the PostgreSQL migrations are applied (rendered by package
// migrations), so these tests do not need ClickHouse.
func newOutboxDB(t *testing.T) (string, *pgxpool.Pool) {
	t.Helper()
	dsn := testenv.NewDatabase(t)
	files, err := migrations.Rendered("postgres", migrations.PostgresData("outbox_publication"))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for name := range files {
		if strings.HasSuffix(name, ".up.sql") {
			names = append(names, name)
		}
	}
	sort.Strings(names)
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	for _, name := range names {
		if _, err := pool.Exec(ctx, files[name]); err != nil {
			t.Fatalf("apply %s: %v", name, err)
		}
	}
	return dsn, pool
}

// stored is an outbox row as read back.
type stored struct {
	Type, Env, Status string
	Time              time.Time
	Context           string
	Version           int64
}

func readRow(t *testing.T, pool *pgxpool.Pool, id int64) stored {
	t.Helper()
	var r stored
	// to_char renders the TIMESTAMP itself, independent of any time zone
	// handling in the driver.
	var ts string
	err := pool.QueryRow(context.Background(), `SELECT event_type, environment, status,
		to_char(event_date_time, 'YYYY-MM-DD"T"HH24:MI:SS.US'), event_context::text, metadata_version
		FROM event_outbox WHERE id = $1`, id).Scan(&r.Type, &r.Env, &r.Status, &ts, &r.Context, &r.Version)
	if err != nil {
		t.Fatalf("read event %d: %v", id, err)
	}
	r.Time, err = time.Parse("2006-01-02T15:04:05.000000", ts)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// jsonEqual compares two JSON documents by value.
func jsonEqual(t *testing.T, got string, want any) {
	t.Helper()
	var g, w any
	if err := json.Unmarshal([]byte(got), &g); err != nil {
		t.Fatalf("stored context %q: %v", got, err)
	}
	wb, err := json.Marshal(want)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(wb, &w); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(g, w) {
		t.Fatalf("stored context %s, want %s", got, wb)
	}
}

func count(t *testing.T, pool *pgxpool.Pool) int64 {
	t.Helper()
	var n int64
	if err := pool.QueryRow(context.Background(), "SELECT count(*) FROM event_outbox").Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

func TestAppendCommitted(t *testing.T) {
	_, pool := newOutboxDB(t)
	ctx := context.Background()
	paris, err := time.LoadLocation("Europe/Paris")
	if err != nil {
		t.Fatal(err)
	}
	// A time in another zone, with nanoseconds: stored as UTC, truncated to µs.
	at := time.Date(2024, 7, 14, 23, 30, 15, 123456789, paris)
	type order struct {
		ID    int      `json:"id"`
		Items []string `json:"items"`
		Note  string   `json:"note"`
	}
	ctxValue := order{ID: 42, Items: []string{"a", "b"}, Note: "<é & 😀>"}

	var id int64
	err = pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		id, err = outbox.Append(ctx, tx, outbox.Event{Type: "order.paid", Time: at, Environment: "test", Context: ctxValue})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	got := readRow(t, pool, id)
	want := stored{Type: "order.paid", Env: "test", Status: "pending", Time: time.Date(2024, 7, 14, 21, 30, 15, 123456000, time.UTC), Version: 1}
	want.Context = got.Context
	if got != want {
		t.Fatalf("stored %+v, want %+v", got, want)
	}
	jsonEqual(t, got.Context, ctxValue)

	// RawContext, an explicit metadata version and the writer's default environment.
	w := outbox.New(outbox.Options{Environment: "staging"})
	raw := `{"b": [1, 2.50, null], "a": {"nested": true}}`
	err = pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		id, err = w.Append(ctx, tx, outbox.Event{Type: "raw", Time: at, RawContext: json.RawMessage(raw), MetadataVersion: 3})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	got = readRow(t, pool, id)
	if got.Env != "staging" || got.Version != 3 {
		t.Fatalf("stored %+v, want environment staging and version 3", got)
	}
	if got.Context != `{"a": {"nested": true}, "b": [1, 2.50, null]}` {
		t.Fatalf("stored context %s", got.Context)
	}

	// No context at all is {}, the column default.
	err = pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		id, err = outbox.Append(ctx, tx, outbox.Event{Type: "bare", Time: at})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if got := readRow(t, pool, id); got.Context != "{}" {
		t.Fatalf("stored context %s, want {}", got.Context)
	}
}

// TestAppendRolledBack: an event appended in a transaction that rolls back
// leaves no row.
func TestAppendRolledBack(t *testing.T) {
	_, pool := newOutboxDB(t)
	ctx := context.Background()
	tx, err := pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := outbox.Append(ctx, tx, outbox.Event{Type: "x", Time: time.Now()}); err != nil {
		t.Fatal(err)
	}
	if _, err := outbox.AppendBatch(ctx, tx, []outbox.Event{{Type: "y", Time: time.Now()}}); err != nil {
		t.Fatal(err)
	}
	if err := tx.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	if n := count(t, pool); n != 0 {
		t.Fatalf("%d rows after rollback", n)
	}
}

func TestAppendDatabaseSQL(t *testing.T) {
	dsn, pool := newOutboxDB(t)
	ctx := context.Background()
	db, err := sql.Open("pgx", dsn) // driver registered by pgx/v5/stdlib
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	at := time.Date(2031, 1, 2, 3, 4, 5, 678901000, time.UTC)

	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	id, err := outbox.Append(ctx, outbox.SQL(tx), outbox.Event{Type: "sql.event", Time: at, Environment: "prod", Context: map[string]int{"n": 7}})
	if err != nil {
		t.Fatal(err)
	}
	// A validation error leaves the database/sql transaction usable too.
	if _, err := outbox.Append(ctx, outbox.SQL(tx), outbox.Event{Time: at}); !errors.Is(err, outbox.ErrEmptyType) {
		t.Fatalf("got %v, want ErrEmptyType", err)
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	got := readRow(t, pool, id)
	if got.Type != "sql.event" || got.Env != "prod" || !got.Time.Equal(at) || got.Context != `{"n": 7}` {
		t.Fatalf("stored %+v", got)
	}

	// A rolled-back database/sql transaction leaves nothing.
	tx, err = db.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := outbox.Append(ctx, outbox.SQL(tx), outbox.Event{Type: "gone", Time: at}); err != nil {
		t.Fatal(err)
	}
	if err := tx.Rollback(); err != nil {
		t.Fatal(err)
	}
	if n := count(t, pool); n != 1 {
		t.Fatalf("%d rows, want 1", n)
	}
}

// TestTimeIgnoresSessionTimeZone writes through sessions whose TimeZone is
// America/New_York — with pgx (extended and simple protocol), database/sql and
// COPY — and checks that the stored TIMESTAMP is the UTC time exactly.
func TestTimeIgnoresSessionTimeZone(t *testing.T) {
	dsn, pool := newOutboxDB(t)
	ctx := context.Background()
	// Nanoseconds are dropped: the column holds microseconds.
	at := time.Date(2025, 3, 9, 6, 59, 59, 999999999, time.FixedZone("UTC+5:30", 5*3600+1800))
	wantUTC := time.Date(2025, 3, 9, 1, 29, 59, 999999000, time.UTC)

	check := func(t *testing.T, id int64) {
		t.Helper()
		if got := readRow(t, pool, id); !got.Time.Equal(wantUTC) {
			t.Fatalf("stored %s, want %s", got.Time.Format(time.RFC3339Nano), wantUTC.Format(time.RFC3339Nano))
		}
	}
	ny := func(t *testing.T, mode pgx.QueryExecMode) *pgx.ConnConfig {
		t.Helper()
		cfg, err := pgx.ParseConfig(dsn)
		if err != nil {
			t.Fatal(err)
		}
		cfg.RuntimeParams["timezone"] = "America/New_York"
		cfg.DefaultQueryExecMode = mode
		return cfg
	}
	for _, mode := range []pgx.QueryExecMode{pgx.QueryExecModeCacheStatement, pgx.QueryExecModeExec, pgx.QueryExecModeSimpleProtocol} {
		t.Run("pgx/"+mode.String(), func(t *testing.T) {
			conn, err := pgx.ConnectConfig(ctx, ny(t, mode))
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close(ctx)
			var tz string
			if err := conn.QueryRow(ctx, "SHOW TimeZone").Scan(&tz); err != nil || tz != "America/New_York" {
				t.Fatalf("session TimeZone %q, %v", tz, err)
			}
			var id int64
			err = pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
				id, err = outbox.Append(ctx, tx, outbox.Event{Type: "tz", Time: at})
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
			check(t, id)
		})
	}
	t.Run("database/sql", func(t *testing.T) {
		db := stdlib.OpenDB(*ny(t, pgx.QueryExecModeCacheStatement))
		defer db.Close()
		tx, err := db.BeginTx(ctx, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer tx.Rollback() //nolint:errcheck
		if _, err := tx.ExecContext(ctx, "SET LOCAL TIME ZONE 'America/New_York'"); err != nil {
			t.Fatal(err)
		}
		id, err := outbox.Append(ctx, outbox.SQL(tx), outbox.Event{Type: "tz", Time: at})
		if err != nil {
			t.Fatal(err)
		}
		if err := tx.Commit(); err != nil {
			t.Fatal(err)
		}
		check(t, id)
	})
	t.Run("copy", func(t *testing.T) {
		conn, err := pgx.ConnectConfig(ctx, ny(t, pgx.QueryExecModeCacheStatement))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close(ctx)
		err = pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
			_, err := outbox.AppendBatch(ctx, tx, []outbox.Event{{Type: "tz.copy", Time: at}})
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		var id int64
		if err := pool.QueryRow(ctx, "SELECT id FROM event_outbox WHERE event_type = 'tz.copy'").Scan(&id); err != nil {
			t.Fatal(err)
		}
		check(t, id)
	})
}

func TestAppendBatchCopy100k(t *testing.T) {
	_, pool := newOutboxDB(t)
	ctx := context.Background()
	const n = 100000
	base := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	evs := make([]outbox.Event, n)
	for i := range evs {
		evs[i] = outbox.Event{
			Type:        fmt.Sprintf("type.%d", i%7),
			Time:        base.Add(time.Duration(i) * time.Microsecond),
			Environment: "bench",
			Context:     map[string]int{"i": i},
		}
	}
	began := time.Now()
	var written int64
	err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		var err error
		written, err = outbox.AppendBatch(ctx, tx, evs)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("AppendBatch of %d events committed in %s", n, time.Since(began).Round(time.Millisecond))
	if written != n {
		t.Fatalf("AppendBatch reported %d rows, want %d", written, n)
	}
	// Every row is there, with its own time and context.
	var rows, matching int64
	err = pool.QueryRow(ctx, `SELECT count(*),
		count(*) FILTER (WHERE event_date_time = $1::timestamp + ((event_context->>'i')::int * interval '1 microsecond')
		                   AND event_type = 'type.' || ((event_context->>'i')::int % 7)
		                   AND environment = 'bench' AND metadata_version = 1)
		FROM event_outbox`, base.Format("2006-01-02 15:04:05")).Scan(&rows, &matching)
	if err != nil {
		t.Fatal(err)
	}
	if rows != n || matching != n {
		t.Fatalf("%d rows, %d matching, want %d", rows, matching, n)
	}
}

// TestValidationBoundaries: values at the limits are accepted, and PostgreSQL
// and ClickHouse's range agree.
func TestValidationBoundaries(t *testing.T) {
	_, pool := newOutboxDB(t)
	ctx := context.Background()
	modernMin, modernMax := outbox.TimeRange(false)
	legacyMin, legacyMax := outbox.TimeRange(true)
	for _, legacy := range []bool{false, true} {
		smin, smax := sink.TimeRange(legacy)
		omin, omax := outbox.TimeRange(legacy)
		if !smin.Equal(omin) || !smax.Equal(omax) {
			t.Fatalf("legacy=%v: outbox.TimeRange %s..%s differs from sink.TimeRange %s..%s", legacy, omin, omax, smin, smax)
		}
	}
	// A context of exactly the limit as printed: {"pad": "xxx..."} is 11
	// bytes plus the padding.
	const limit = 1000
	exact := map[string]string{"pad": strings.Repeat("x", limit-11)}
	cases := []struct {
		opts outbox.Options
		ev   outbox.Event
	}{
		{ev: outbox.Event{Type: strings.Repeat("é", outbox.MaxTypeLength), Time: modernMin, Environment: strings.Repeat("ü", outbox.MaxEnvironmentLength)}},
		// Nanoseconds past the maximum are truncated away, as the column does.
		{ev: outbox.Event{Type: "max", Time: modernMax.Add(999 * time.Nanosecond)}},
		{opts: outbox.Options{LegacyClickHouse: true}, ev: outbox.Event{Type: "legacy", Time: legacyMin}},
		{opts: outbox.Options{LegacyClickHouse: true}, ev: outbox.Event{Type: "legacy", Time: legacyMax}},
		{opts: outbox.Options{MaxContextBytes: limit}, ev: outbox.Event{Type: "exact", Time: time.Now(), Context: exact}},
	}
	for i, c := range cases {
		w := outbox.New(c.opts)
		var id int64
		err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
			var err error
			id, err = w.Append(ctx, tx, c.ev)
			return err
		})
		if err != nil {
			t.Fatalf("case %d: %v", i, err)
		}
		got := readRow(t, pool, id)
		if wantT := c.ev.Time.UTC().Truncate(time.Microsecond); !got.Time.Equal(wantT) {
			t.Fatalf("case %d: stored %s, want %s", i, got.Time, wantT)
		}
		if c.opts.MaxContextBytes == limit && len(got.Context) != limit {
			t.Fatalf("case %d: context printed as %d bytes, want %d", i, len(got.Context), limit)
		}
	}
	// One byte more is refused.
	exact["pad"] += "x"
	if err := outbox.New(outbox.Options{MaxContextBytes: limit}).Validate(outbox.Event{Type: "over", Time: time.Now(), Context: exact}); !errors.Is(err, outbox.ErrContextTooLarge) {
		t.Fatalf("got %v, want ErrContextTooLarge", err)
	}
}

// TestValidationErrorLeavesTransactionUsable: a refused event, through Append
// or in the middle of an AppendBatch, sends nothing, so the transaction goes
// on and commits the valid events.
func TestValidationErrorLeavesTransactionUsable(t *testing.T) {
	_, pool := newOutboxDB(t)
	ctx := context.Background()
	ok := outbox.Event{Type: "ok", Time: time.Now()}
	bad := []outbox.Event{
		{Time: time.Now()},
		{Type: "x", Time: time.Date(1800, 1, 1, 0, 0, 0, 0, time.UTC)},
		{Type: "x", Time: time.Now(), RawContext: json.RawMessage(`{"a":"x\u0000"}`)},
		{Type: "x", Time: time.Now(), Context: map[string]string{"pad": strings.Repeat("x", outbox.DefaultMaxContextBytes)}},
	}
	for i, ev := range bad {
		tx, err := pool.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var ve *outbox.ValidationError
		if _, err := outbox.Append(ctx, tx, ev); !errors.As(err, &ve) {
			t.Fatalf("event %d: Append returned %v, want a *ValidationError", i, err)
		}
		if _, err := outbox.AppendBatch(ctx, tx, []outbox.Event{ok, ok, ev, ok}); !errors.As(err, &ve) || ve.Index != 2 {
			t.Fatalf("event %d: AppendBatch returned %v, want a *ValidationError for index 2", i, err)
		}
		if _, err := outbox.Append(ctx, tx, ok); err != nil {
			t.Fatalf("event %d: transaction unusable after a validation error: %v", i, err)
		}
		var n int64
		if err := tx.QueryRow(ctx, "SELECT count(*) FROM event_outbox").Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n != 1 {
			t.Fatalf("event %d: %d rows in the transaction, want only the valid one", i, n)
		}
		if err := tx.Rollback(ctx); err != nil {
			t.Fatal(err)
		}
	}
}

// TestTableOption writes with Append and AppendBatch into outbox tables
// other than public.event_outbox: schema-qualified, and with names that only
// work quoted (mixed case, a space, a double quote, a keyword).
func TestTableOption(t *testing.T) {
	_, pool := newOutboxDB(t)
	ctx := context.Background()
	tables := []pgx.Identifier{
		{"app", "event_outbox"},
		{`Odd "Schema"`, "Mixed Case"},
		{"order"},
	}
	for _, ident := range tables {
		name := strings.Join(ident, ".")
		t.Run(name, func(t *testing.T) {
			if len(ident) == 2 {
				if _, err := pool.Exec(ctx, "CREATE SCHEMA "+pgx.Identifier{ident[0]}.Sanitize()); err != nil {
					t.Fatal(err)
				}
			}
			// The migrated table's columns and defaults, under another name.
			if _, err := pool.Exec(ctx, "CREATE TABLE "+ident.Sanitize()+" (LIKE public.event_outbox INCLUDING DEFAULTS)"); err != nil {
				t.Fatal(err)
			}
			w := outbox.New(outbox.Options{Table: name})
			if err := (outbox.Options{Table: name}).Validate(); err != nil {
				t.Fatal(err)
			}
			at := time.Date(2024, 7, 14, 21, 30, 15, 123456000, time.UTC)
			before := count(t, pool)
			err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
				if _, err := w.Append(ctx, tx, outbox.Event{Type: "one", Time: at, Context: map[string]int{"n": 1}}); err != nil {
					return err
				}
				_, err := w.AppendBatch(ctx, tx, []outbox.Event{{Type: "copy", Time: at}, {Type: "copy", Time: at}})
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
			var n, matching int64
			err = pool.QueryRow(ctx, `SELECT count(*), count(*) FILTER (WHERE event_date_time = $1::timestamp AND status = 'pending')
				FROM `+ident.Sanitize(), at.Format("2006-01-02 15:04:05.999999")).Scan(&n, &matching)
			if err != nil {
				t.Fatal(err)
			}
			if n != 3 || matching != 3 {
				t.Fatalf("%s holds %d rows, %d as written, want 3", ident.Sanitize(), n, matching)
			}
			if after := count(t, pool); after != before {
				t.Fatalf("public.event_outbox went from %d to %d rows", before, after)
			}
		})
	}

	// A table that does not exist fails with the database's error, naming it.
	w := outbox.New(outbox.Options{Table: "app.missing"})
	err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		_, err := w.Append(ctx, tx, outbox.Event{Type: "x", Time: time.Now()})
		return err
	})
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "42P01" || !strings.Contains(err.Error(), "app.missing") {
		t.Fatalf("got %v, want undefined_table naming app.missing", err)
	}
}

// TestInsertSQLByHand runs the exported statement the way its documentation
// tells sqlc and hand-written SQL users to, through database/sql on a session
// whose TimeZone is not UTC, and finds the row Append would have written.
func TestInsertSQLByHand(t *testing.T) {
	dsn, pool := newOutboxDB(t)
	ctx := context.Background()
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		t.Fatal(err)
	}
	cfg.RuntimeParams["timezone"] = "America/New_York"
	db := stdlib.OpenDB(*cfg)
	defer db.Close()

	at := time.Date(2025, 3, 9, 6, 59, 59, 999999999, time.FixedZone("UTC+5:30", 5*3600+1800))
	ev := outbox.Event{Type: "by.hand", Time: at, Environment: "prod", RawContext: json.RawMessage(`{"n": 7}`), MetadataVersion: 2}
	if err := outbox.Validate(ev); err != nil {
		t.Fatal(err)
	}
	var byHand int64
	err = db.QueryRowContext(ctx, outbox.InsertSQL,
		ev.Type, ev.Time.UTC().Format("2006-01-02 15:04:05.999999"), ev.Environment, string(ev.RawContext), "2").Scan(&byHand)
	if err != nil {
		t.Fatal(err)
	}
	var byAppend int64
	err = pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		byAppend, err = outbox.Append(ctx, tx, ev)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	got, want := readRow(t, pool, byHand), readRow(t, pool, byAppend)
	if got != want {
		t.Fatalf("InsertSQL by hand stored %+v, Append %+v", got, want)
	}
	if wantUTC := time.Date(2025, 3, 9, 1, 29, 59, 999999000, time.UTC); !got.Time.Equal(wantUTC) {
		t.Fatalf("stored %s, want %s", got.Time.Format(time.RFC3339Nano), wantUTC.Format(time.RFC3339Nano))
	}
}
