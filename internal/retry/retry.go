// Package retry runs an operation again after transient failures, with capped
// exponential backoff.
package retry

import (
	"context"
	"math/rand/v2"
	"time"
)

// Policy is a capped exponential backoff.
type Policy struct {
	// Initial is the first wait (default 200 ms).
	Initial time.Duration
	// Max caps the wait (default 30 s).
	Max time.Duration
}

// Delay returns the wait before attempt n (n = 1 for the first retry), with ±20 %
// jitter so that many instances do not retry in lockstep.
func (p Policy) Delay(n int) time.Duration {
	initial, max := p.Initial, p.Max
	if initial <= 0 {
		initial = 200 * time.Millisecond
	}
	if max <= 0 {
		max = 30 * time.Second
	}
	d := initial
	for i := 1; i < n && d < max; i++ {
		d *= 2
	}
	if d > max {
		d = max
	}
	jitter := time.Duration(rand.Int64N(int64(d)/5+1)) - d/10
	return d + jitter
}

// Do calls op until it succeeds, returns an error that retryable rejects, or ctx ends.
// onRetry, if not nil, is told about each failure that will be retried (to log it once
// where it is handled).
func Do(ctx context.Context, p Policy, retryable func(error) bool, onRetry func(attempt int, wait time.Duration, err error), op func(context.Context) error) error {
	for attempt := 1; ; attempt++ {
		err := op(ctx)
		if err == nil {
			return nil
		}
		if !retryable(err) || ctx.Err() != nil {
			return err
		}
		wait := p.Delay(attempt)
		if onRetry != nil {
			onRetry(attempt, wait, err)
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return err
		case <-t.C:
		}
	}
}
