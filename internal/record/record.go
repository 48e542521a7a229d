// Package record defines the event row that flows through the pipeline, from the
// pgoutput decoder (or the sweep's SELECT) to the ClickHouse sink.
package record

import "time"

// Event is one row of event_outbox as the pipeline carries it.
//
// Context holds the JSON text exactly as PostgreSQL rendered it: the pipeline never
// re-parses or re-encodes it, so what lands in ClickHouse is what the producer wrote.
type Event struct {
	ID              int64
	Type            string
	Time            time.Time
	Environment     string
	Context         string
	MetadataVersion int64
	CreatedAt       time.Time

	// CommitLSN is the LSN of the commit record of the transaction that inserted the
	// row (pgoutput's Begin.FinalLSN); zero for rows delivered by the sweep.
	CommitLSN uint64
	// CommitTime is when that transaction committed, for end-to-end latency.
	CommitTime time.Time
	// Xid is the (32-bit) id of that transaction, from pgoutput's Begin; zero
	// for rows delivered by the sweep. It tells a row that is not visible yet
	// from one that was deleted (see outboxstore).
	Xid uint32

	// Problem, when not empty, says why the row cannot be delivered as decoded (a NULL in
	// a required column, a value that does not parse). Such rows are marked failed with
	// this reason instead of being sent to ClickHouse.
	Problem string
}

// fixedSize is the bytes of the row's fixed-width columns in a ClickHouse insert:
// event_id, event_date_time, metadata_version, created_at and commit_lsn, 8 bytes
// each (DateTime64; the legacy DateTime is 4, so legacy rows are overestimated).
const fixedSize = 5 * 8

// Size estimates the bytes the row takes in a ClickHouse insert (native format,
// before compression): the three string columns' lengths, their length prefixes
// (counted as one byte each) and the fixed-width columns. Batches are bounded by
// it, so it is cheap (no allocation, no encoding) rather than exact.
func (e Event) Size() int {
	return fixedSize + len(e.Type) + 1 + len(e.Environment) + 1 + len(e.Context) + 1
}
