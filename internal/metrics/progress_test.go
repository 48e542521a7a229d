package metrics

import (
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

// TestProgressLines: the line reports the rate since the previous one, says
// "catching up" with the rows left and an ETA while more than BehindRows are
// pending, and "caught up" once when the backlog is gone. The times are
// made up: nothing depends on the clock.
func TestProgressLines(t *testing.T) {
	core, logs := observer.New(zap.InfoLevel)
	p := NewProgress(ProgressConfig{Interval: time.Second, BehindRows: 1000}, nil, zap.New(core), func() bool { return true }, nil)
	t0 := time.Date(2026, 12, 7, 10, 0, 0, 0, time.UTC)
	lag := float64(45 << 20)
	steps := []struct {
		s    Snapshot
		at   time.Duration
		want string
	}{
		{Snapshot{Delivered: 0, Pending: 150000, OutboxRead: true, LagBytes: &lag}, 0, "catching up: 150000 left, ETA unknown"},
		{Snapshot{Delivered: 20000, Pending: 130000, OutboxRead: true, LagBytes: &lag}, 10 * time.Second, "catching up: 130000 left, ETA 1m5s"},
		{Snapshot{Delivered: 150000, Pending: 12, OutboxRead: true}, 20 * time.Second, "caught up: 12 pending, lag unknown"},
		{Snapshot{Delivered: 150300, Pending: 3, OutboxRead: true, LagBytes: &lag, AckedLSN: 0x1A2B3C}, 30 * time.Second, "progress: 30 rows/s, lag 45.0 MiB"},
	}
	for i, st := range steps {
		p.Report(st.s, t0.Add(st.at))
		all := logs.TakeAll()
		if len(all) != 1 || all[0].Message != st.want {
			var got []string
			for _, e := range all {
				got = append(got, e.Message)
			}
			t.Fatalf("step %d: lines %q, want %q", i, got, st.want)
		}
		if i == 3 {
			f := all[0].ContextMap()
			if f["confirmed_lsn"] != "0/1A2B3C" || f["rows_per_second"] != 30.0 || f["pending"] != int64(3) || f["lag_bytes"] != int64(lag) {
				t.Errorf("fields %v", f)
			}
		}
	}
	if got := Bytes(512); !strings.HasSuffix(got, " B") {
		t.Errorf("Bytes(512) = %q", got)
	}
}
