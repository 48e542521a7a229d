package pipeline_test

import (
	"context"
	"testing"
	"time"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/fixture"
	"github.com/outbox-streamer/outbox-streamer/internal/harness/testenv"
	"github.com/outbox-streamer/outbox-streamer/internal/metrics"
	"github.com/outbox-streamer/outbox-streamer/internal/pipeline"
)

// gauge reads one sample of a gauge family from m (ok false when absent).
func gauge(t *testing.T, m *metrics.Metrics, name, label, value string) (float64, bool) {
	t.Helper()
	fams, err := m.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fams {
		if f.GetName() != name {
			continue
		}
		for _, s := range f.GetMetric() {
			for _, l := range s.GetLabel() {
				if l.GetName() == label && (value == "" || l.GetValue() == value) {
					return s.GetGauge().GetValue(), true
				}
			}
		}
	}
	return 0, false
}

// TestPeriodicVerification (issue 18): with VERIFY_INTERVAL the leader runs
// verify over its window and records the result; a row deleted from
// ClickHouse behind the streamer's back turns verify_match to 0 and counts
// as missing.
func TestPeriodicVerification(t *testing.T) {
	e := fixture.New(t, testenv.ModernClickHouse(t))
	m := metrics.New()
	startWith(t, e, func(c *pipeline.Config) {
		c.Metrics = m
		c.VerifyInterval = 300 * time.Millisecond
		c.VerifyWindow = time.Hour
	})
	e.WaitStreaming(t)
	e.Insert(t, 500, false)
	e.AssertExactlyDelivered(t, time.Minute, e.CurrentWAL(t))
	fixture.WaitFor(t, 30*time.Second, "a verification that matches", func() bool {
		v, ok := gauge(t, m, "outbox_streamer_verify_match", "window", "")
		return ok && v == 1
	})
	// The harness stops the table's merges (they would hide duplicates);
	// a mutation needs them.
	if err := e.CHConn.Exec(context.Background(), "SYSTEM START MERGES "+e.Table); err != nil {
		t.Fatal(err)
	}
	if err := e.CHConn.Exec(context.Background(), "ALTER TABLE "+e.Table+" DELETE WHERE event_id = (SELECT min(event_id) FROM "+e.Table+") SETTINGS mutations_sync = 1"); err != nil {
		t.Fatal(err)
	}
	fixture.WaitFor(t, 30*time.Second, "a verification that finds the deleted row missing", func() bool {
		match, ok := gauge(t, m, "outbox_streamer_verify_match", "window", "")
		missing, _ := gauge(t, m, "outbox_streamer_verify_rows", "kind", "missing")
		return ok && match == 0 && missing == 1
	})
}
