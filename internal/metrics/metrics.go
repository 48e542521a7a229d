// Package metrics holds the streamer's Prometheus metrics, the poller that reads the
// replication slot's and the outbox's state from PostgreSQL, and the HTTP server that
// exposes /metrics, /healthz and /readyz.
//
// Every metric lives on a registry of its own (with the Go runtime and process
// collectors), so nothing a library registers on the global default registry leaks
// into the endpoint. Names follow Prometheus conventions: prefix outbox_streamer_, base
// units (seconds, bytes), _total on counters.
//
// All methods of *Metrics accept a nil receiver and then do nothing, so code paths and
// tests without metrics need no checks.
package metrics

import (
	"maps"
	"runtime"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	dto "github.com/prometheus/client_model/go"

	"github.com/outbox-streamer/outbox-streamer/internal/record"
)

// Namespace is the prefix of every metric of the streamer.
const Namespace = "outbox_streamer"

// Stages for AddError. They are fixed label values: an unknown stage is counted as
// StageOther so that a typo cannot create unbounded series.
const (
	StageReplication  = "replication"       // receive loop, replication connection
	StageDecode       = "decode"            // pgoutput messages the decoder rejected
	StageInsert       = "clickhouse_insert" // ClickHouse inserts and in-doubt lookups
	StageStatusUpdate = "status_update"     // marking outbox rows processed/failed
	StageCheckpoint   = "checkpoint"        // in-flight record, acknowledgements
	StageSweep        = "sweep"             // the fallback sweep
	StageLeader       = "leader"            // the leader lock
	StagePoller       = "slot_poller"       // the SlotPoller's queries
	StageStandby      = "standby"           // reading a standby's position (STANDBY_HOLD, synchronized_standby_slots)
	StageOther        = "other"             // anything else
)

// Stages lists every value AddError records, in a stable order.
var Stages = []string{StageReplication, StageDecode, StageInsert, StageStatusUpdate,
	StageCheckpoint, StageSweep, StageLeader, StagePoller, StageStandby, StageOther}

// Statuses are the outbox row statuses, the values of the status label of outbox_rows.
var Statuses = []string{"pending", "processed", "failed", "dead"}

// SweepResults are the values of the result label of sweep_rows_total.
var SweepResults = []string{"delivered", "failed", "dead"}

// WALStatuses are the values of pg_replication_slots.wal_status (PostgreSQL 13+),
// the status label of slot_wal_status, from healthy to invalidated: reserved (the
// WAL is within max_wal_size), extended (beyond it, still kept for the slot),
// unreserved (beyond max_slot_wal_keep_size: removed at the next checkpoint unless
// the slot catches up) and lost (removed: the slot is invalidated).
var WALStatuses = []string{"reserved", "extended", "unreserved", "lost"}

// Metrics is the set of the streamer's metrics. Create it with New; a nil *Metrics is
// a valid no-op.
type Metrics struct {
	reg *prometheus.Registry

	rowsReceived       prometheus.Counter
	rowsDelivered      prometheus.Counter
	rowsFailed         prometheus.Counter
	rowsDead           prometheus.Counter
	rowsAlreadyPresent prometheus.Counter
	rowsVanished       prometheus.Counter
	rowsPruned         prometheus.Counter
	batches            prometheus.Counter
	sweepRuns          prometheus.Counter
	sweepRows          *prometheus.CounterVec
	errors             *prometheus.CounterVec

	batchRows       prometheus.Histogram
	insertDuration  prometheus.Histogram
	statusDuration  prometheus.Histogram
	commitToCHDelay prometheus.Histogram
	pruneDuration   prometheus.Histogram

	ackedLSN           prometheus.Gauge
	slotLag            *prometheus.GaugeVec
	slotRetained       *prometheus.GaugeVec
	slotSafeWAL        *prometheus.GaugeVec
	slotFailover       *prometheus.GaugeVec
	slotConflicting    *prometheus.GaugeVec
	slotFailoverWanted *prometheus.GaugeVec
	slotActive         *prometheus.GaugeVec
	slotWALStatus      *prometheus.GaugeVec
	walPosition        *prometheus.GaugeVec
	walKeepSize        *prometheus.GaugeVec
	buildInfo          *prometheus.GaugeVec
	outboxRows         *prometheus.GaugeVec
	oldestUndelivered  prometheus.Gauge
	leader             prometheus.Gauge
	lastBatchTimestamp prometheus.Gauge
	up                 prometheus.Gauge
	oldestRowAge       prometheus.Gauge

	// The last periodic verification (VERIFY_INTERVAL); vectors so that they
	// are absent until the first one finished.
	verifyRuns     *prometheus.CounterVec
	verifyMatch    *prometheus.GaugeVec
	verifyRows     *prometheus.GaugeVec
	verifyLastRun  *prometheus.GaugeVec
	verifyInterval prometheus.Gauge

	// Waiting for a standby: STANDBY_HOLD's, and the walsender's for
	// synchronized_standby_slots (17+); absent when neither applies.
	standbyHoldWaiting  *prometheus.GaugeVec
	standbyHoldBehind   *prometheus.GaugeVec
	standbyConfirmation *prometheus.GaugeVec

	// The backfill of a new slot; absent until one finished.
	backfillRows *prometheus.GaugeVec
	backfillDone *prometheus.GaugeVec

	stages map[string]prometheus.Counter

	// seen holds the values Snapshot reports, as the setters last set them:
	// read back from the gauges, a series that was removed (an unknown lag)
	// would be created again at zero.
	seenMu sync.Mutex
	seen   Snapshot
}

// New returns the metrics registered on a new registry together with the Go runtime
// and process collectors. Every labelled series with a fixed label set (statuses,
// sweep results, error stages) is created at zero so that rate() and alerts see it
// before the first event.
func New() *Metrics {
	reg := prometheus.NewRegistry()
	reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	f := factory{reg}
	m := &Metrics{reg: reg}

	m.rowsReceived = f.counter("rows_received_total", "Outbox rows decoded from the replication stream.")
	m.rowsDelivered = f.counter("rows_delivered_total", "Rows this process inserted into ClickHouse (streamed and swept).")
	m.rowsFailed = f.counter("rows_failed_total", "Rows marked failed (to be retried by the sweep).")
	m.rowsDead = f.counter("rows_dead_total", "Rows that became dead letters after their last allowed attempt.")
	m.rowsVanished = f.counter("rows_vanished_total",
		"Streamed rows that no longer existed in the outbox when their status was to be set (deleted in or after their transaction); settled, not waited for.")
	m.rowsPruned = f.counter("rows_pruned_total", "Processed outbox rows removed by retention (OUTBOX_RETENTION).")
	m.rowsAlreadyPresent = f.counter("rows_already_present_total",
		"Rows of an in-doubt batch that ClickHouse already held after a restart, so they were not inserted again.")
	m.batches = f.counter("batches_total", "Batches written to ClickHouse.")
	m.sweepRuns = f.counter("sweep_runs_total", "Runs of the fallback sweep.")
	m.sweepRows = f.counterVec("sweep_rows_total", "Rows handled by the fallback sweep, by result.", "result")
	m.errors = f.counterVec("errors_total", "Errors by pipeline stage (retried ones included).", "stage")

	m.batchRows = f.histogram("batch_rows", "Rows per batch inserted into ClickHouse.",
		[]float64{1, 5, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 50000})
	m.insertDuration = f.histogram("clickhouse_insert_duration_seconds", "Duration of one ClickHouse insert.",
		[]float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30})
	m.statusDuration = f.histogram("status_update_duration_seconds",
		"Duration of one update of outbox rows' status in PostgreSQL.",
		[]float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10})
	// From 5 ms (a fast path on one host) to 60 s (batch timeout plus a slow insert
	// plus retries): beyond that the number is an outage, which the lag gauges show.
	m.commitToCHDelay = f.histogram("commit_to_clickhouse_latency_seconds",
		"Time from the commit of a row's PostgreSQL transaction to ClickHouse accepting the row.",
		[]float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 20, 30, 60})

	m.pruneDuration = f.histogram("prune_duration_seconds", "Duration of one retention pass over the outbox.",
		[]float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300})
	m.verifyRuns = f.counterVec("verify_runs_total", "Periodic verifications (VERIFY_INTERVAL) by result: match, differ or error.", "result")
	for _, r := range []string{"match", "differ", "error"} {
		m.verifyRuns.WithLabelValues(r)
	}
	m.verifyMatch = f.gaugeVec("verify_match",
		"1 when the last periodic verification found ClickHouse holding every processed outbox row of its window once, 0 when it did not; absent before the first.", "window")
	m.verifyRows = f.gaugeVec("verify_rows",
		"Rows the last periodic verification found wrong, by kind: missing (processed in the outbox, not in ClickHouse), duplicated, not_in_outbox.", "kind")
	m.verifyLastRun = f.gaugeVec("verify_last_run_timestamp_seconds",
		"When the last periodic verification finished (Unix time), by result (match or differ).", "result")
	m.verifyInterval = f.gauge("verify_interval_seconds", "VERIFY_INTERVAL (0: periodic verification is off).")
	m.backfillRows = f.gaugeVec("backfill_rows",
		"Rows the backfill of a new replication slot delivered (those committed before the slot); absent until a backfill finished.")
	m.backfillDone = f.gaugeVec("backfill_completed_timestamp_seconds",
		"When the backfill of a new replication slot delivered its last row (Unix time); absent until one finished.")
	m.oldestRowAge = f.gauge("oldest_row_age_seconds",
		"Age (by created_at) of the oldest row the outbox still holds, whatever its status, as of the last retention pass (0 when empty).")
	m.ackedLSN = f.gauge("acknowledged_lsn",
		"The LSN last confirmed to PostgreSQL as flushed, as a number (exact below 2^53 bytes of WAL).")
	m.slotLag = f.gaugeVec("slot_lag_bytes", "Current WAL position minus the slot's confirmed_flush_lsn.", "slot")
	m.slotRetained = f.gaugeVec("slot_retained_wal_bytes", "WAL the slot keeps on disk: current WAL position minus its restart_lsn.", "slot")
	m.slotSafeWAL = f.gaugeVec("slot_safe_wal_size_bytes",
		"Bytes of WAL that can still be written before the slot risks invalidation (pg_replication_slots.safe_wal_size); absent when max_slot_wal_keep_size is unlimited.", "slot")
	m.slotFailover = f.gaugeVec("slot_failover",
		"1 when the slot is a failover slot that PostgreSQL synchronises to standbys with sync_replication_slots (pg_replication_slots.failover), 0 when not; absent before PostgreSQL 17.", "slot")
	m.slotConflicting = f.gaugeVec("slot_conflicting",
		"1 when the slot was invalidated by a conflict with recovery (pg_replication_slots.conflicting), 0 when not; absent before PostgreSQL 16.", "slot")
	m.slotFailoverWanted = f.gaugeVec("slot_failover_wanted",
		"1 when the streamer wants its slot to be a failover slot (REPLICATION_SLOT_FAILOVER=on, or auto while synchronized_standby_slots is set on the primary), 0 when not; absent before PostgreSQL 17. Compare with slot_failover.", "slot")
	m.standbyHoldWaiting = f.gaugeVec("standby_hold_waiting",
		"1 while delivery has waited 5 s or longer for the standby named by STANDBY_HOLD to flush a commit, 0 when not; absent when STANDBY_HOLD is empty.", "standby")
	m.standbyHoldBehind = f.gaugeVec("standby_hold_behind_bytes",
		"The primary's WAL insert position minus what the standby named by STANDBY_HOLD has flushed, at the last read; absent when unknown.", "standby")
	m.standbyConfirmation = f.gaugeVec("standby_confirmation_waiting",
		"1 while the slot's walsender is held back by a standby of synchronized_standby_slots (PostgreSQL 17+: wait event WaitForStandbyConfirmation and the standby not advancing), 0 when not; absent when the setting is empty or missing.", "slot")
	m.buildInfo = f.gaugeVec("build_info", "Always 1; its labels say which build runs (version, Go release).", "version", "goversion")
	m.buildInfo.WithLabelValues("unknown", runtime.Version()).Set(1)
	m.slotActive = f.gaugeVec("slot_active", "1 when a walsender streams from the slot, 0 when nobody does or the slot does not exist.", "slot")
	m.slotWALStatus = f.gaugeVec("slot_wal_status",
		"1 for the slot's current pg_replication_slots.wal_status (reserved, extended, unreserved, lost), 0 for the others; all 0 when the slot does not exist.", "slot", "status")
	// The two server-wide gauges have no labels but are vectors all the same, so
	// that they are absent until the first poll has read them: a 0 before it would
	// make the WAL rate jump and read as "no limit set" alike.
	m.walPosition = f.gaugeVec("wal_position_bytes",
		"The server's current WAL write position (pg_current_wal_lsn()) in bytes; its rate is the WAL written per second (exact below 2^53 bytes of WAL).")
	m.walKeepSize = f.gaugeVec("max_slot_wal_keep_size_bytes",
		"The server's max_slot_wal_keep_size in bytes: the most WAL a slot may retain before PostgreSQL invalidates it; -1 when unlimited (the default).")
	m.outboxRows = f.gaugeVec("outbox_rows",
		"Outbox rows by status; pending, failed and dead are exact, processed is estimated from pg_class.reltuples.", "status")
	m.oldestUndelivered = f.gauge("oldest_undelivered_age_seconds", "Age of the oldest pending or failed outbox row (0 when there is none).")
	m.leader = f.gauge("leader", "1 while this process holds the leader lock and streams, 0 while it stands by.")
	m.lastBatchTimestamp = f.gauge("last_batch_timestamp_seconds", "Unix time of the last batch (streamed or swept) written to ClickHouse (0 before the first).")
	m.up = f.gauge("up", "1 while the process runs and its pipeline is healthy, 0 when it is failing.")

	m.stages = make(map[string]prometheus.Counter, len(Stages))
	for _, s := range Stages {
		m.stages[s] = m.errors.WithLabelValues(s)
	}
	for _, r := range SweepResults {
		m.sweepRows.WithLabelValues(r)
	}
	for _, s := range Statuses {
		m.outboxRows.WithLabelValues(s)
	}
	m.up.Set(1)
	return m
}

// Registry is the registry holding the metrics, for the HTTP handler and bridges; nil
// for a nil *Metrics.
func (m *Metrics) Registry() *prometheus.Registry {
	if m == nil {
		return nil
	}
	return m.reg
}

// AddReceived counts rows decoded from the replication stream.
func (m *Metrics) AddReceived(n int) {
	if m == nil || n <= 0 {
		return
	}
	m.rowsReceived.Add(float64(n))
}

// ObserveBatch records one batch written to ClickHouse: rows rows in insert time
// (the whole insert, retries and splits included), and stamps the time of the last
// batch. Call it once per batch the writer completes.
func (m *Metrics) ObserveBatch(rows int, insert time.Duration) {
	if m == nil {
		return
	}
	m.batches.Inc()
	m.batchRows.Observe(float64(rows))
	m.insertDuration.Observe(insert.Seconds())
	m.lastBatchTimestamp.Set(float64(time.Now().UnixNano()) / 1e9)
}

// AddDelivered counts rows inserted into ClickHouse by this process.
func (m *Metrics) AddDelivered(n int) {
	if m == nil || n <= 0 {
		return
	}
	m.rowsDelivered.Add(float64(n))
}

// ObserveCommitLatency records the end-to-end latency of one row: from the commit of
// its PostgreSQL transaction to accepted, when ClickHouse accepted it. A zero commit
// time (rows delivered by the sweep carry none) is skipped, and so is a negative
// latency from clocks that disagree.
func (m *Metrics) ObserveCommitLatency(commit, accepted time.Time) {
	if m == nil || commit.IsZero() {
		return
	}
	if d := accepted.Sub(commit); d >= 0 {
		m.commitToCHDelay.Observe(d.Seconds())
	}
}

// ObserveDelivered counts the rows ClickHouse accepted at accepted and records the
// commit-to-ClickHouse latency of each one that carries its commit time.
func (m *Metrics) ObserveDelivered(accepted time.Time, events []record.Event) {
	if m == nil {
		return
	}
	m.AddDelivered(len(events))
	for i := range events {
		m.ObserveCommitLatency(events[i].CommitTime, accepted)
	}
}

// AddAlreadyPresent counts in-doubt rows found in ClickHouse during reconciliation.
func (m *Metrics) AddAlreadyPresent(n int) {
	if m == nil || n <= 0 {
		return
	}
	m.rowsAlreadyPresent.Add(float64(n))
}

// AddVanished counts streamed rows that were gone from the outbox when their
// status was set.
func (m *Metrics) AddVanished(n int) {
	if m == nil || n <= 0 {
		return
	}
	m.rowsVanished.Add(float64(n))
}

// ObservePrune records one retention pass: rows removed, its duration, and the
// age of the oldest row left (nil: the outbox is empty).
func (m *Metrics) ObservePrune(rows int64, took time.Duration, oldest *time.Duration) {
	if m == nil {
		return
	}
	if rows > 0 {
		m.rowsPruned.Add(float64(rows))
	}
	m.pruneDuration.Observe(took.Seconds())
	if oldest != nil {
		m.oldestRowAge.Set(oldest.Seconds())
	} else {
		m.oldestRowAge.Set(0)
	}
}

// VerifyResult is what a periodic verification found, for ObserveVerify.
type VerifyResult struct {
	Match                            bool
	Missing, Duplicates, NotInOutbox int64
	// Window is the compared range's length, as a label ("24h").
	Window string
}

// SetVerifyInterval records VERIFY_INTERVAL, so that an alert can tell a
// verification that stopped running from one that was never asked for.
func (m *Metrics) SetVerifyInterval(d time.Duration) {
	if m == nil {
		return
	}
	m.verifyInterval.Set(d.Seconds())
}

// ObserveBackfill records that a new slot's backfill delivered every row of
// the slot's snapshot, rows of them (what the benchmark reads).
func (m *Metrics) ObserveBackfill(rows int64) {
	if m == nil {
		return
	}
	m.backfillRows.WithLabelValues().Set(float64(rows))
	m.backfillDone.WithLabelValues().SetToCurrentTime()
}

// ObserveVerify records a periodic verification; err is one that could not
// run (the gauges keep the last result).
func (m *Metrics) ObserveVerify(res VerifyResult, err error) {
	if m == nil {
		return
	}
	if err != nil {
		m.verifyRuns.WithLabelValues("error").Inc()
		return
	}
	result, match := "differ", 0.0
	if res.Match {
		result, match = "match", 1
	}
	m.verifyRuns.WithLabelValues(result).Inc()
	m.verifyMatch.Reset()
	m.verifyMatch.WithLabelValues(res.Window).Set(match)
	m.verifyRows.WithLabelValues("missing").Set(float64(res.Missing))
	m.verifyRows.WithLabelValues("duplicated").Set(float64(res.Duplicates))
	m.verifyRows.WithLabelValues("not_in_outbox").Set(float64(res.NotInOutbox))
	m.verifyLastRun.WithLabelValues(result).SetToCurrentTime()
}

// SetStandbyHold records whether delivery waits for the STANDBY_HOLD
// standby, and how far behind the primary it is (nil: unknown).
func (m *Metrics) SetStandbyHold(standby string, waiting bool, behindBytes *float64) {
	if m == nil {
		return
	}
	m.standbyHoldWaiting.WithLabelValues(standby).Set(boolFloat(waiting))
	if behindBytes == nil {
		m.standbyHoldBehind.DeleteLabelValues(standby)
		return
	}
	m.standbyHoldBehind.WithLabelValues(standby).Set(*behindBytes)
}

// SetStandbyConfirmationWait records whether the slot's walsender is held
// back by a standby of synchronized_standby_slots.
func (m *Metrics) SetStandbyConfirmationWait(slot string, waiting bool) {
	if m == nil {
		return
	}
	m.standbyConfirmation.WithLabelValues(slot).Set(boolFloat(waiting))
}

// SetFailoverWanted records whether the streamer wants slot to be a
// failover slot.
func (m *Metrics) SetFailoverWanted(slot string, wanted bool) {
	if m == nil {
		return
	}
	m.slotFailoverWanted.WithLabelValues(slot).Set(boolFloat(wanted))
}

// AddFailed counts rows marked failed.
func (m *Metrics) AddFailed(n int) {
	if m == nil || n <= 0 {
		return
	}
	m.rowsFailed.Add(float64(n))
}

// AddDead counts rows that became dead letters.
func (m *Metrics) AddDead(n int) {
	if m == nil || n <= 0 {
		return
	}
	m.rowsDead.Add(float64(n))
}

// ObserveStatusUpdate records the duration of one status update of outbox rows.
func (m *Metrics) ObserveStatusUpdate(d time.Duration) {
	if m == nil {
		return
	}
	m.statusDuration.Observe(d.Seconds())
}

// ObserveSweep records one run of the fallback sweep and the rows it delivered, marked
// failed and turned into dead letters. The sweep's rows are also counted by
// rows_delivered_total / rows_failed_total / rows_dead_total, so those totals hold
// for both paths.
func (m *Metrics) ObserveSweep(delivered, failed, dead int) {
	if m == nil {
		return
	}
	m.sweepRuns.Inc()
	for i, n := range []int{delivered, failed, dead} {
		if n > 0 {
			m.sweepRows.WithLabelValues(SweepResults[i]).Add(float64(n))
		}
	}
	m.AddDelivered(delivered)
	m.AddFailed(failed)
	m.AddDead(dead)
	if delivered > 0 {
		// Rows reached ClickHouse: the "stale" alert must not fire while the sweep
		// alone delivers (a backfill, or recovery after an outage).
		m.lastBatchTimestamp.Set(float64(time.Now().UnixNano()) / 1e9)
	}
}

// AddError counts one error of a stage (one of the Stage* constants).
func (m *Metrics) AddError(stage string) {
	if m == nil {
		return
	}
	c, ok := m.stages[stage]
	if !ok {
		c = m.stages[StageOther]
	}
	c.Inc()
}

// SetAckedLSN records the LSN last confirmed to PostgreSQL.
func (m *Metrics) SetAckedLSN(lsn uint64) {
	if m == nil {
		return
	}
	m.ackedLSN.Set(float64(lsn))
	m.seenMu.Lock()
	m.seen.AckedLSN = lsn
	m.seenMu.Unlock()
}

// SetLeader records whether this process holds the leader lock.
func (m *Metrics) SetLeader(leader bool) {
	if m == nil {
		return
	}
	m.leader.Set(boolFloat(leader))
}

// SetUp records whether the process is healthy (1, the initial value) or failing.
func (m *Metrics) SetUp(up bool) {
	if m == nil {
		return
	}
	m.up.Set(boolFloat(up))
}

// SlotStats is the replication slot's state as the SlotPoller reads it.
type SlotStats struct {
	Slot string
	// Exists is false when the slot is missing; the other fields are then ignored.
	Exists bool
	Active bool
	// LagBytes is pg_current_wal_lsn() - confirmed_flush_lsn; nil when unknown (a lost slot).
	LagBytes *float64
	// RetainedBytes is pg_current_wal_lsn() - restart_lsn; nil when unknown.
	RetainedBytes *float64
	// SafeWALSize is pg_replication_slots.safe_wal_size; nil when
	// max_slot_wal_keep_size is unlimited.
	SafeWALSize *float64
	// WALStatus is pg_replication_slots.wal_status, one of WALStatuses; any other
	// value (none before PostgreSQL 13) sets every status to 0.
	WALStatus string
	// Failover (17+) and Conflicting (16+) are 1 or 0; nil on servers
	// without the columns.
	Failover, Conflicting *float64
	// WALPosition is the server's pg_current_wal_lsn(), known even without the
	// slot; nil when unknown.
	WALPosition *float64
}

// SetSlot records the slot's state. Values that are unknown remove their series
// rather than report a misleading zero.
func (m *Metrics) SetSlot(s SlotStats) {
	if m == nil {
		return
	}
	m.slotActive.WithLabelValues(s.Slot).Set(boolFloat(s.Exists && s.Active))
	set := func(v *prometheus.GaugeVec, p *float64) {
		if s.Exists && p != nil {
			v.WithLabelValues(s.Slot).Set(*p)
		} else {
			v.DeleteLabelValues(s.Slot)
		}
	}
	set(m.slotLag, s.LagBytes)
	m.seenMu.Lock()
	m.seen.LagBytes = nil
	if s.Exists && s.LagBytes != nil {
		lag := *s.LagBytes
		m.seen.LagBytes = &lag
	}
	m.seenMu.Unlock()
	set(m.slotRetained, s.RetainedBytes)
	set(m.slotSafeWAL, s.SafeWALSize)
	set(m.slotFailover, s.Failover)
	set(m.slotConflicting, s.Conflicting)
	// Every status keeps a series (0 or 1), so a change shows as one series
	// going to 1 rather than as series appearing and vanishing.
	for _, st := range WALStatuses {
		m.slotWALStatus.WithLabelValues(s.Slot, st).Set(boolFloat(s.Exists && s.WALStatus == st))
	}
	// The WAL position is the server's, so it is reported with or without the slot.
	if s.WALPosition != nil {
		m.walPosition.WithLabelValues().Set(*s.WALPosition)
	} else {
		m.walPosition.Reset()
	}
}

// SetWALKeepSize records the server's max_slot_wal_keep_size in bytes (-1:
// unlimited); nil (unknown, or a server before PostgreSQL 13 without the setting)
// removes the series.
func (m *Metrics) SetWALKeepSize(bytes *float64) {
	if m == nil {
		return
	}
	if bytes != nil {
		m.walKeepSize.WithLabelValues().Set(*bytes)
	} else {
		m.walKeepSize.Reset()
	}
}

// OutboxStats is the outbox table's state as the SlotPoller reads it.
type OutboxStats struct {
	// Rows by status. A status missing from the map is reported as 0, except
	// "processed", whose series is removed when missing (its estimate is unknown).
	Rows map[string]float64
	// OldestUndeliveredAge is the age of the oldest pending or failed row; zero when
	// there is none.
	OldestUndeliveredAge time.Duration
}

// SetOutbox records the outbox table's state.
func (m *Metrics) SetOutbox(s OutboxStats) {
	if m == nil {
		return
	}
	for _, st := range Statuses {
		v, ok := s.Rows[st]
		if !ok && st == "processed" {
			m.outboxRows.DeleteLabelValues(st)
			continue
		}
		m.outboxRows.WithLabelValues(st).Set(v)
	}
	// Unexpected statuses (a newer schema) are reported too rather than hidden.
	for _, st := range slices.Sorted(maps.Keys(s.Rows)) {
		if !slices.Contains(Statuses, st) {
			m.outboxRows.WithLabelValues(st).Set(s.Rows[st])
		}
	}
	m.oldestUndelivered.Set(s.OldestUndeliveredAge.Seconds())
	m.seenMu.Lock()
	m.seen.Pending, m.seen.Failed, m.seen.Dead = s.Rows["pending"], s.Rows["failed"], s.Rows["dead"]
	m.seen.OldestUndelivered, m.seen.OutboxRead = s.OldestUndeliveredAge, true
	m.seenMu.Unlock()
}

// Snapshot is the state the progress line reports: what this process
// delivered and acknowledged, and the slot's and the outbox's state as the
// SlotPoller last read them.
type Snapshot struct {
	// Delivered counts the rows this process inserted into ClickHouse
	// (stream and sweep).
	Delivered float64
	// AckedLSN is the LSN last confirmed to PostgreSQL (0: none yet).
	AckedLSN uint64
	// LagBytes is the slot's lag; nil when unknown.
	LagBytes *float64
	// Pending, Failed and Dead count the outbox's undelivered rows.
	Pending, Failed, Dead float64
	// OldestUndelivered is the age of the oldest pending or failed row.
	OldestUndelivered time.Duration
	// OutboxRead is false until the poller read the outbox once.
	OutboxRead bool
	// LastBatch is when the last batch reached ClickHouse (zero: none yet).
	LastBatch time.Time
	// Errors counts the errors of every stage.
	Errors float64
}

// Snapshot returns the current state (zero for a nil *Metrics).
func (m *Metrics) Snapshot() Snapshot {
	if m == nil {
		return Snapshot{}
	}
	m.seenMu.Lock()
	s := m.seen
	m.seenMu.Unlock()
	var d dto.Metric
	if err := m.rowsDelivered.Write(&d); err == nil {
		s.Delivered = d.GetCounter().GetValue()
	}
	var last dto.Metric
	if err := m.lastBatchTimestamp.Write(&last); err == nil && last.GetGauge().GetValue() > 0 {
		s.LastBatch = time.Unix(0, int64(last.GetGauge().GetValue()*1e9))
	}
	for _, c := range m.stages {
		var e dto.Metric
		if err := c.Write(&e); err == nil {
			s.Errors += e.GetCounter().GetValue()
		}
	}
	return s
}

func boolFloat(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// factory creates metrics with the namespace and registers them.
type factory struct{ reg prometheus.Registerer }

func (f factory) counter(name, help string) prometheus.Counter {
	c := prometheus.NewCounter(prometheus.CounterOpts{Namespace: Namespace, Name: name, Help: help})
	f.reg.MustRegister(c)
	return c
}

func (f factory) counterVec(name, help string, labels ...string) *prometheus.CounterVec {
	c := prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: Namespace, Name: name, Help: help}, labels)
	f.reg.MustRegister(c)
	return c
}

func (f factory) gauge(name, help string) prometheus.Gauge {
	g := prometheus.NewGauge(prometheus.GaugeOpts{Namespace: Namespace, Name: name, Help: help})
	f.reg.MustRegister(g)
	return g
}

func (f factory) gaugeVec(name, help string, labels ...string) *prometheus.GaugeVec {
	g := prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: Namespace, Name: name, Help: help}, labels)
	f.reg.MustRegister(g)
	return g
}

func (f factory) histogram(name, help string, buckets []float64) prometheus.Histogram {
	h := prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: Namespace, Name: name, Help: help, Buckets: buckets})
	f.reg.MustRegister(h)
	return h
}

// SetBuildInfo names the running build in outbox_streamer_build_info.
func (m *Metrics) SetBuildInfo(version string) {
	if m == nil {
		return
	}
	m.buildInfo.Reset()
	m.buildInfo.WithLabelValues(version, runtime.Version()).Set(1)
}
