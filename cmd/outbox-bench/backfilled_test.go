package main

import (
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/outbox-streamer/outbox-streamer/internal/metrics"
)

// TestBackfilledReadsTheMetrics: the bench reads the backfill's rows and end
// from the binary's metrics endpoint, and nothing before the backfill ends.
func TestBackfilledReadsTheMetrics(t *testing.T) {
	m := metrics.New()
	srv := httptest.NewServer(metrics.Handler(m.Registry(), nil, nil))
	defer srv.Close()
	s := &streamer{metricsAddr: strings.TrimPrefix(srv.URL, "http://")}
	if _, _, ok := s.backfilled(); ok {
		t.Fatal("a backfill reported before one finished")
	}
	before := time.Now()
	m.ObserveBackfill(1234)
	rows, at, ok := s.backfilled()
	if !ok || rows != 1234 || at.Before(before.Add(-time.Second)) || at.After(time.Now().Add(time.Second)) {
		t.Fatalf("backfilled() = %v, %v, %v; want 1234 rows at about %v", rows, at, ok, before)
	}
}
