package fault

import (
	"context"
	"errors"
	"fmt"
	"io"
	"syscall"
	"testing"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/jackc/pgerrcode"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

func TestOf(t *testing.T) {
	pg := func(code string) error { return fmt.Errorf("wrapped: %w", &pgconn.PgError{Code: code}) }
	ch := func(code int32) error { return fmt.Errorf("insert: %w", &clickhouse.Exception{Code: code}) }
	for _, c := range []struct {
		name string
		err  error
		want Kind
	}{
		{"admin shutdown", pg(pgerrcode.AdminShutdown), Transient},
		{"cannot connect now", pg(pgerrcode.CannotConnectNow), Transient},
		{"connection failure", pg(pgerrcode.ConnectionFailure), Transient},
		{"too many connections", pg(pgerrcode.TooManyConnections), Transient},
		{"serialization", pg(pgerrcode.SerializationFailure), Transient},
		{"slot in use", pg(pgerrcode.ObjectInUse), Transient},
		{"lock timeout", pg(pgerrcode.LockNotAvailable), Transient},
		{"undefined table", pg(pgerrcode.UndefinedTable), Permanent},
		{"bad encoding", pg(pgerrcode.CharacterNotInRepertoire), Permanent},
		{"no rows", pgx.ErrNoRows, Permanent},
		{"bad dsn", &pgconn.ParseConfigError{}, Permanent},
		{"refused", fmt.Errorf("dial: %w", syscall.ECONNREFUSED), Transient},
		{"eof", io.ErrUnexpectedEOF, Transient},
		{"deadline", context.DeadlineExceeded, Transient},
		{"canceled", fmt.Errorf("x: %w", context.Canceled), Canceled},
		{"clickhouse timeout", ch(chTimeoutExceeded), Transient},
		{"clickhouse cut stream", ch(chAttemptToReadAfterEOF), Transient},
		{"clickhouse unknown insert status", ch(chUnknownStatusOfInsert), Transient},
		{"clickhouse parse", ch(chCannotParseText), Rejected},
		{"clickhouse too many parts", ch(chTooManyParts), TooBig},
		{"clickhouse memory", ch(chMemoryLimitExceeded), TooBig},
		{"clickhouse unknown table", ch(60), Permanent},
		{"clickhouse auth", ch(516), Permanent},
		{"anything else", errors.New("boom"), Permanent},
	} {
		if got := Of(c.err); got != c.want {
			t.Errorf("%s: Of = %v, want %v", c.name, got, c.want)
		}
	}
	if !Retryable(&clickhouse.Exception{Code: chTooManyParts}) {
		t.Error("TOO_MANY_PARTS must be retryable")
	}
	if Retryable(&clickhouse.Exception{Code: chTypeMismatch}) {
		t.Error("TYPE_MISMATCH must not be retryable")
	}
	if ClickHouseCode(ch(chTooManyParts)) != chTooManyParts || ClickHouseCode(errors.New("x")) != 0 {
		t.Error("ClickHouseCode")
	}
}
