// Package fault is the one error taxonomy behind every retry decision of the
// streamer: PostgreSQL errors by SQLSTATE (pgerrcode names), ClickHouse errors
// by exception code, and the network and context errors both drivers return.
// Callers ask what kind of failure an error is; they never match codes.
package fault

import (
	"context"
	"errors"
	"io"
	"net"
	"syscall"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/jackc/pgerrcode"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// Kind is what a failure means for the operation that met it.
type Kind uint8

const (
	// Permanent: the same operation fails the same way again (bad
	// configuration, a schema mismatch, a bug). Waiting does not help.
	Permanent Kind = iota
	// Transient: the server is unreachable, restarting, overloaded, or the
	// connection broke; the same operation may pass later.
	Transient
	// Rejected: ClickHouse refused a value in the data (it cannot parse or
	// store it). Splitting the insert isolates the offending rows.
	Rejected
	// TooBig: ClickHouse refused the insert for its size or spread (too many
	// parts, memory) rather than for a value: smaller inserts may pass, the
	// same one fails again. On a busy server it can also be transient.
	TooBig
	// Canceled: the caller gave up (context canceled).
	Canceled
)

func (k Kind) String() string {
	switch k {
	case Transient:
		return "transient"
	case Rejected:
		return "rejected"
	case TooBig:
		return "too big"
	case Canceled:
		return "canceled"
	}
	return "permanent"
}

// ClickHouse exception codes the streamer acts on.
const (
	chUnexpectedEndOfFile         = 3
	chCannotParseText             = 6
	chCannotParseQuotedString     = 26
	chCannotParseInputAssertion   = 27
	chAttemptToReadAfterEOF       = 32
	chCannotParseDate             = 38
	chCannotParseDateTime         = 41
	chTypeMismatch                = 53
	chArgumentOutOfBound          = 69
	chCannotConvertType           = 70
	chCannotParseNumber           = 72
	chIncorrectData               = 117
	chTooLargeStringSize          = 131
	chTimeoutExceeded             = 159
	chReadonly                    = 164
	chTooManySimultaneousQueries  = 202
	chNoFreeConnection            = 203
	chSocketTimeout               = 209
	chNetworkError                = 210
	chMemoryLimitExceeded         = 241
	chTableIsReadOnly             = 242
	chTooManyParts                = 252
	chTooFewLiveReplicas          = 285
	chUnsatisfiedQuorumPrevious   = 286
	chUnknownStatusOfInsert       = 319
	chValueIsOutOfRangeOfDataType = 321
	chDecimalOverflow             = 407
	chSystemError                 = 425
	chCannotScheduleTask          = 439
	chUnknownException            = 1002

	// Authentication: the server refused the user or its password. 18.16
	// names the cause, newer servers answer 516 for all of them.
	chUnknownUser          = 192
	chWrongPassword        = 193
	chRequiredPassword     = 194
	chAuthenticationFailed = 516
)

// AuthFailed reports whether ClickHouse refused err's connection for its
// credentials (CLICKHOUSE_USER, CLICKHOUSE_PASSWORD). Waiting does not help:
// it is Permanent.
func AuthFailed(err error) bool {
	switch ClickHouseCode(err) {
	case chUnknownUser, chWrongPassword, chRequiredPassword, chAuthenticationFailed:
		return true
	}
	return false
}

var clickhouseKinds = map[int32]Kind{
	chUnexpectedEndOfFile:        Transient,
	chAttemptToReadAfterEOF:      Transient, // the insert's stream was cut (a dropped connection), not a bad row
	chTimeoutExceeded:            Transient,
	chReadonly:                   Transient,
	chTooManySimultaneousQueries: Transient,
	chNoFreeConnection:           Transient,
	chSocketTimeout:              Transient,
	chNetworkError:               Transient,
	chTableIsReadOnly:            Transient,
	chTooFewLiveReplicas:         Transient,
	chUnsatisfiedQuorumPrevious:  Transient, // a quorum insert that timed out completes once the replicas catch up (CLICKHOUSE_CLUSTER)
	chUnknownStatusOfInsert:      Transient,
	chSystemError:                Transient,
	chCannotScheduleTask:         Transient,
	chUnknownException:           Transient, // often a dropped connection

	chMemoryLimitExceeded: TooBig, // a batch of huge contexts
	chTooManyParts:        TooBig, // one insert over more than 100 monthly partitions

	chCannotParseText:             Rejected,
	chCannotParseQuotedString:     Rejected,
	chCannotParseInputAssertion:   Rejected,
	chCannotParseDate:             Rejected,
	chCannotParseDateTime:         Rejected,
	chTypeMismatch:                Rejected,
	chArgumentOutOfBound:          Rejected,
	chCannotConvertType:           Rejected,
	chCannotParseNumber:           Rejected,
	chIncorrectData:               Rejected,
	chTooLargeStringSize:          Rejected,
	chValueIsOutOfRangeOfDataType: Rejected,
	chDecimalOverflow:             Rejected,
}

// Of classifies err, whichever database it came from.
func Of(err error) Kind {
	if err == nil {
		return Permanent
	}
	if errors.Is(err, context.Canceled) {
		return Canceled
	}
	var ex *clickhouse.Exception
	if errors.As(err, &ex) {
		return clickhouseKinds[ex.Code] // unknown codes: Permanent
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return postgresKind(pgErr.Code)
	}
	var parseErr *pgconn.ParseConfigError
	if errors.As(err, &parseErr) || errors.Is(err, pgx.ErrNoRows) || errors.Is(err, pgx.ErrTooManyRows) {
		return Permanent
	}
	if connectionBroke(err) {
		return Transient
	}
	return Permanent
}

// postgresKind classifies a SQLSTATE.
func postgresKind(code string) Kind {
	switch {
	case pgerrcode.IsConnectionException(code), // 08: the connection broke
		pgerrcode.IsInsufficientResources(code), // 53: disk full, out of memory, too many connections
		pgerrcode.IsOperatorIntervention(code),  // 57: shutdown, restart, cannot connect now, canceled
		pgerrcode.IsSystemError(code):           // 58: I/O error
		return Transient
	}
	switch code {
	case pgerrcode.SerializationFailure, pgerrcode.DeadlockDetected,
		pgerrcode.ObjectInUse,      // a slot another walsender still holds for a moment
		pgerrcode.LockNotAvailable: // lock_timeout
		return Transient
	}
	return Permanent
}

// connectionBroke reports the errors of a connection that failed or timed
// out without a server's answer.
func connectionBroke(err error) bool {
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) ||
		errors.Is(err, net.ErrClosed) || errors.Is(err, clickhouse.ErrAcquireConnTimeout) ||
		pgconn.SafeToRetry(err) || pgconn.Timeout(err) {
		return true
	}
	var connectErr *pgconn.ConnectError
	var netErr net.Error
	return errors.As(err, &connectErr) || errors.As(err, &netErr)
}

// Retryable reports whether the same operation may succeed if tried again
// later: a Transient failure, or TooBig (which a busy server also returns).
func Retryable(err error) bool {
	k := Of(err)
	return k == Transient || k == TooBig
}

// Splittable reports whether ClickHouse refused an insert for its content or
// size, so that inserting its rows in smaller groups isolates the cause.
func Splittable(err error) bool {
	k := Of(err)
	return k == Rejected || k == TooBig
}

// ClickHouseCode returns the exception code in err, or 0.
func ClickHouseCode(err error) int32 {
	var ex *clickhouse.Exception
	if errors.As(err, &ex) {
		return ex.Code
	}
	return 0
}

// IsPostgres reports whether err carries SQLSTATE code (a pgerrcode constant).
func IsPostgres(err error, code string) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == code
}
