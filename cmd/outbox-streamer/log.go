package main

import (
	"os"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/outbox-streamer/outbox-streamer/internal/config"
)

// logFor says who reads a command's log.
type logFor int

const (
	// forService: a long-running process whose log is its only output.
	forService logFor = iota
	// forPerson: a command that prints its result for a person; its log
	// shows only errors unless LOG_LEVEL or DEBUG asks for more, so that log
	// lines do not interleave with the result (which says what the warnings
	// would: run --sweep counts the rows that failed and points at
	// `failures`).
	forPerson
)

// newLogger returns the logger of a command: LOG_FORMAT and LOG_LEVEL (or
// DEBUG) applied, on stderr, each key once per line.
func newLogger(cfg *config.Config, who logFor) *zap.Logger {
	tty := isTerminal(os.Stderr)
	enc := newEncoder(cfg.LogFormat, tty)
	level := logLevel(cfg, who)
	core := uniqueKeys(zapcore.NewCore(enc, zapcore.Lock(os.Stderr), level))
	return zap.New(core).With(zap.String("environment", cfg.Environment))
}

// logLevel is the least severe level written.
func logLevel(cfg *config.Config, who logFor) zapcore.Level {
	level, err := zapcore.ParseLevel(cfg.LogLevel)
	if err != nil { // config.Load validated it; keep the default for a hand-made Config
		level = zapcore.InfoLevel
	}
	if who == forPerson && !cfg.LogLevelExplicit {
		level = zapcore.ErrorLevel
	}
	return level
}

// newEncoder is LOG_FORMAT's encoder: console for a person (coloured levels
// on a terminal), JSON for a log collector.
func newEncoder(format string, tty bool) zapcore.Encoder {
	if format == "console" || (format != "json" && tty) {
		ec := zap.NewDevelopmentEncoderConfig()
		ec.EncodeTime = zapcore.TimeEncoderOfLayout("2006-01-02 15:04:05.000")
		ec.EncodeCaller = nil
		ec.CallerKey = ""
		ec.ConsoleSeparator = "  "
		if tty {
			ec.EncodeLevel = zapcore.CapitalColorLevelEncoder
		}
		return zapcore.NewConsoleEncoder(ec)
	}
	ec := zap.NewProductionEncoderConfig()
	ec.TimeKey = "ts"
	ec.EncodeTime = zapcore.ISO8601TimeEncoder
	return zapcore.NewJSONEncoder(ec)
}

func isTerminal(f *os.File) bool {
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}

// uniqueKeys wraps core so that each key appears once per line: the first
// value given wins. Packages name their loggers with the fields they own
// (replication, leader and the slot poller add slot) and run's root logger
// carries the same fields for its own lines; JSON with a key twice is
// ambiguous to collectors, and the console format repeats it.
func uniqueKeys(core zapcore.Core) zapcore.Core {
	return &uniqueCore{Core: core, keys: map[string]struct{}{}}
}

type uniqueCore struct {
	zapcore.Core
	keys map[string]struct{} // keys already in the core's context
	// nested: a zap.Namespace was added; later keys belong to it, not to the
	// top level, and pass through.
	nested bool
}

func (c *uniqueCore) With(fields []zapcore.Field) zapcore.Core {
	keys := make(map[string]struct{}, len(c.keys)+len(fields))
	for k := range c.keys {
		keys[k] = struct{}{}
	}
	next := &uniqueCore{keys: keys, nested: c.nested}
	fields = next.fresh(fields)
	next.Core = c.Core.With(fields)
	return next
}

func (c *uniqueCore) Check(ent zapcore.Entry, ce *zapcore.CheckedEntry) *zapcore.CheckedEntry {
	if c.Enabled(ent.Level) {
		return ce.AddCore(ent, c)
	}
	return ce
}

func (c *uniqueCore) Write(ent zapcore.Entry, fields []zapcore.Field) error {
	seen := &uniqueCore{keys: make(map[string]struct{}, len(c.keys)), nested: c.nested}
	for k := range c.keys {
		seen.keys[k] = struct{}{}
	}
	return c.Core.Write(ent, seen.fresh(fields))
}

// fresh returns the fields whose keys c does not hold yet and records them.
func (c *uniqueCore) fresh(fields []zapcore.Field) []zapcore.Field {
	out := fields[:0:0]
	for _, f := range fields {
		if c.nested {
			out = append(out, f)
			continue
		}
		if _, dup := c.keys[f.Key]; dup {
			continue
		}
		c.keys[f.Key] = struct{}{}
		if f.Type == zapcore.NamespaceType {
			c.nested = true
		}
		out = append(out, f)
	}
	return out
}
