package outbox_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-streamer/outbox-streamer/outbox"
)

// The event is written in the same transaction as the change it reports: if
// the transaction rolls back, the event is gone too.
func Example() {
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, "postgres://app@localhost/app")
	if err != nil {
		panic(err)
	}
	defer pool.Close()

	orderID := 42
	err = pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "UPDATE orders SET status = 'paid' WHERE id = $1", orderID); err != nil {
			return err
		}
		_, err := outbox.Append(ctx, tx, outbox.Event{
			Type:        "order.paid",
			Time:        time.Now(),
			Environment: "prod",
			Context:     map[string]any{"order_id": orderID, "amount": "12.50"},
		})
		return err
	})
	if err != nil {
		panic(err)
	}
}

// Validation happens before anything is sent, and the errors say which rule
// an event broke. This example needs no database, so its output is checked.
func ExampleValidationError() {
	w := outbox.New(outbox.Options{MaxContextBytes: 64})
	err := w.Validate(outbox.Event{
		Type:       "report.generated",
		Time:       time.Now(),
		RawContext: []byte(`{"rows": 1e60}`), // 14 bytes here, 71 once PostgreSQL prints it
	})
	fmt.Println(errors.Is(err, outbox.ErrContextTooLarge))

	// The batch fails validation before the transaction is used, so this
	// example needs none.
	_, err = outbox.AppendBatch(context.Background(), nil, []outbox.Event{
		{Type: "ok", Time: time.Now()},
		{Type: "", Time: time.Now()},
	})
	var ve *outbox.ValidationError
	if errors.As(err, &ve) {
		fmt.Println(ve.Index, ve.Field, errors.Is(err, outbox.ErrEmptyType))
	}
	fmt.Println(err)
	// Output:
	// true
	// 1 Type true
	// outbox: event 1: event type is empty
}

// With database/sql, wrap the *sql.Tx with outbox.SQL.
func ExampleSQL() {
	ctx := context.Background()
	db, err := sql.Open("pgx", "postgres://app@localhost/app") // or "postgres" with lib/pq
	if err != nil {
		panic(err)
	}
	defer db.Close()

	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		panic(err)
	}
	defer tx.Rollback() //nolint:errcheck // after Commit it is a no-op

	id, err := outbox.Append(ctx, outbox.SQL(tx), outbox.Event{
		Type:    "user.signed_in",
		Time:    time.Now(),
		Context: map[string]any{"user_id": 7},
	})
	if err != nil {
		panic(err)
	}
	if err := tx.Commit(); err != nil {
		panic(err)
	}
	fmt.Println("event", id)
}

// AppendBatch writes many events with one COPY; it returns the row count, not
// the ids.
func ExampleWriter_AppendBatch() {
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, "postgres://app@localhost/app")
	if err != nil {
		panic(err)
	}
	defer pool.Close()

	w := outbox.New(outbox.Options{Environment: "prod"})
	evs := make([]outbox.Event, 0, 1000)
	for i := range 1000 {
		evs = append(evs, outbox.Event{Type: "import.row", Time: time.Now(), Context: map[string]int{"row": i}})
	}
	err = pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		n, err := w.AppendBatch(ctx, tx, evs)
		if err != nil {
			return err
		}
		fmt.Println("wrote", n, "events")
		return nil
	})
	if err != nil {
		panic(err)
	}
}

// A writer for an outbox table of your own, checked at startup. Each part of
// the name is quoted, so give it as PostgreSQL stores it.
func ExampleOptions_Validate() {
	opts := outbox.Options{Table: "app.event_outbox", Environment: "prod"}
	if err := opts.Validate(); err != nil {
		panic(err)
	}
	w := outbox.New(opts)

	ctx := context.Background()
	conn, err := pgx.Connect(ctx, "postgres://app@localhost/app")
	if err != nil {
		panic(err)
	}
	defer conn.Close(ctx)
	err = pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		_, err := w.Append(ctx, tx, outbox.Event{Type: "user.created", Time: time.Now()})
		return err
	})
	if err != nil {
		panic(err)
	}
}

// For sqlc or hand-written SQL: the statement Append executes, here for a
// table in schema app. InsertSQL is the one for event_outbox.
func ExampleInsertStatement() {
	stmt, err := outbox.InsertStatement("app.event_outbox")
	if err != nil {
		panic(err)
	}
	fmt.Println(stmt)
	// Output:
	// INSERT INTO "app"."event_outbox" (event_type, event_date_time, environment, event_context, metadata_version)
	// VALUES ($1::text, $2::text::timestamp, $3::text, $4::text::jsonb, $5::text::bigint)
	// RETURNING id
}
