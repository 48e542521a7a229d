package telemetry

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"sync"
	"time"

	promBridge "go.opentelemetry.io/contrib/bridges/prometheus"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/exporters/otlp/otlpmetric/otlpmetrichttp"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	metricnoop "go.opentelemetry.io/otel/metric/noop"
	"go.opentelemetry.io/otel/propagation"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
	tracenoop "go.opentelemetry.io/otel/trace/noop"
	"go.uber.org/zap"

	"github.com/prometheus/client_golang/prometheus"
)

// TracerName is the instrumentation scope of the streamer's spans.
const TracerName = "github.com/outbox-streamer/outbox-streamer"

// Span and attribute names of a batch.
const (
	SpanBatch = "outbox.batch"

	AttrRows           = "outbox.batch.rows"
	AttrFirstLSN       = "outbox.batch.first_lsn"
	AttrLastLSN        = "outbox.batch.last_lsn"
	AttrInserted       = "outbox.batch.inserted"
	AttrAlreadyPresent = "outbox.batch.already_present"
	AttrFailed         = "outbox.batch.failed"

	EventInsert       = "clickhouse.insert"
	EventStatusUpdate = "outbox.status_update"
)

// OTelConfig configures OpenTelemetry export.
type OTelConfig struct {
	// Endpoint is the OTLP/HTTP base URL (OTEL_EXPORTER_OTLP_ENDPOINT), e.g.
	// http://otel-collector:4318; traces go to <Endpoint>/v1/traces and metrics to
	// <Endpoint>/v1/metrics, as the OpenTelemetry specification defines for this
	// variable. http:// is sent in clear text, https:// with TLS; a bare host:port
	// means http://. Empty: OpenTelemetry stays a no-op.
	//
	// Only OTLP over HTTP (protobuf) is spoken, normally on port 4318: it needs no
	// gRPC stack in the binary and every collector accepts it. The gRPC port 4317
	// does not answer HTTP.
	Endpoint string
	// ServiceName is the service.name resource attribute (default "outbox-streamer").
	ServiceName string
	// ServiceVersion is service.version (the build version), if known.
	ServiceVersion string
	// Environment is deployment.environment.name (ENVIRONMENT).
	Environment string
	// Slot, if set, is recorded as the resource attribute outbox.slot.
	Slot string
	// Gatherer, when set (Metrics.Registry), has its Prometheus metrics exported over
	// OTLP as well, through the Prometheus bridge: the same numbers as /metrics, with
	// no second set of instruments to keep in step.
	Gatherer prometheus.Gatherer
	// MetricInterval is the period of metric export (default 60 s).
	MetricInterval time.Duration
}

// InitOTel installs a global TracerProvider (and, with a Gatherer, MeterProvider)
// exporting over OTLP/HTTP to cfg.Endpoint. Export errors are logged through log at
// most once a minute, not returned: telemetry must never stop the pipeline. With an
// empty endpoint it installs nothing. shutdown, never nil, flushes what is queued and
// restores the no-op providers; give it a bounded context.
func InitOTel(ctx context.Context, cfg OTelConfig, log *zap.Logger) (shutdown func(context.Context) error, err error) {
	noop := func(context.Context) error { return nil }
	if cfg.Endpoint == "" {
		return noop, nil
	}
	if log == nil {
		log = zap.NewNop()
	}
	log = log.Named("otel")
	target, err := parseOTLPEndpoint(cfg.Endpoint)
	if err != nil {
		return noop, err
	}
	if target.port == "4317" {
		log.Warn("OTEL_EXPORTER_OTLP_ENDPOINT points at port 4317, the collector's gRPC port; this exporter speaks OTLP/HTTP (usually port 4318)",
			zap.String("endpoint", Redact(cfg.Endpoint)))
	}
	if cfg.ServiceName == "" {
		cfg.ServiceName = "outbox-streamer"
	}
	if cfg.MetricInterval <= 0 {
		cfg.MetricInterval = time.Minute
	}

	attrs := []attribute.KeyValue{attribute.String("service.name", cfg.ServiceName)}
	if cfg.ServiceVersion != "" {
		attrs = append(attrs, attribute.String("service.version", cfg.ServiceVersion))
	}
	if cfg.Environment != "" {
		attrs = append(attrs, attribute.String("deployment.environment.name", cfg.Environment))
	}
	if cfg.Slot != "" {
		attrs = append(attrs, attribute.String("outbox.slot", cfg.Slot))
	}
	// OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME (read by WithFromEnv) override ours,
	// as users of OpenTelemetry expect.
	res, err := resource.New(ctx, resource.WithAttributes(attrs...), resource.WithFromEnv(),
		resource.WithTelemetrySDK(), resource.WithHost())
	if err != nil && res == nil {
		return noop, fmt.Errorf("build OpenTelemetry resource: %w", err)
	}

	traceOpts := []otlptracehttp.Option{otlptracehttp.WithEndpoint(target.host), otlptracehttp.WithURLPath(target.path + "/v1/traces")}
	if target.insecure {
		traceOpts = append(traceOpts, otlptracehttp.WithInsecure())
	}
	// New does not connect: an unreachable collector shows up as export errors later.
	texp, err := otlptracehttp.New(ctx, traceOpts...)
	if err != nil {
		return noop, fmt.Errorf("create OTLP trace exporter for %s: %w", Redact(cfg.Endpoint), err)
	}
	tp := sdktrace.NewTracerProvider(sdktrace.WithBatcher(texp), sdktrace.WithResource(res))

	var mp *sdkmetric.MeterProvider
	if cfg.Gatherer != nil {
		metricOpts := []otlpmetrichttp.Option{otlpmetrichttp.WithEndpoint(target.host), otlpmetrichttp.WithURLPath(target.path + "/v1/metrics")}
		if target.insecure {
			metricOpts = append(metricOpts, otlpmetrichttp.WithInsecure())
		}
		mexp, err := otlpmetrichttp.New(ctx, metricOpts...)
		if err != nil {
			_ = tp.Shutdown(ctx)
			return noop, fmt.Errorf("create OTLP metric exporter for %s: %w", Redact(cfg.Endpoint), err)
		}
		reader := sdkmetric.NewPeriodicReader(mexp, sdkmetric.WithInterval(cfg.MetricInterval),
			sdkmetric.WithProducer(promBridge.NewMetricProducer(promBridge.WithGatherer(cfg.Gatherer))))
		mp = sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader), sdkmetric.WithResource(res))
		otel.SetMeterProvider(mp)
	}
	otel.SetTracerProvider(tp)
	otel.SetTextMapPropagator(propagation.NewCompositeTextMapPropagator(propagation.TraceContext{}, propagation.Baggage{}))
	otel.SetErrorHandler(newErrorHandler(log, time.Minute))
	log.Info("exporting traces over OTLP/HTTP", zap.String("endpoint", Redact(cfg.Endpoint)), zap.Bool("metrics", mp != nil))

	return func(ctx context.Context) error {
		// Restore the no-op providers first: spans started after this point must
		// not go to a provider that is shutting down.
		otel.SetTracerProvider(tracenoop.NewTracerProvider())
		var errs []error
		if err := tp.Shutdown(ctx); err != nil {
			errs = append(errs, fmt.Errorf("flush traces: %w", err))
		}
		if mp != nil {
			otel.SetMeterProvider(metricnoop.NewMeterProvider())
			if err := mp.Shutdown(ctx); err != nil {
				errs = append(errs, fmt.Errorf("flush metrics: %w", err))
			}
		}
		return errors.Join(errs...)
	}, nil
}

type otlpTarget struct {
	host, port, path string
	insecure         bool
}

// parseOTLPEndpoint splits an OTLP/HTTP base URL into what the exporters take.
func parseOTLPEndpoint(endpoint string) (otlpTarget, error) {
	raw := endpoint
	if !strings.Contains(raw, "://") {
		raw = "http://" + raw
	}
	u, err := url.Parse(raw)
	if err != nil || u.Host == "" {
		return otlpTarget{}, fmt.Errorf("invalid OTEL_EXPORTER_OTLP_ENDPOINT %q: want a URL such as http://otel-collector:4318", Redact(endpoint))
	}
	t := otlpTarget{host: u.Host, port: u.Port(), path: strings.TrimSuffix(u.Path, "/")}
	switch u.Scheme {
	case "http":
		t.insecure = true
	case "https":
	default:
		return otlpTarget{}, fmt.Errorf("invalid OTEL_EXPORTER_OTLP_ENDPOINT %q: scheme %q, want http or https (OTLP over HTTP)", Redact(endpoint), u.Scheme)
	}
	return t, nil
}

// errorHandler logs OpenTelemetry's internal errors (failed exports) at most once per
// interval, counting the ones it drops, so a collector that is down for an hour does
// not flood the logs.
type errorHandler struct {
	log      *zap.Logger
	interval time.Duration

	mu      sync.Mutex
	last    time.Time
	dropped int
}

func newErrorHandler(log *zap.Logger, interval time.Duration) *errorHandler {
	return &errorHandler{log: log, interval: interval}
}

// Handle implements otel.ErrorHandler.
func (h *errorHandler) Handle(err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if now := time.Now(); now.Sub(h.last) >= h.interval {
		h.log.Warn("OpenTelemetry export failed", zap.String("error", Redact(err.Error())), zap.Int("suppressed_since_last", h.dropped))
		h.last, h.dropped = now, 0
		return
	}
	h.dropped++
}

// FormatLSN renders an LSN as PostgreSQL does (16/B374D848).
func FormatLSN(lsn uint64) string {
	return fmt.Sprintf("%X/%X", uint32(lsn>>32), uint32(lsn))
}

// StartBatchSpan starts the span of one batch through the writer: rows rows whose
// commit LSNs run from firstLSN to lastLSN. End it with EndBatchSpan. Without an OTLP
// endpoint the span is a no-op.
func StartBatchSpan(ctx context.Context, rows int, firstLSN, lastLSN uint64) (context.Context, trace.Span) {
	return otel.Tracer(TracerName).Start(ctx, SpanBatch,
		trace.WithSpanKind(trace.SpanKindInternal),
		trace.WithAttributes(
			attribute.Int(AttrRows, rows),
			attribute.String(AttrFirstLSN, FormatLSN(firstLSN)),
			attribute.String(AttrLastLSN, FormatLSN(lastLSN)),
		))
}

// RecordInsert adds an event for one ClickHouse insert of rows rows that took d. A
// failed attempt (err != nil) is recorded as an exception event without failing the
// span: the writer may retry it.
func RecordInsert(span trace.Span, rows int, d time.Duration, err error) {
	recordStep(span, EventInsert, rows, d, err)
}

// RecordStatusUpdate adds an event for one update of rows outbox rows' status that
// took d; err as for RecordInsert.
func RecordStatusUpdate(span trace.Span, rows int, d time.Duration, err error) {
	recordStep(span, EventStatusUpdate, rows, d, err)
}

func recordStep(span trace.Span, name string, rows int, d time.Duration, err error) {
	if !span.IsRecording() {
		return
	}
	attrs := []attribute.KeyValue{
		attribute.Int("rows", rows),
		attribute.Float64("duration_ms", float64(d)/float64(time.Millisecond)),
		attribute.Bool("ok", err == nil),
	}
	span.AddEvent(name, trace.WithAttributes(attrs...))
	if err != nil {
		recordError(span, err)
	}
}

// EndBatchSpan records the batch's outcome and ends the span. err is the error that
// stopped the batch, if any; the span's status is then Error.
func EndBatchSpan(span trace.Span, inserted, alreadyPresent, failed int, err error) {
	if span.IsRecording() {
		span.SetAttributes(
			attribute.Int(AttrInserted, inserted),
			attribute.Int(AttrAlreadyPresent, alreadyPresent),
			attribute.Int(AttrFailed, failed),
		)
		if err != nil {
			recordError(span, err)
			span.SetStatus(codes.Error, Redact(err.Error()))
		}
	}
	span.End()
}

// recordError is span.RecordError with the message scrubbed of passwords.
func recordError(span trace.Span, err error) {
	span.AddEvent("exception", trace.WithAttributes(
		attribute.String("exception.type", fmt.Sprintf("%T", err)),
		attribute.String("exception.message", Redact(err.Error())),
	))
}

// TraceFields returns zap fields naming the trace and span in ctx, to correlate logs
// with traces; none when ctx carries no sampled span.
func TraceFields(ctx context.Context) []zap.Field {
	sc := trace.SpanContextFromContext(ctx)
	if !sc.IsValid() {
		return nil
	}
	return []zap.Field{zap.String("trace_id", sc.TraceID().String()), zap.String("span_id", sc.SpanID().String())}
}
