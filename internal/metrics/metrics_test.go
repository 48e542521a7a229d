package metrics

import (
	"errors"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/outbox-streamer/outbox-streamer/internal/record"
)

func TestNilMetricsIsANoOp(t *testing.T) {
	var m *Metrics
	// Every method must accept a nil receiver: a panic here fails the test.
	m.AddReceived(3)
	m.ObserveBatch(10, time.Millisecond)
	m.AddDelivered(1)
	m.ObserveCommitLatency(time.Now(), time.Now())
	m.ObserveDelivered(time.Now(), []record.Event{{ID: 1, CommitTime: time.Now()}})
	m.AddAlreadyPresent(1)
	m.AddFailed(1)
	m.AddDead(1)
	m.ObserveStatusUpdate(time.Millisecond)
	m.ObserveSweep(1, 2, 3)
	m.AddError(StageInsert)
	m.SetAckedLSN(42)
	m.SetLeader(true)
	m.SetUp(false)
	m.SetSlot(SlotStats{Slot: "s", Exists: true})
	m.SetWALKeepSize(nil)
	m.SetOutbox(OutboxStats{Rows: map[string]float64{"pending": 1}})
	if m.Registry() != nil {
		t.Fatal("nil Metrics has a registry")
	}
}

func TestMetricsRecordWhatTheyAreTold(t *testing.T) {
	m := New()

	m.AddReceived(5)
	m.AddReceived(0)
	m.AddReceived(-1) // ignored: counters cannot go down
	m.ObserveBatch(100, 20*time.Millisecond)
	m.ObserveBatch(50, 10*time.Millisecond)
	now := time.Now()
	m.ObserveDelivered(now, []record.Event{
		{ID: 1, CommitTime: now.Add(-30 * time.Millisecond)},
		{ID: 2, CommitTime: now.Add(-2 * time.Second)},
		{ID: 3},                                 // from the sweep: no commit time
		{ID: 4, CommitTime: now.Add(time.Hour)}, // clock skew: not observed
	})
	m.AddAlreadyPresent(7)
	m.AddFailed(2)
	m.AddDead(1)
	m.ObserveSweep(10, 3, 1)
	m.AddError(StageInsert)
	m.AddError(StageInsert)
	m.AddError("no such stage")
	m.SetAckedLSN(0x16B3748)
	m.SetLeader(true)
	m.ObserveStatusUpdate(3 * time.Millisecond)
	m.AddVanished(3)
	oldest := 90 * time.Second
	m.ObservePrune(40, 20*time.Millisecond, &oldest)

	for _, c := range []struct {
		name string
		got  float64
		want float64
	}{
		{"rows_received_total", testutil.ToFloat64(m.rowsReceived), 5},
		{"batches_total", testutil.ToFloat64(m.batches), 2},
		{"rows_delivered_total", testutil.ToFloat64(m.rowsDelivered), 4 + 10},
		{"rows_already_present_total", testutil.ToFloat64(m.rowsAlreadyPresent), 7},
		{"rows_vanished_total", testutil.ToFloat64(m.rowsVanished), 3},
		{"rows_pruned_total", testutil.ToFloat64(m.rowsPruned), 40},
		{"oldest_row_age_seconds", testutil.ToFloat64(m.oldestRowAge), 90},
		{"rows_failed_total", testutil.ToFloat64(m.rowsFailed), 2 + 3},
		{"rows_dead_total", testutil.ToFloat64(m.rowsDead), 1 + 1},
		{"sweep_runs_total", testutil.ToFloat64(m.sweepRuns), 1},
		{`sweep_rows_total{result="delivered"}`, testutil.ToFloat64(m.sweepRows.WithLabelValues("delivered")), 10},
		{`sweep_rows_total{result="failed"}`, testutil.ToFloat64(m.sweepRows.WithLabelValues("failed")), 3},
		{`sweep_rows_total{result="dead"}`, testutil.ToFloat64(m.sweepRows.WithLabelValues("dead")), 1},
		{`errors_total{stage="clickhouse_insert"}`, testutil.ToFloat64(m.errors.WithLabelValues(StageInsert)), 2},
		{`errors_total{stage="other"}`, testutil.ToFloat64(m.errors.WithLabelValues(StageOther)), 1},
		{"acknowledged_lsn", testutil.ToFloat64(m.ackedLSN), 0x16B3748},
		{"leader", testutil.ToFloat64(m.leader), 1},
		{"up", testutil.ToFloat64(m.up), 1},
	} {
		if c.got != c.want {
			t.Errorf("%s = %v, want %v", c.name, c.got, c.want)
		}
	}
	if ts := testutil.ToFloat64(m.lastBatchTimestamp); ts < float64(now.Add(-time.Minute).Unix()) {
		t.Errorf("last_batch_timestamp_seconds = %v, want about now (%d)", ts, now.Unix())
	}

	// The latency histogram saw exactly the two rows with a plausible commit time.
	err := testutil.GatherAndCompare(m.Registry(), strings.NewReader(`
# HELP outbox_streamer_commit_to_clickhouse_latency_seconds Time from the commit of a row's PostgreSQL transaction to ClickHouse accepting the row.
# TYPE outbox_streamer_commit_to_clickhouse_latency_seconds histogram
outbox_streamer_commit_to_clickhouse_latency_seconds_bucket{le="0.005"} 0
outbox_streamer_commit_to_clickhouse_latency_seconds_bucket{le="0.01"} 0
outbox_streamer_commit_to_clickhouse_latency_seconds_bucket{le="0.025"} 0
outbox_streamer_commit_to_clickhouse_latency_seconds_bucket{le="0.05"} 1
outbox_streamer_commit_to_clickhouse_latency_seconds_bucket{le="0.1"} 1
outbox_streamer_commit_to_clickhouse_latency_seconds_bucket{le="0.25"} 1
outbox_streamer_commit_to_clickhouse_latency_seconds_bucket{le="0.5"} 1
outbox_streamer_commit_to_clickhouse_latency_seconds_bucket{le="1"} 1
outbox_streamer_commit_to_clickhouse_latency_seconds_bucket{le="2.5"} 2
outbox_streamer_commit_to_clickhouse_latency_seconds_bucket{le="5"} 2
outbox_streamer_commit_to_clickhouse_latency_seconds_bucket{le="10"} 2
outbox_streamer_commit_to_clickhouse_latency_seconds_bucket{le="20"} 2
outbox_streamer_commit_to_clickhouse_latency_seconds_bucket{le="30"} 2
outbox_streamer_commit_to_clickhouse_latency_seconds_bucket{le="60"} 2
outbox_streamer_commit_to_clickhouse_latency_seconds_bucket{le="+Inf"} 2
outbox_streamer_commit_to_clickhouse_latency_seconds_sum 2.03
outbox_streamer_commit_to_clickhouse_latency_seconds_count 2
`), "outbox_streamer_commit_to_clickhouse_latency_seconds")
	if err != nil {
		t.Error(err)
	}
	if n := testutil.CollectAndCount(m.batchRows); n != 1 {
		t.Errorf("batch_rows has %d series, want 1", n)
	}
}

func TestLabelledSeriesExistBeforeTheFirstEvent(t *testing.T) {
	m := New()
	// rate() and alerts on a series need it to exist at zero before the first event.
	if got, want := testutil.CollectAndCount(m.errors), len(Stages); got != want {
		t.Errorf("errors_total has %d series, want %d (one per stage)", got, want)
	}
	if got, want := testutil.CollectAndCount(m.sweepRows), len(SweepResults); got != want {
		t.Errorf("sweep_rows_total has %d series, want %d", got, want)
	}
	if got, want := testutil.CollectAndCount(m.outboxRows), len(Statuses); got != want {
		t.Errorf("outbox_rows has %d series, want %d", got, want)
	}
}

func TestSetSlotRemovesUnknownValues(t *testing.T) {
	m := New()
	f := func(v float64) *float64 { return &v }
	m.SetSlot(SlotStats{Slot: "s1", Exists: true, Active: true, LagBytes: f(100), RetainedBytes: f(2000), SafeWALSize: f(5e9)})
	if got := testutil.ToFloat64(m.slotLag.WithLabelValues("s1")); got != 100 {
		t.Errorf("slot_lag_bytes = %v, want 100", got)
	}
	if got := testutil.ToFloat64(m.slotActive.WithLabelValues("s1")); got != 1 {
		t.Errorf("slot_active = %v, want 1", got)
	}

	// Unlimited max_slot_wal_keep_size: safe_wal_size is NULL and its series goes.
	m.SetSlot(SlotStats{Slot: "s1", Exists: true, LagBytes: f(5), RetainedBytes: f(6)})
	if n := testutil.CollectAndCount(m.slotSafeWAL); n != 0 {
		t.Errorf("slot_safe_wal_size_bytes has %d series after NULL, want 0", n)
	}
	if got := testutil.ToFloat64(m.slotActive.WithLabelValues("s1")); got != 0 {
		t.Errorf("slot_active = %v, want 0", got)
	}

	// A dropped slot: inactive, and no lag that would pretend all is well.
	m.SetSlot(SlotStats{Slot: "s1"})
	if n := testutil.CollectAndCount(m.slotLag) + testutil.CollectAndCount(m.slotRetained); n != 0 {
		t.Errorf("lag/retained series remain for a missing slot: %d", n)
	}
	if n := testutil.CollectAndCount(m.slotActive); n != 1 {
		t.Errorf("slot_active has %d series, want 1", n)
	}
}

// TestSetSlotFailover: the failover and conflicting gauges follow the slot,
// and vanish on servers without the columns (nil), not read as 0.
func TestSetSlotFailover(t *testing.T) {
	m := New()
	one, zero := 1.0, 0.0
	m.SetSlot(SlotStats{Slot: "s", Exists: true, Failover: &one, Conflicting: &zero})
	if got := testutil.ToFloat64(m.slotFailover.WithLabelValues("s")); got != 1 {
		t.Errorf("slot_failover = %v, want 1", got)
	}
	if got := testutil.ToFloat64(m.slotConflicting.WithLabelValues("s")); got != 0 {
		t.Errorf("slot_conflicting = %v, want 0", got)
	}
	m.SetSlot(SlotStats{Slot: "s", Exists: true})
	if n := testutil.CollectAndCount(m.slotFailover) + testutil.CollectAndCount(m.slotConflicting); n != 0 {
		t.Errorf("failover/conflicting series remain on a server without the columns: %d", n)
	}
}

func TestSetSlotWALStatus(t *testing.T) {
	f := func(v float64) *float64 { return &v }
	for _, c := range []struct {
		name  string
		stats SlotStats
		want  string // the status at 1; "" for all 0
	}{
		{"reserved", SlotStats{Slot: "s", Exists: true, WALStatus: "reserved"}, "reserved"},
		{"extended", SlotStats{Slot: "s", Exists: true, WALStatus: "extended"}, "extended"},
		{"unreserved", SlotStats{Slot: "s", Exists: true, WALStatus: "unreserved"}, "unreserved"},
		{"lost", SlotStats{Slot: "s", Exists: true, WALStatus: "lost"}, "lost"},
		{"missing slot", SlotStats{Slot: "s", WALStatus: "reserved"}, ""},
		{"unknown status", SlotStats{Slot: "s", Exists: true, WALStatus: "something new"}, ""},
		{"no status (before PostgreSQL 13)", SlotStats{Slot: "s", Exists: true, LagBytes: f(1)}, ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			m := New()
			// From another status first: the old one must go back to 0.
			m.SetSlot(SlotStats{Slot: "s", Exists: true, WALStatus: "extended"})
			m.SetSlot(c.stats)
			for _, st := range WALStatuses {
				want := 0.0
				if st == c.want {
					want = 1
				}
				if got := testutil.ToFloat64(m.slotWALStatus.WithLabelValues("s", st)); got != want {
					t.Errorf("slot_wal_status{status=%q} = %v, want %v", st, got, want)
				}
			}
			if n := testutil.CollectAndCount(m.slotWALStatus); n != len(WALStatuses) {
				t.Errorf("slot_wal_status has %d series, want %d (one per status)", n, len(WALStatuses))
			}
		})
	}
}

func TestWALPositionAndKeepSize(t *testing.T) {
	m := New()
	// Absent before the first poll: a 0 would read as a jump of the WAL position
	// and as a limit of 0 bytes.
	if n := testutil.CollectAndCount(m.walPosition) + testutil.CollectAndCount(m.walKeepSize); n != 0 {
		t.Fatalf("%d WAL position/keep size series before any poll, want 0", n)
	}
	pos, keep, unlimited := float64(0x3000060), float64(4<<30), -1.0
	// The position is the server's: reported without the slot too.
	m.SetSlot(SlotStats{Slot: "s", WALPosition: &pos})
	if got := testutil.ToFloat64(m.walPosition); got != pos {
		t.Errorf("wal_position_bytes = %v, want %v", got, pos)
	}
	m.SetSlot(SlotStats{Slot: "s"})
	if n := testutil.CollectAndCount(m.walPosition); n != 0 {
		t.Errorf("wal_position_bytes has %d series when unknown, want 0", n)
	}
	m.SetWALKeepSize(&keep)
	if got := testutil.ToFloat64(m.walKeepSize); got != keep {
		t.Errorf("max_slot_wal_keep_size_bytes = %v, want %v", got, keep)
	}
	m.SetWALKeepSize(&unlimited)
	if got := testutil.ToFloat64(m.walKeepSize); got != -1 {
		t.Errorf("max_slot_wal_keep_size_bytes = %v for unlimited, want -1", got)
	}
	m.SetWALKeepSize(nil)
	if n := testutil.CollectAndCount(m.walKeepSize); n != 0 {
		t.Errorf("max_slot_wal_keep_size_bytes has %d series when unknown, want 0", n)
	}
}

func TestSetOutbox(t *testing.T) {
	m := New()
	m.SetOutbox(OutboxStats{Rows: map[string]float64{"pending": 3, "failed": 2, "processed": 1000, "archived": 4}, OldestUndeliveredAge: 90 * time.Second})
	for st, want := range map[string]float64{"pending": 3, "failed": 2, "dead": 0, "processed": 1000, "archived": 4} {
		if got := testutil.ToFloat64(m.outboxRows.WithLabelValues(st)); got != want {
			t.Errorf("outbox_rows{status=%q} = %v, want %v", st, got, want)
		}
	}
	if got := testutil.ToFloat64(m.oldestUndelivered); got != 90 {
		t.Errorf("oldest_undelivered_age_seconds = %v, want 90", got)
	}
	// The processed estimate unknown (table never analyzed): its series goes away.
	m.SetOutbox(OutboxStats{Rows: map[string]float64{"pending": 1}})
	if got := testutil.CollectAndCount(m.outboxRows); got != 4 { // pending, failed, dead, archived
		t.Errorf("outbox_rows has %d series, want 4", got)
	}
}

func TestMetricNamesFollowConventions(t *testing.T) {
	m := New()
	v := 1.0
	m.SetSlot(SlotStats{Slot: "s", Exists: true, LagBytes: &v, RetainedBytes: &v, SafeWALSize: &v, WALStatus: "reserved", WALPosition: &v,
		Failover: &v, Conflicting: &v})
	m.SetWALKeepSize(&v)
	m.ObserveVerify(VerifyResult{Match: true, Window: "24h"}, nil)
	m.ObserveBackfill(3)
	m.SetStandbyHold("sb", true, &v)
	m.SetStandbyConfirmationWait("s", true)
	m.SetFailoverWanted("s", true)
	fams, err := m.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	// Lint catches missing units, non-base units and counters without _total.
	problems, err := testutil.GatherAndLint(m.Registry())
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		if strings.HasPrefix(p.Metric, Namespace+"_") {
			t.Errorf("lint: %s: %s", p.Metric, p.Text)
		}
	}
	ours := 0
	for _, f := range fams {
		if strings.HasPrefix(f.GetName(), Namespace+"_") {
			ours++
		}
	}
	if ours != 44 {
		t.Errorf("%d outbox_streamer_ metric families registered, want 44 (12 counters, 5 histograms, 27 gauges)", ours)
	}
	// The Go and process collectors are on the registry too.
	if !hasFamily(fams, "go_goroutines") || !hasFamily(fams, "process_cpu_seconds_total") {
		t.Error("Go or process collector missing from the registry")
	}
}

// TestBuildInfo: the version the binary was built with is a label of
// outbox_streamer_build_info (1), so dashboards can tell builds apart.
func TestBuildInfo(t *testing.T) {
	m := New()
	m.SetBuildInfo("v1.2.3")
	if got := testutil.ToFloat64(m.buildInfo.WithLabelValues("v1.2.3", runtime.Version())); got != 1 {
		t.Fatalf("build_info{version=v1.2.3} = %v", got)
	}
	if n := testutil.CollectAndCount(m.buildInfo); n != 1 {
		t.Fatalf("%d build_info series, want 1", n)
	}
}

func TestObserveVerify(t *testing.T) {
	m := New()
	m.SetVerifyInterval(time.Hour)
	m.ObserveVerify(VerifyResult{Match: false, Missing: 2, Duplicates: 1, Window: "24h"}, nil)
	if got := testutil.ToFloat64(m.verifyMatch.WithLabelValues("24h")); got != 0 {
		t.Errorf("verify_match = %v after a difference, want 0", got)
	}
	if got := testutil.ToFloat64(m.verifyRows.WithLabelValues("missing")); got != 2 {
		t.Errorf("verify_rows{kind=missing} = %v, want 2", got)
	}
	m.ObserveVerify(VerifyResult{}, errors.New("clickhouse down"))
	if got := testutil.ToFloat64(m.verifyMatch.WithLabelValues("24h")); got != 0 {
		t.Errorf("a failed run changed verify_match to %v", got)
	}
	m.ObserveVerify(VerifyResult{Match: true, Window: "24h"}, nil)
	if got := testutil.ToFloat64(m.verifyMatch.WithLabelValues("24h")); got != 1 {
		t.Errorf("verify_match = %v after a match, want 1", got)
	}
	for r, want := range map[string]float64{"match": 1, "differ": 1, "error": 1} {
		if got := testutil.ToFloat64(m.verifyRuns.WithLabelValues(r)); got != want {
			t.Errorf("verify_runs_total{result=%q} = %v, want %v", r, got, want)
		}
	}
	if got := testutil.ToFloat64(m.verifyInterval); got != 3600 {
		t.Errorf("verify_interval_seconds = %v", got)
	}
}
