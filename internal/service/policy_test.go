package service

import (
	"context"
	"errors"
	"fmt"
	"io"
	"testing"

	"github.com/jackc/pgerrcode"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/outbox-streamer/outbox-streamer/replication"
)

func TestRestartPolicy(t *testing.T) {
	for _, tc := range []struct {
		name                string
		err                 error
		wantTransient, busy bool
	}{
		{"leader lost", fmt.Errorf("stream: %w", errLeaderLost), true, false},
		{"writer stopped", fmt.Errorf("run: %w", replication.ErrWriterStopped), true, false},
		{"slot in use (precondition)", replication.SlotInUseError("s", 42), true, true},
		{"slot in use (server)", fmt.Errorf("start: %w", &pgconn.PgError{Code: pgerrcode.ObjectInUse}), true, true},
		{"other precondition", &replication.PreconditionError{Problem: "wal_level", Hint: "set it"}, false, false},
		{"malformed message", fmt.Errorf("decode: %w", replication.ErrMalformed), false, false},
		{"connection dropped", fmt.Errorf("receive: %w", io.ErrUnexpectedEOF), true, false},
		{"admin shutdown", &pgconn.PgError{Code: pgerrcode.AdminShutdown}, true, false},
		{"undefined table", &pgconn.PgError{Code: pgerrcode.UndefinedTable}, false, false},
		{"canceled", context.Canceled, false, false},
		{"plain", errors.New("bad setting"), false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := transient(tc.err); got != tc.wantTransient {
				t.Errorf("transient(%v) = %v, want %v", tc.err, got, tc.wantTransient)
			}
			if got := slotBusy(tc.err); got != tc.busy {
				t.Errorf("slotBusy(%v) = %v, want %v", tc.err, got, tc.busy)
			}
		})
	}
}
