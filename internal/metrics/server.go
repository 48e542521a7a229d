package metrics

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/zap"
)

// DefaultAddr is where the HTTP server listens unless told otherwise (METRICS_ADDR).
// It is a loopback address on purpose: metrics reveal the slot, table and traffic
// and must not be exposed by accident. In a container, set METRICS_ADDR=0.0.0.0:8187
// and let the network policy decide who scrapes. Port 8187 lies outside
// 9100-9999, the range Prometheus allocates to exporters (all taken; 9187, the
// earlier default, is postgres_exporter's, which often runs beside PostgreSQL
// and the streamer).
const DefaultAddr = "127.0.0.1:8187"

// HealthFunc reports whether the process is ready to do its job, and a short text
// saying why or why not. It is called on every /readyz request and must be fast.
type HealthFunc func() (ready bool, detail string)

// shutdownGrace bounds how long in-flight scrapes may finish after ctx ends.
const shutdownGrace = 5 * time.Second

// Server is the operators' HTTP endpoint: /metrics, /healthz and /readyz.
type Server struct {
	ln  net.Listener
	srv *http.Server
	log *zap.Logger
}

// Listen binds addr (DefaultAddr when empty) at once, so that a taken port is
// reported at startup rather than from a goroutine later. reg is the registry to
// expose (Metrics.Registry); health, when nil, reports ready.
func Listen(addr string, reg prometheus.Gatherer, health HealthFunc, log *zap.Logger) (*Server, error) {
	if addr == "" {
		addr = DefaultAddr
	}
	if log == nil {
		log = zap.NewNop()
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listen for metrics on %s (METRICS_ADDR): %w", addr, err)
	}
	log = log.Named("http")
	return &Server{
		ln:  ln,
		log: log,
		srv: &http.Server{
			Handler: Handler(reg, health, log),
			// Scrapers and probes send tiny requests: bound slow clients.
			ReadHeaderTimeout: 5 * time.Second,
			ReadTimeout:       10 * time.Second,
			IdleTimeout:       60 * time.Second,
		},
	}, nil
}

// Addr is the address the server listens on (useful with port 0).
func (s *Server) Addr() net.Addr { return s.ln.Addr() }

// Serve answers requests until ctx ends, then shuts down gracefully (in-flight
// requests get a few seconds) and returns nil; it returns an error only when serving
// itself fails.
func (s *Server) Serve(ctx context.Context) error {
	errc := make(chan error, 1)
	go func() { errc <- s.srv.Serve(s.ln) }()
	s.log.Info("serving /metrics, /healthz and /readyz", zap.String("addr", s.ln.Addr().String()))
	select {
	case err := <-errc:
		return fmt.Errorf("metrics server: %w", err)
	case <-ctx.Done():
	}
	// ctx is already done: the grace period needs a context of its own.
	sctx, cancel := context.WithTimeout(context.Background(), shutdownGrace)
	defer cancel()
	if err := s.srv.Shutdown(sctx); err != nil {
		_ = s.srv.Close()
	}
	if err := <-errc; err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("metrics server: %w", err)
	}
	return nil
}

// Handler returns the endpoint's routes:
//
//	/metrics  Prometheus text (or OpenMetrics on request) of reg
//	/healthz  200 "ok" while the process runs: a liveness probe that a slow
//	          database cannot fail, so Kubernetes does not restart a healthy standby
//	/readyz   200 or 503 with health's one-line detail: a readiness probe
func Handler(reg prometheus.Gatherer, health HealthFunc, log *zap.Logger) http.Handler {
	if log == nil {
		log = zap.NewNop()
	}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{
		ErrorLog:          zap.NewStdLog(log),
		ErrorHandling:     promhttp.ContinueOnError,
		EnableOpenMetrics: true,
	}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		writeText(w, http.StatusOK, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		ready, detail := true, "ready"
		if health != nil {
			ready, detail = health()
		}
		code := http.StatusOK
		if !ready {
			code = http.StatusServiceUnavailable
		}
		if detail == "" {
			detail = http.StatusText(code)
		}
		writeText(w, code, detail)
	})
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, _ *http.Request) {
		writeText(w, http.StatusOK, "outbox-streamer: /metrics /healthz /readyz")
	})
	return mux
}

func writeText(w http.ResponseWriter, code int, text string) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	_, _ = io.WriteString(w, strings.TrimSpace(text)+"\n")
}

// Probe requests url (a /healthz or /readyz address) and returns nil when it answers
// 200. It is meant for a `healthcheck` subcommand in images without a shell or curl
// (distroless), for Docker's HEALTHCHECK.
func Probe(ctx context.Context, url string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return fmt.Errorf("probe %s: %w", url, err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("probe %s: %w", url, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("probe %s: %s: %s", url, resp.Status, strings.TrimSpace(string(body)))
	}
	return nil
}
