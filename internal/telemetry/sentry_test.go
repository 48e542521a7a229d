package telemetry

import (
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/getsentry/sentry-go"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
)

// sentryServer is a fake Sentry ingest endpoint that keeps every envelope it receives.
type sentryServer struct {
	*httptest.Server
	mu     sync.Mutex
	bodies []string
}

func newSentryServer(t *testing.T) *sentryServer {
	s := &sentryServer{}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var body io.Reader = r.Body
		if r.Header.Get("Content-Encoding") == "gzip" {
			zr, err := gzip.NewReader(r.Body)
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			body = zr
		}
		b, _ := io.ReadAll(body)
		if strings.HasSuffix(r.URL.Path, "/envelope/") {
			s.mu.Lock()
			s.bodies = append(s.bodies, string(b))
			s.mu.Unlock()
		}
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, `{}`)
	}))
	t.Cleanup(s.Close)
	return s
}

func (s *sentryServer) all() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return strings.Join(s.bodies, "\n")
}

// dsn points a Sentry client at the fake server, project 1.
func (s *sentryServer) dsn() string {
	return strings.Replace(s.URL, "http://", "http://publickey@", 1) + "/1"
}

// resetSentry unbinds the global client so tests do not leak into each other.
func resetSentry(t *testing.T) {
	t.Cleanup(func() { sentry.CurrentHub().BindClient(nil) })
}

func TestErrorLogsReachSentryWithoutSecrets(t *testing.T) {
	srv := newSentryServer(t)
	resetSentry(t)
	flush, err := InitSentry(srv.dsn(), "staging", "outbox-streamer@1.2.3")
	if err != nil {
		t.Fatal(err)
	}
	log := WithSentry(zaptest.NewLogger(t)).Named("writer").With(zap.String("slot", "outbox_slot_7f3a"))

	log.Info("an info line that must stay local")
	log.Warn("a warning that must stay local")
	cause := errors.New(`dial postgres://app:pg-url-secret-1@db:5432/outbox: connection refused`)
	log.Error("insert into clickhouse failed",
		zap.String("lsn", "16/B374D848"),
		zap.Int("rows", 1000),
		zap.String("password", "hunter2-field-secret"),
		zap.String("DATABASE_URL", "postgres://app:dsn-field-secret@db/outbox"),
		zap.String("clickhouse_dsn", "clickhouse://default:ch-dsn-secret@ch:9000"),
		zap.String("conninfo", "host=db user=app password=kv-secret-3 dbname=outbox"),
		zap.Error(fmt.Errorf("mark rows processed: %w", cause)),
	)
	flush()

	// The transport sends in the background; flush waits for it, and the loop is a
	// bounded guard against a slow handler.
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(srv.all(), "insert into clickhouse failed") && time.Now().Before(deadline) {
		flush()
	}
	body := srv.all()
	for _, want := range []string{
		"insert into clickhouse failed", // the message
		"outbox_slot_7f3a",              // a field added with With, as context and tag
		"16/B374D848",                   // a field of the entry
		`"environment":"staging"`,
		"outbox-streamer@1.2.3",
		"connection refused", // the error, as the exception
		`"logger":"writer"`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("Sentry did not receive %q; got:\n%.3000s", want, body)
		}
	}
	for _, secret := range []string{"hunter2-field-secret", "dsn-field-secret", "ch-dsn-secret", "kv-secret-3", "pg-url-secret-1"} {
		if strings.Contains(body, secret) {
			t.Errorf("Sentry received the secret %q", secret)
		}
	}
	for _, local := range []string{"an info line", "a warning that"} {
		if strings.Contains(body, local) {
			t.Errorf("Sentry received a log below Error: %q", local)
		}
	}
}

func TestInitSentryWithoutDSNIsANoOp(t *testing.T) {
	resetSentry(t)
	sentry.CurrentHub().BindClient(nil)
	flush, err := InitSentry("", "prod", "v1")
	if err != nil || flush == nil {
		t.Fatalf("InitSentry(\"\") = flush %t, %v", flush != nil, err)
	}
	flush()
	base := zap.NewNop()
	if got := WithSentry(base); got != base {
		t.Error("WithSentry changed the logger although Sentry is not configured")
	}
}

func TestInitSentryRejectsABadDSNWithoutEchoingIt(t *testing.T) {
	resetSentry(t)
	_, err := InitSentry("not a dsn://key:hush-7@", "prod", "v1")
	if err == nil {
		t.Fatal("a malformed DSN was accepted")
	}
	if strings.Contains(err.Error(), "hush-7") || !strings.Contains(err.Error(), "SENTRY_CONFIG_DSN") {
		t.Errorf("error = %q: want it to name SENTRY_CONFIG_DSN and not echo secrets", err)
	}
}

// TestSentryCoreLevels checks the core's filtering and fields without the network,
// through a hub whose transport records events.
func TestSentryCoreLevels(t *testing.T) {
	tr := &recordingTransport{}
	client, err := sentry.NewClient(sentry.ClientOptions{Dsn: "http://k@127.0.0.1:1/1", Transport: tr,
		BeforeSend: func(ev *sentry.Event, _ *sentry.EventHint) *sentry.Event { scrubEvent(ev); return ev }})
	if err != nil {
		t.Fatal(err)
	}
	hub := sentry.NewHub(client, sentry.NewScope())
	core := NewSentryCore(hub, zapcore.ErrorLevel).With([]zapcore.Field{zap.String("slot", "s1")})
	log := zap.New(core)
	log.Warn("not sent")
	log.Error("sent", zap.Object("conn", zapcore.ObjectMarshalerFunc(func(e zapcore.ObjectEncoder) error {
		e.AddString("host", "db")
		e.AddString("password", "nested-secret")
		return nil
	})), zap.Uint64("lsn", 42))
	_ = log.Sync()

	evs := tr.events()
	if len(evs) != 1 {
		t.Fatalf("%d events sent, want 1", len(evs))
	}
	ev := evs[0]
	if ev.Message != "sent" || ev.Level != sentry.LevelError || ev.Tags["slot"] != "s1" {
		t.Errorf("event = message %q level %q tags %v", ev.Message, ev.Level, ev.Tags)
	}
	fields := ev.Contexts["fields"]
	if fields["lsn"] != uint64(42) {
		t.Errorf("lsn field = %#v", fields["lsn"])
	}
	conn, _ := fields["conn"].(map[string]any)
	if conn["host"] != "db" || conn["password"] != redacted {
		t.Errorf("nested object = %#v, want host kept and password redacted", conn)
	}
	if len(ev.Threads) == 0 || ev.Threads[0].Stacktrace == nil || len(ev.Threads[0].Stacktrace.Frames) == 0 {
		t.Fatal("no stack trace of the logging call site")
	}
	// Sentry shows the last frame as the top: it must be this test, not zap.
	frames := ev.Threads[0].Stacktrace.Frames
	if top := frames[len(frames)-1]; top.Function != "TestSentryCoreLevels" {
		t.Errorf("top frame is %s.%s, want the logging call site", top.Module, top.Function)
	}
}

type recordingTransport struct {
	mu  sync.Mutex
	evs []*sentry.Event
}

func (r *recordingTransport) Configure(sentry.ClientOptions) {}
func (r *recordingTransport) SendEvent(ev *sentry.Event) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.evs = append(r.evs, ev)
}
func (r *recordingTransport) Flush(time.Duration) bool              { return true }
func (r *recordingTransport) FlushWithContext(context.Context) bool { return true }
func (r *recordingTransport) Close()                                {}
func (r *recordingTransport) events() []*sentry.Event {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]*sentry.Event(nil), r.evs...)
}

func TestRedact(t *testing.T) {
	for in, want := range map[string]string{
		"postgres://app:pw@db:5432/x":                   "postgres://app:[redacted]@db:5432/x",
		"dial tcp://u:p%40ss@h:9000 failed":             "dial tcp://u:[redacted]@h:9000 failed",
		"postgres://app@db/x":                           "postgres://app@db/x",
		"http://collector:4318/v1/traces":               "http://collector:4318/v1/traces",
		"host=db password=s3cr3t user=app":              "host=db password=[redacted] user=app",
		"password='two words' dbname=x":                 "password=[redacted] dbname=x",
		"PASSWORD: abc":                                 "PASSWORD: [redacted]",
		"password authentication failed for user \"x\"": "password authentication failed for user \"x\"",
		"clickhouse://default:@ch:9000/db":              "clickhouse://default:[redacted]@ch:9000/db",
	} {
		if got := Redact(in); got != want {
			t.Errorf("Redact(%q) = %q, want %q", in, got, want)
		}
	}
	if !isSecretKey("CLICKHOUSE_PASSWORD") || !isSecretKey("sentry_dsn") || !isSecretKey("clientSecret") || isSecretKey("slot") {
		t.Error("isSecretKey misclassifies")
	}
}
