package telemetry

import (
	"compress/gzip"
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel"
	colmetricpb "go.opentelemetry.io/proto/otlp/collector/metrics/v1"
	coltracepb "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	commonpb "go.opentelemetry.io/proto/otlp/common/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"go.uber.org/zap/zaptest"
	"google.golang.org/protobuf/proto"
)

// otlpReceiver is an in-process OTLP/HTTP collector: it decodes the protobuf export
// requests the SDK sends to /v1/traces and /v1/metrics.
type otlpReceiver struct {
	*httptest.Server
	mu      sync.Mutex
	spans   []*tracepb.Span
	res     []*commonpb.KeyValue
	metrics []string
	paths   []string
}

func newOTLPReceiver(t *testing.T) *otlpReceiver {
	r := &otlpReceiver{}
	r.Server = httptest.NewServer(http.HandlerFunc(r.handle))
	t.Cleanup(r.Close)
	return r
}

func (r *otlpReceiver) handle(w http.ResponseWriter, req *http.Request) {
	var body io.Reader = req.Body
	if req.Header.Get("Content-Encoding") == "gzip" {
		zr, err := gzip.NewReader(req.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		body = zr
	}
	raw, err := io.ReadAll(body)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	if ct := req.Header.Get("Content-Type"); ct != "application/x-protobuf" {
		http.Error(w, "unexpected content type "+ct, http.StatusUnsupportedMediaType)
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.paths = append(r.paths, req.URL.Path)
	var resp proto.Message
	switch req.URL.Path {
	case "/v1/traces":
		var er coltracepb.ExportTraceServiceRequest
		if err := proto.Unmarshal(raw, &er); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		for _, rs := range er.GetResourceSpans() {
			r.res = append(r.res, rs.GetResource().GetAttributes()...)
			for _, ss := range rs.GetScopeSpans() {
				r.spans = append(r.spans, ss.GetSpans()...)
			}
		}
		resp = &coltracepb.ExportTraceServiceResponse{}
	case "/v1/metrics":
		var er colmetricpb.ExportMetricsServiceRequest
		if err := proto.Unmarshal(raw, &er); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		for _, rm := range er.GetResourceMetrics() {
			for _, sm := range rm.GetScopeMetrics() {
				for _, m := range sm.GetMetrics() {
					r.metrics = append(r.metrics, m.GetName())
				}
			}
		}
		resp = &colmetricpb.ExportMetricsServiceResponse{}
	default:
		http.NotFound(w, req)
		return
	}
	out, _ := proto.Marshal(resp)
	w.Header().Set("Content-Type", "application/x-protobuf")
	_, _ = w.Write(out)
}

func (r *otlpReceiver) batchSpan() *tracepb.Span {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, s := range r.spans {
		if s.GetName() == SpanBatch {
			return s
		}
	}
	return nil
}

func attrs(kvs []*commonpb.KeyValue) map[string]any {
	m := map[string]any{}
	for _, kv := range kvs {
		v := kv.GetValue()
		switch {
		case v.GetStringValue() != "":
			m[kv.GetKey()] = v.GetStringValue()
		default:
			m[kv.GetKey()] = v.GetIntValue()
		}
	}
	return m
}

func TestBatchSpanReachesTheCollector(t *testing.T) {
	recv := newOTLPReceiver(t)
	reg := prometheus.NewRegistry()
	delivered := prometheus.NewCounter(prometheus.CounterOpts{Name: "outbox_streamer_rows_delivered_total", Help: "test"})
	reg.MustRegister(delivered)
	delivered.Add(1000)

	ctx := context.Background()
	shutdown, err := InitOTel(ctx, OTelConfig{
		Endpoint: recv.URL, ServiceVersion: "1.2.3", Environment: "test", Slot: "s1", Gatherer: reg,
	}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = shutdown(context.Background()) })

	bctx, span := StartBatchSpan(ctx, 1000, 0x16_B374D848, 0x16_B3800000)
	if len(TraceFields(bctx)) != 2 {
		t.Error("TraceFields found no span in the batch context")
	}
	RecordInsert(span, 1000, 12*time.Millisecond, errors.New("dial clickhouse://default:ch-pw@ch:9000: refused"))
	RecordInsert(span, 1000, 15*time.Millisecond, nil)
	RecordStatusUpdate(span, 1000, 3*time.Millisecond, nil)
	EndBatchSpan(span, 990, 5, 5, nil)

	// Shutdown flushes the batcher and the periodic reader: the export requests have
	// been answered when it returns.
	sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := shutdown(sctx); err != nil {
		t.Fatalf("shutdown: %v", err)
	}

	s := recv.batchSpan()
	if s == nil {
		t.Fatalf("no %q span received (paths %v)", SpanBatch, recv.paths)
	}
	got := attrs(s.GetAttributes())
	for k, want := range map[string]any{
		AttrRows: int64(1000), AttrFirstLSN: "16/B374D848", AttrLastLSN: "16/B3800000",
		AttrInserted: int64(990), AttrAlreadyPresent: int64(5), AttrFailed: int64(5),
	} {
		if got[k] != want {
			t.Errorf("span attribute %s = %#v, want %#v", k, got[k], want)
		}
	}
	var events []string
	for _, e := range s.GetEvents() {
		events = append(events, e.GetName())
		for _, kv := range e.GetAttributes() {
			if strings.Contains(kv.GetValue().GetStringValue(), "ch-pw") {
				t.Errorf("span event %s carries a password: %s", e.GetName(), kv.GetValue().GetStringValue())
			}
		}
	}
	if strings.Join(events, ",") != "clickhouse.insert,exception,clickhouse.insert,outbox.status_update" {
		t.Errorf("span events = %v", events)
	}
	res := attrs(recv.res)
	if res["service.name"] != "outbox-streamer" || res["service.version"] != "1.2.3" || res["outbox.slot"] != "s1" {
		t.Errorf("resource = %v", res)
	}

	recv.mu.Lock()
	metrics := strings.Join(recv.metrics, ",")
	recv.mu.Unlock()
	if !strings.Contains(metrics, "outbox_streamer_rows_delivered_total") {
		t.Errorf("the Prometheus registry was not exported over OTLP; metrics received: %s", metrics)
	}

	// After shutdown, spans are no-ops again.
	_, after := StartBatchSpan(ctx, 1, 0, 0)
	if after.IsRecording() {
		t.Error("spans still record after shutdown")
	}
	after.End()
}

func TestNoEndpointIsANoOp(t *testing.T) {
	shutdown, err := InitOTel(context.Background(), OTelConfig{}, nil)
	if err != nil || shutdown == nil {
		t.Fatalf("InitOTel without endpoint = %v", err)
	}
	if err := shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	ctx, span := StartBatchSpan(context.Background(), 10, 1, 2)
	if span.IsRecording() {
		t.Error("a span records without an endpoint")
	}
	RecordInsert(span, 10, time.Millisecond, nil)
	RecordStatusUpdate(span, 10, time.Millisecond, errors.New("x"))
	EndBatchSpan(span, 10, 0, 0, nil)
	if TraceFields(ctx) != nil {
		t.Error("TraceFields of a no-op span")
	}
	if _, ok := otel.GetTracerProvider().(interface{ ForceFlush(context.Context) error }); ok {
		t.Error("an SDK tracer provider is installed without an endpoint")
	}
}

func TestParseOTLPEndpoint(t *testing.T) {
	for _, c := range []struct {
		in       string
		host     string
		path     string
		insecure bool
		bad      bool
	}{
		{in: "http://otel-collector:4318", host: "otel-collector:4318", insecure: true},
		{in: "http://otel-collector:4318/", host: "otel-collector:4318", insecure: true},
		{in: "https://otlp.example.com/otlp", host: "otlp.example.com", path: "/otlp"},
		{in: "otel-collector:4318", host: "otel-collector:4318", insecure: true},
		{in: "grpc://otel:4317", bad: true},
		{in: "http://", bad: true},
	} {
		got, err := parseOTLPEndpoint(c.in)
		if c.bad {
			if err == nil {
				t.Errorf("%q accepted", c.in)
			}
			continue
		}
		if err != nil || got.host != c.host || got.path != c.path || got.insecure != c.insecure {
			t.Errorf("parseOTLPEndpoint(%q) = %+v, %v", c.in, got, err)
		}
	}
}

func TestFormatLSN(t *testing.T) {
	if got := FormatLSN(0x16_B374D848); got != "16/B374D848" {
		t.Errorf("FormatLSN = %s", got)
	}
	if got := FormatLSN(0); got != "0/0" {
		t.Errorf("FormatLSN(0) = %s", got)
	}
}
