package metrics

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"go.uber.org/zap/zaptest"
)

func hasFamily(fams []*dto.MetricFamily, name string) bool {
	for _, f := range fams {
		if f.GetName() == name {
			return true
		}
	}
	return false
}

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(body)
}

func TestHandlerRoutes(t *testing.T) {
	m := New()
	m.ObserveBatch(3, time.Millisecond)
	var ready atomic.Bool
	health := func() (bool, string) {
		if ready.Load() {
			return true, "leader: streaming slot s"
		}
		return false, "connecting to postgres"
	}
	srv := httptest.NewServer(Handler(m.Registry(), health, zaptest.NewLogger(t)))
	defer srv.Close()

	code, body := get(t, srv.URL+"/metrics")
	if code != http.StatusOK || !strings.Contains(body, "outbox_streamer_batches_total 1") ||
		!strings.Contains(body, "go_goroutines") {
		t.Errorf("/metrics: %d\n%.500s", code, body)
	}

	// Liveness does not depend on readiness.
	if code, body := get(t, srv.URL+"/healthz"); code != http.StatusOK || body != "ok\n" {
		t.Errorf("/healthz = %d %q, want 200 ok", code, body)
	}
	if code, body := get(t, srv.URL+"/readyz"); code != http.StatusServiceUnavailable || body != "connecting to postgres\n" {
		t.Errorf("/readyz = %d %q, want 503 with the detail", code, body)
	}
	ready.Store(true)
	if code, body := get(t, srv.URL+"/readyz"); code != http.StatusOK || body != "leader: streaming slot s\n" {
		t.Errorf("/readyz = %d %q, want 200 with the detail", code, body)
	}
	if code, _ := get(t, srv.URL+"/nope"); code != http.StatusNotFound {
		t.Errorf("/nope = %d, want 404", code)
	}
	resp, err := http.Post(srv.URL+"/metrics", "text/plain", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("POST /metrics = %d, want 405", resp.StatusCode)
	}
}

func TestReadyzWithoutHealthFunc(t *testing.T) {
	srv := httptest.NewServer(Handler(New().Registry(), nil, nil))
	defer srv.Close()
	if code, body := get(t, srv.URL+"/readyz"); code != http.StatusOK || body != "ready\n" {
		t.Errorf("/readyz = %d %q", code, body)
	}
}

func TestDefaultAddrIsLoopback(t *testing.T) {
	host, _, err := net.SplitHostPort(DefaultAddr)
	if err != nil {
		t.Fatal(err)
	}
	if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
		t.Errorf("DefaultAddr %q must be a loopback address", DefaultAddr)
	}
}

func TestServeStopsWithContext(t *testing.T) {
	s, err := Listen("127.0.0.1:0", New().Registry(), nil, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx) }()

	url := "http://" + s.Addr().String()
	if code, _ := get(t, url+"/healthz"); code != http.StatusOK {
		t.Fatalf("/healthz = %d", code)
	}
	pctx, pcancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer pcancel()
	if err := Probe(pctx, url+"/readyz"); err != nil {
		t.Errorf("Probe: %v", err)
	}
	if err := Probe(pctx, url+"/missing"); err == nil || !strings.Contains(err.Error(), "404") {
		t.Errorf("Probe of a missing page = %v, want a 404 error", err)
	}

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Serve returned %v after its context ended", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return after its context ended")
	}
	if _, err := http.Get(url + "/healthz"); err == nil {
		t.Error("server still answers after shutdown")
	}
}

func TestListenReportsATakenPort(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	_, err = Listen(ln.Addr().String(), New().Registry(), nil, nil)
	if err == nil || !strings.Contains(err.Error(), "METRICS_ADDR") {
		t.Errorf("Listen on a taken port = %v, want an error naming METRICS_ADDR", err)
	}
}
