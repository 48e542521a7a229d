package outbox

import (
	"errors"
	"strconv"
)

// Sentinel errors, one per rule an event can break. Every validation failure is
// a *ValidationError that matches exactly one of them with errors.Is.
var (
	// ErrEmptyType: Event.Type is "".
	ErrEmptyType = errors.New("outbox: event type is empty")
	// ErrTypeTooLong: Event.Type has more than MaxTypeLength characters.
	ErrTypeTooLong = errors.New("outbox: event type is too long")
	// ErrEnvironmentTooLong: Event.Environment has more than
	// MaxEnvironmentLength characters.
	ErrEnvironmentTooLong = errors.New("outbox: environment is too long")
	// ErrInvalidText: Event.Type or Event.Environment is not valid UTF-8 or
	// contains a NUL byte; PostgreSQL text cannot hold either.
	ErrInvalidText = errors.New("outbox: invalid text")
	// ErrZeroTime: Event.Time is the zero time.Time.
	ErrZeroTime = errors.New("outbox: event time is zero")
	// ErrTimeOutOfRange: Event.Time is outside what the ClickHouse column
	// holds (see TimeRange).
	ErrTimeOutOfRange = errors.New("outbox: event time is out of range")
	// ErrInvalidContext: the context is not valid JSON, cannot be marshaled,
	// is JSON that PostgreSQL's jsonb rejects, or both Context and RawContext
	// are set.
	ErrInvalidContext = errors.New("outbox: invalid event context")
	// ErrContextTooLarge: the context, as PostgreSQL prints it, is larger than
	// the writer's MaxContextBytes.
	ErrContextTooLarge = errors.New("outbox: event context is too large")
)

// ValidationError reports an event that was refused before anything was sent
// to the database; the transaction is still usable. It matches one of the
// Err* sentinels with errors.Is, and the underlying cause (for example a
// *json.UnsupportedTypeError from marshaling Context), if any, with errors.As.
type ValidationError struct {
	// Index is the position of the event in the slice given to AppendBatch,
	// or -1 for Append and Validate.
	Index int
	// Field is the Event field at fault: "Type", "Time", "Environment" or
	// "Context".
	Field string
	// Reason says what is wrong, in words (it includes the cause's text).
	Reason string
	// Err is the sentinel (ErrEmptyType, ErrContextTooLarge, ...).
	Err error
	// Cause is the underlying error, or nil.
	Cause error
}

// Error implements error: "outbox: event 3: event type is empty" (without
// "event 3: " outside a batch).
func (e *ValidationError) Error() string {
	if e.Index >= 0 {
		return "outbox: event " + strconv.Itoa(e.Index) + ": " + e.Reason
	}
	return "outbox: " + e.Reason
}

// Unwrap returns the sentinel and the cause, for errors.Is and errors.As.
func (e *ValidationError) Unwrap() []error {
	if e.Cause == nil {
		return []error{e.Err}
	}
	return []error{e.Err, e.Cause}
}
