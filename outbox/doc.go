// Package outbox writes events into the transactional outbox that
// outbox-streamer delivers to ClickHouse.
//
// It is the project's public API: the one package meant to be imported by
// other modules (the services that produce events). Everything else is the
// streamer's own, under internal/ or behind its command line.
//
// # The module
//
// The package is a module of its own, so that a producer does not inherit
// the streamer's Go version or dependencies:
//
//	go get github.com/outbox-streamer/outbox-streamer/outbox
//
// It declares go 1.23.0 and requires only pgx (github.com/jackc/pgx/v5,
// v5.7.6 or newer). The pgx version is a minimum: a service that requires a
// newer pgx, such as v5.12.0 with its security fixes, builds with that one.
// Releases are tagged outbox/vX.Y.Z.
//
// # The pattern
//
// A service that changes its database and must also tell the world about the
// change cannot do both atomically if "telling" means a message broker or an
// HTTP call: one can succeed and the other fail. With a transactional outbox
// the event is just another row, inserted into the table event_outbox in the
// same transaction as the business change. Both commit or neither does.
// outbox-streamer then reads committed inserts from the write-ahead log
// (logical replication) and delivers each to ClickHouse once; an event written
// in a transaction that rolls back is never seen.
//
//	tx, err := pool.Begin(ctx)
//	if err != nil { ... }
//	defer tx.Rollback(ctx)
//	if _, err := tx.Exec(ctx, "UPDATE orders SET paid = true WHERE id = $1", orderID); err != nil { ... }
//	if _, err := outbox.Append(ctx, tx, outbox.Event{
//		Type:    "order.paid",
//		Time:    time.Now(),
//		Context: map[string]any{"order_id": orderID},
//	}); err != nil { ... }
//	return tx.Commit(ctx)
//
// Append takes a Querier: a pgx.Tx, or a database/sql *sql.Tx wrapped with
// SQL. For many events at once, AppendBatch writes them with COPY through a
// CopyFromer, such as a pgx.Tx (pgx only).
//
// # The table
//
// Events go to event_outbox, found through the session's search_path, or to
// the table named by Options.Table, such as "public.event_outbox" (it must be
// the table the streamer reads). Code that
// writes events with its own SQL (sqlc, hand-written queries) can execute
// InsertSQL, or InsertStatement for another table: the statement Append
// executes, whose documentation gives the parameters.
//
// # Validation
//
// Every event is checked before anything is sent, so that a bad event fails
// the producer's call — where the caller can still react — instead of being
// committed and then failed by the streamer long after. A failure is a
// *ValidationError matching one of the Err* sentinels with errors.Is, and the
// transaction stays usable. The rules:
//
//   - Type is set and at most MaxTypeLength characters; Environment at most
//     MaxEnvironmentLength characters; both valid UTF-8 without NUL bytes.
//   - Time is set and within TimeRange: what ClickHouse's DateTime64(6) holds,
//     1900-01-01 to 2262-04-11, or with Options.LegacyClickHouse what the
//     legacy DateTime holds, 1970-01-01 to 2106-02-07.
//   - The context is JSON that PostgreSQL's jsonb accepts (no \u0000, no
//     unpaired surrogate escapes, numbers within numeric's range) and, as
//     PostgreSQL prints it, at most Options.MaxContextBytes (default 1 MiB,
//     like the streamer's EVENT_MAX_CONTEXT_BYTES).
//
// # Times
//
// The outbox's time columns are TIMESTAMP without time zone and hold UTC.
// Append converts Event.Time to UTC and passes it so that neither the
// session's TimeZone setting nor the driver can shift it, truncated to the
// microsecond, the column's precision. Any other producer must do the same:
// store UTC, for example now() AT TIME ZONE 'UTC' in SQL.
package outbox
