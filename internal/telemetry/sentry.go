// Package telemetry connects the streamer to Sentry (errors) and OpenTelemetry
// (traces and metrics over OTLP). Both are optional: without a Sentry DSN or an OTLP
// endpoint every function here is a cheap no-op, so callers need no conditions.
//
// Secrets never leave the process: fields whose key names a password, DSN, secret or
// token are replaced by "[redacted]", and passwords inside URLs (postgres://u:pw@h)
// or key=value connection strings are masked in every message and error text sent.
package telemetry

import (
	"errors"
	"fmt"
	"regexp"
	"strings"
	"time"

	"github.com/getsentry/sentry-go"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// sentryFlushTimeout bounds how long a flush waits for Sentry at shutdown: a slow or
// unreachable Sentry must not hold up a SIGTERM drain.
const sentryFlushTimeout = 3 * time.Second

// InitSentry configures the global Sentry hub with dsn (SENTRY_CONFIG_DSN),
// environment (SENTRY_CONFIG_ENVIRONMENT) and release (the build version). With an
// empty dsn it does nothing. flush, never nil, sends what is queued (bounded by a few
// seconds); call it before the process exits.
func InitSentry(dsn, environment, release string) (flush func(), err error) {
	if dsn == "" {
		return func() {}, nil
	}
	err = sentry.Init(sentry.ClientOptions{
		Dsn:         dsn,
		Environment: environment,
		Release:     release,
		// Stack traces of where an error was logged are what makes a Sentry issue
		// actionable; personal data (IP addresses, request bodies) is never needed.
		AttachStacktrace: true,
		SendDefaultPII:   false,
		BeforeSend: func(ev *sentry.Event, _ *sentry.EventHint) *sentry.Event {
			scrubEvent(ev)
			return ev
		},
	})
	if err != nil {
		// The DSN itself holds the project key: do not repeat it in the error.
		return func() {}, fmt.Errorf("initialise Sentry (SENTRY_CONFIG_DSN): %w", errors.New(Redact(err.Error())))
	}
	return func() { sentry.Flush(sentryFlushTimeout) }, nil
}

// WithSentry returns log extended with a core that sends entries at Error level and
// above to the Sentry hub configured by InitSentry, or log itself when Sentry is not
// configured.
func WithSentry(log *zap.Logger) *zap.Logger {
	hub := sentry.CurrentHub()
	// An unbound hub holds a disabled no-op client, not nil.
	if c := hub.Client(); !c.IsEnabled() || c.Options().Dsn == "" {
		return log
	}
	core := NewSentryCore(hub, zapcore.ErrorLevel)
	return log.WithOptions(zap.WrapCore(func(c zapcore.Core) zapcore.Core {
		return zapcore.NewTee(c, core)
	}))
}

// NewSentryCore returns a zap core sending entries enabled by min to hub as Sentry
// events. The entry's fields (and those added with With, such as slot) go into the
// event's "fields" context, a few well-known ones (slot, stage, environment) also
// become tags, and an error field becomes the event's exception.
func NewSentryCore(hub *sentry.Hub, min zapcore.LevelEnabler) zapcore.Core {
	return &sentryCore{hub: hub, min: min}
}

type sentryCore struct {
	hub    *sentry.Hub
	min    zapcore.LevelEnabler
	fields []zapcore.Field
}

// tagKeys are fields promoted to Sentry tags, which can be searched and grouped by.
var tagKeys = []string{"slot", "stage", "environment", "table"}

func (c *sentryCore) Enabled(l zapcore.Level) bool { return c.min.Enabled(l) }

func (c *sentryCore) With(fields []zapcore.Field) zapcore.Core {
	all := make([]zapcore.Field, 0, len(c.fields)+len(fields))
	all = append(append(all, c.fields...), fields...)
	return &sentryCore{hub: c.hub, min: c.min, fields: all}
}

func (c *sentryCore) Check(ent zapcore.Entry, ce *zapcore.CheckedEntry) *zapcore.CheckedEntry {
	if c.Enabled(ent.Level) {
		return ce.AddCore(ent, c)
	}
	return ce
}

func (c *sentryCore) Write(ent zapcore.Entry, fields []zapcore.Field) error {
	enc := zapcore.NewMapObjectEncoder()
	var logged error
	for _, f := range append(c.fields[:len(c.fields):len(c.fields)], fields...) {
		if f.Type == zapcore.ErrorType && logged == nil {
			if err, ok := f.Interface.(error); ok {
				logged = err
			}
		}
		if isSecretKey(f.Key) {
			// Never even encode the value: an ObjectMarshaler could put it anywhere.
			enc.AddString(f.Key, redacted)
			continue
		}
		f.AddTo(enc)
	}
	ctx := scrubMap(enc.Fields)

	ev := sentry.NewEvent()
	ev.Level = sentryLevel(ent.Level)
	ev.Message = Redact(ent.Message)
	ev.Logger = ent.LoggerName
	ev.Timestamp = ent.Time
	if len(ctx) > 0 {
		ev.Contexts["fields"] = ctx
	}
	for _, k := range tagKeys {
		if v, ok := ctx[k].(string); ok {
			ev.Tags[k] = v
		}
	}
	if logged != nil {
		ev.SetException(logged, 10)
	}
	// The stack of the logging call site: errors here are plain wrapped errors
	// without stack traces of their own.
	st := callerStack()
	if n := len(ev.Exception); n > 0 {
		ev.Exception[n-1].Stacktrace = st
	} else {
		ev.Threads = []sentry.Thread{{Stacktrace: st, Current: true}}
	}
	c.hub.CaptureEvent(ev)
	if ent.Level > zapcore.ErrorLevel {
		// DPanic/Panic/Fatal: the process may be about to end; send now.
		c.hub.Flush(sentryFlushTimeout)
	}
	return nil
}

// selfModule is this package's import path as Sentry stack frames name it.
const selfModule = "github.com/outbox-streamer/outbox-streamer/internal/telemetry"

// callerStack is the current stack without the frames of zap and of this core, so the
// top frame is the code that logged.
func callerStack() *sentry.Stacktrace {
	st := sentry.NewStacktrace()
	if st == nil {
		return nil
	}
	frames := st.Frames[:0]
	for _, f := range st.Frames {
		own := f.Module == selfModule && (strings.HasPrefix(f.Function, "(*sentryCore)") || f.Function == "callerStack")
		if own || strings.HasPrefix(f.Module, "go.uber.org/zap") {
			continue
		}
		frames = append(frames, f)
	}
	st.Frames = frames
	return st
}

// Sync flushes queued events, so that logger.Sync() at exit also empties the Sentry
// queue.
func (c *sentryCore) Sync() error {
	c.hub.Flush(sentryFlushTimeout)
	return nil
}

func sentryLevel(l zapcore.Level) sentry.Level {
	switch {
	case l >= zapcore.FatalLevel:
		return sentry.LevelFatal
	case l >= zapcore.ErrorLevel:
		return sentry.LevelError
	case l == zapcore.WarnLevel:
		return sentry.LevelWarning
	case l == zapcore.InfoLevel:
		return sentry.LevelInfo
	default:
		return sentry.LevelDebug
	}
}

const redacted = "[redacted]"

// secretWords mark a key whose value must not leave the process.
var secretWords = []string{"password", "passwd", "pwd", "dsn", "secret", "token", "credential", "authorization", "api_key", "apikey"}

func isSecretKey(key string) bool {
	k := strings.ToLower(key)
	for _, w := range secretWords {
		if strings.Contains(k, w) {
			return true
		}
	}
	return false
}

var (
	// scheme://user:password@host → scheme://user:[redacted]@host
	urlPassword = regexp.MustCompile(`([A-Za-z][A-Za-z0-9+.\-]*://[^:/?#@\s]*:)[^@\s/]*@`)
	// password=secret in key/value connection strings (libpq, ClickHouse DSNs)
	kvPassword = regexp.MustCompile(`(?i)\b(password|passwd|pwd|secret|token)(\s*[=:]\s*)('[^']*'|"[^"]*"|[^\s&;,]+)`)
)

// Redact masks passwords in URLs and key=value connection strings within s.
func Redact(s string) string {
	s = urlPassword.ReplaceAllString(s, "${1}"+redacted+"@")
	return kvPassword.ReplaceAllString(s, "${1}${2}"+redacted)
}

// scrubMap redacts secret keys and passwords in string values, recursively.
func scrubMap(m map[string]any) map[string]any {
	for k, v := range m {
		if isSecretKey(k) {
			m[k] = redacted
			continue
		}
		m[k] = scrubValue(v)
	}
	return m
}

func scrubValue(v any) any {
	switch x := v.(type) {
	case string:
		return Redact(x)
	case map[string]any:
		return scrubMap(x)
	case []any:
		for i := range x {
			x[i] = scrubValue(x[i])
		}
		return x
	case error:
		return Redact(x.Error())
	case fmt.Stringer:
		return Redact(x.String())
	}
	return v
}

// scrubEvent is the last line of defence (BeforeSend) for every event, including
// those captured outside the zap core.
func scrubEvent(ev *sentry.Event) {
	ev.Message = Redact(ev.Message)
	for i := range ev.Exception {
		ev.Exception[i].Value = Redact(ev.Exception[i].Value)
	}
	for name, c := range ev.Contexts {
		ev.Contexts[name] = scrubMap(c)
	}
	for k, v := range ev.Tags {
		if isSecretKey(k) {
			ev.Tags[k] = redacted
		} else {
			ev.Tags[k] = Redact(v)
		}
	}
	for _, b := range ev.Breadcrumbs {
		if b == nil {
			continue
		}
		b.Message = Redact(b.Message)
		b.Data = scrubMap(b.Data)
	}
	if ev.Request != nil {
		ev.Request.URL = Redact(ev.Request.URL)
		ev.Request.Cookies = ""
		ev.Request.Headers = nil
	}
}
