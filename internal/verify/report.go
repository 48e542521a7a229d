package verify

import "time"

// Bucket statuses.
const (
	// StatusMatch: the checksums are equal.
	StatusMatch = "match"
	// StatusExplained: the checksums differ, and the ids show why without a
	// discrepancy (rows in flight, rows pruned from the outbox).
	StatusExplained = "explained"
	// StatusDiffers: rows are missing, duplicated, or in ClickHouse only.
	StatusDiffers = "differs"
)

// Report is the result of one verification.
type Report struct {
	// From and Until are the compared created_at range, aligned to buckets.
	From          time.Time `json:"from"`
	Until         time.Time `json:"until"`
	BucketSeconds int64     `json:"bucket_seconds"`
	// OutboxTable is the outbox table (OUTBOX_TABLE).
	OutboxTable string `json:"outbox_table"`
	// Column is the column buckets are cut by (created_at).
	Column   string `json:"column"`
	TimeZone string `json:"time_zone"`
	// Table is ClickHouse's event table (quoted database.table).
	Table string `json:"clickhouse_table"`
	// RetentionHorizon is now - OUTBOX_RETENTION: ClickHouse-only rows
	// created before it count as pruned (see PruneRule); absent without
	// retention.
	RetentionHorizon *time.Time `json:"retention_horizon,omitempty"`
	// OldestProcessedID is the lowest processed id the outbox holds (0:
	// none): ClickHouse-only ids below it count as pruned.
	OldestProcessedID int64 `json:"oldest_processed_id"`
	// Match is true when no bucket differs.
	Match bool `json:"match"`
	// Buckets are those with rows on either side, in time order.
	Buckets []Bucket `json:"buckets"`
	Totals  Totals   `json:"totals"`
	// Notes say what was not compared and why.
	Notes []string `json:"notes,omitempty"`
	Cost  Cost     `json:"cost"`
	// Repair is what --repair did.
	Repair *RepairResult `json:"repair,omitempty"`

	// missing are all ids missing in ClickHouse (the lists are capped).
	missing []int64
}

// Bucket is one bucket's comparison.
type Bucket struct {
	Start time.Time `json:"start"`
	End   time.Time `json:"end"`
	// Outbox counts the processed outbox rows (the ones ClickHouse must
	// hold), ClickHouse its rows (duplicates included).
	Outbox     uint64 `json:"outbox_processed"`
	ClickHouse uint64 `json:"clickhouse_rows"`
	// Not yet delivered: outbox rows by status (not a discrepancy).
	Pending int64  `json:"pending"`
	Failed  int64  `json:"failed"`
	Dead    int64  `json:"dead"`
	Status  string `json:"status"`

	OutboxChecksum     Checksum `json:"outbox_checksum"`
	ClickHouseChecksum Checksum `json:"clickhouse_checksum"`

	// The id-level comparison, made for buckets whose checksums differ.
	IDsCompared bool `json:"ids_compared"`
	// Missing: processed in the outbox, in ClickHouse under no created_at.
	Missing *IDList `json:"missing,omitempty"`
	// Duplicates: more than one row in ClickHouse.
	Duplicates *DuplicateList `json:"duplicates,omitempty"`
	// NotInOutbox: in ClickHouse, and neither in the outbox nor pruned
	// from it.
	NotInOutbox *IDList `json:"not_in_outbox,omitempty"`
	// CreatedAtDiffers: in both, but ClickHouse's created_at puts the row
	// in another bucket than the outbox's does (EVENT_TIME_ZONE changed
	// since delivery, or created_at was updated in the outbox).
	CreatedAtDiffers *MovedList `json:"created_at_differs,omitempty"`
	// InFlight: in ClickHouse while the outbox row is not processed yet.
	InFlight int64 `json:"in_flight,omitempty"`
	// PrunedRows: ClickHouse rows of events that retention removed from
	// the outbox (see PruneRule): out of scope.
	PrunedRows uint64 `json:"pruned_rows,omitempty"`
	// TooLarge: the checksums differ, but the bucket holds over MaxIDRows
	// rows and its ids were not compared.
	TooLarge bool `json:"too_large_to_compare,omitempty"`
	// OutsideWindow: rows found by id that the id window of the scan missed
	// (a transaction inserted them over VerifySlack after it began).
	OutsideWindow int64 `json:"outside_id_window,omitempty"`
}

// CappedList counts every item added and keeps the first ones, up to a cap.
type CappedList[T any] struct {
	Count     int64 `json:"count"`
	IDs       []T   `json:"ids"`
	Truncated bool  `json:"truncated,omitempty"`
}

// add counts v and keeps it while the list holds fewer than max.
func (l *CappedList[T]) add(v T, max int) {
	l.Count++
	if len(l.IDs) < max {
		l.IDs = append(l.IDs, v)
	} else {
		l.Truncated = true
	}
}

// IDList is a capped list of ids.
type IDList = CappedList[int64]

// DuplicateList is a capped list of duplicates.
type DuplicateList = CappedList[Duplicate]

// Moved is a row whose created_at differs between the databases.
type Moved struct {
	ID                  int64     `json:"id"`
	OutboxCreatedAt     time.Time `json:"outbox_created_at"`
	ClickHouseCreatedAt time.Time `json:"clickhouse_created_at"`
}

// MovedList is a capped list of moved rows.
type MovedList = CappedList[Moved]

// Totals add up the buckets.
type Totals struct {
	Buckets          int    `json:"buckets"`
	Differing        int    `json:"differing"`
	Outbox           uint64 `json:"outbox_processed"`
	ClickHouse       uint64 `json:"clickhouse_rows"`
	Pending          int64  `json:"pending"`
	Failed           int64  `json:"failed"`
	Dead             int64  `json:"dead"`
	Missing          int64  `json:"missing"`
	Duplicates       int64  `json:"duplicates"`
	NotInOutbox      int64  `json:"not_in_outbox"`
	CreatedAtDiffers int64  `json:"created_at_differs"`
	InFlight         int64  `json:"in_flight"`
	PrunedRows       uint64 `json:"pruned_rows"`
	OutsideWindow    int64  `json:"outside_id_window"`
}

// Cost is what the run read.
type Cost struct {
	OutboxStatements int     `json:"outbox_statements"`
	OutboxRows       int64   `json:"outbox_rows_read"`
	OutboxProbes     int     `json:"outbox_id_probes"`
	ClickHouseQuery  int     `json:"clickhouse_queries"`
	ClickHouseRows   uint64  `json:"clickhouse_rows_read"`
	ClickHouseBytes  uint64  `json:"clickhouse_bytes_read"`
	Seconds          float64 `json:"seconds"`
}

// RepairResult is what --repair did.
type RepairResult struct {
	// Requeued are the missing rows handed to the sweep (failed, due now).
	Requeued IDList `json:"requeued"`
	// Skipped are missing rows no longer processed when the repair ran
	// (pruned, or requeued by someone else): left alone.
	Skipped IDList `json:"skipped"`
	// DuplicatesLeft counts the duplicates reported and not touched.
	DuplicatesLeft int64 `json:"duplicates_left_alone"`
}
