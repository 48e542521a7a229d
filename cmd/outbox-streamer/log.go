package main

import (
	"os"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/outbox-streamer/outbox-streamer/internal/config"
)

// newLogger returns JSON logs to stderr, or console logs when DEBUG is set and stderr
// is a terminal.
func newLogger(cfg *config.Config) *zap.Logger {
	level := zap.InfoLevel
	if cfg.Debug {
		level = zap.DebugLevel
	}
	var enc zapcore.Encoder
	if cfg.Debug && isTerminal(os.Stderr) {
		ec := zap.NewDevelopmentEncoderConfig()
		enc = zapcore.NewConsoleEncoder(ec)
	} else {
		ec := zap.NewProductionEncoderConfig()
		ec.TimeKey = "ts"
		ec.EncodeTime = zapcore.ISO8601TimeEncoder
		enc = zapcore.NewJSONEncoder(ec)
	}
	core := zapcore.NewCore(enc, zapcore.Lock(os.Stderr), level)
	return zap.New(core).With(zap.String("environment", cfg.Environment))
}

func isTerminal(f *os.File) bool {
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}
