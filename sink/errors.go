package sink

import (
	"context"
	"errors"
	"io"
	"net"
	"syscall"

	"github.com/ClickHouse/clickhouse-go/v2"
)

// ClickHouse error codes that mean "try again later": the data is fine, the server is
// busy, restarting or unreachable.
var retryableCodes = map[int32]bool{
	3:    true, // UNEXPECTED_END_OF_FILE
	32:   true, // ATTEMPT_TO_READ_AFTER_EOF: the insert's stream was cut (a dropped connection), not a bad row
	159:  true, // TIMEOUT_EXCEEDED
	164:  true, // READONLY
	202:  true, // TOO_MANY_SIMULTANEOUS_QUERIES
	203:  true, // NO_FREE_CONNECTION
	209:  true, // SOCKET_TIMEOUT
	210:  true, // NETWORK_ERROR
	241:  true, // MEMORY_LIMIT_EXCEEDED
	242:  true, // TABLE_IS_READ_ONLY
	252:  true, // TOO_MANY_PARTS
	285:  true, // TOO_FEW_LIVE_REPLICAS
	319:  true, // UNKNOWN_STATUS_OF_INSERT
	425:  true, // SYSTEM_ERROR
	439:  true, // CANNOT_SCHEDULE_TASK
	1002: true, // UNKNOWN_EXCEPTION (often a dropped connection)
}

// IsRetryable reports whether err is a transient failure (network, timeout, an
// overloaded server) after which the same batch may succeed. Anything else — a type
// mismatch, an unknown table, bad credentials — will fail again the same way.
func IsRetryable(err error) bool {
	if err == nil {
		return false
	}
	if errors.Is(err, context.Canceled) {
		return false
	}
	var ex *clickhouse.Exception
	if errors.As(err, &ex) {
		return retryableCodes[ex.Code]
	}
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) ||
		errors.Is(err, net.ErrClosed) || errors.Is(err, clickhouse.ErrAcquireConnTimeout) {
		return true
	}
	var netErr net.Error
	return errors.As(err, &netErr)
}

// IsRowError reports whether the server rejected the data itself (a value it cannot
// parse or store): splitting the batch isolates the offending rows.
func IsRowError(err error) bool {
	var ex *clickhouse.Exception
	if !errors.As(err, &ex) {
		return false
	}
	switch ex.Code {
	case 6, 26, 27, 38, 41, 53, 69, 70, 72, 117, 131, 321, 407:
		// CANNOT_PARSE_TEXT, CANNOT_PARSE_QUOTED_STRING, CANNOT_PARSE_INPUT_ASSERTION_FAILED,
		// CANNOT_PARSE_DATE, CANNOT_PARSE_DATETIME, TYPE_MISMATCH,
		// ARGUMENT_OUT_OF_BOUND, CANNOT_CONVERT_TYPE, CANNOT_PARSE_NUMBER, INCORRECT_DATA,
		// TOO_LARGE_STRING_SIZE, VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE, DECIMAL_OVERFLOW
		return true
	}
	return false
}

// IsBatchError reports whether the server refused an insert for its size or
// spread rather than for any value in it: too many parts (one insert over
// more than 100 monthly partitions) or the query's memory limit (a batch of
// huge contexts). Retrying the same insert fails the same way; smaller ones
// may pass, and a single row refused so is a bad row. Such errors are also
// IsRetryable, because on a busy server they can be transient.
func IsBatchError(err error) bool {
	var ex *clickhouse.Exception
	if !errors.As(err, &ex) {
		return false
	}
	return ex.Code == 241 || ex.Code == 252 // MEMORY_LIMIT_EXCEEDED, TOO_MANY_PARTS
}
