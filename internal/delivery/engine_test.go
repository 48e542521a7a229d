package delivery

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"go.uber.org/zap"

	"github.com/outbox-streamer/outbox-streamer/internal/record"
	"github.com/outbox-streamer/outbox-streamer/internal/retry"
)

// fakeSink is a ClickHouse stand-in for the engine's pure logic: refuse
// decides what an insert of some rows gets; what it accepts it holds.
type fakeSink struct {
	refuse  func(events []record.Event) error
	held    map[int64]bool
	inserts int
	lookups int
}

func (f *fakeSink) Ready(context.Context) error { return nil }
func (f *fakeSink) Validate(ev *record.Event) error {
	if ev.Problem != "" {
		return errors.New(ev.Problem)
	}
	return nil
}
func (f *fakeSink) Insert(_ context.Context, events []record.Event) error {
	f.inserts++
	if f.refuse != nil {
		if err := f.refuse(events); err != nil {
			return err
		}
	}
	for _, ev := range events {
		f.held[ev.ID] = true
	}
	return nil
}
func (f *fakeSink) ExistingIDs(_ context.Context, events []record.Event) (map[int64]struct{}, error) {
	f.lookups++
	out := map[int64]struct{}{}
	for _, ev := range events {
		if f.held[ev.ID] {
			out[ev.ID] = struct{}{}
		}
	}
	return out, nil
}

func rows(n int) []record.Event {
	evs := make([]record.Event, n)
	for i := range evs {
		evs[i] = record.Event{ID: int64(i + 1), Type: "t"}
	}
	return evs
}

func has(events []record.Event, id int64) bool {
	for _, ev := range events {
		if ev.ID == id {
			return true
		}
	}
	return false
}

func engine(f *fakeSink, bound time.Duration) *Engine {
	if f.held == nil {
		f.held = map[int64]bool{}
	}
	return New(Config{Retry: retry.Policy{Initial: time.Millisecond, Max: time.Millisecond}, OutageFailAfter: bound}, f, zap.NewNop())
}

func TestBadRowIsIsolatedByBisection(t *testing.T) {
	f := &fakeSink{refuse: func(evs []record.Event) error {
		if has(evs, 37) {
			return &clickhouse.Exception{Code: 53, Message: "type mismatch"}
		}
		return nil
	}}
	evs := rows(100)
	evs[10].Problem = "event_type is NULL"
	o, err := engine(f, 0).Deliver(context.Background(), evs, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(o.Inserted) != 98 || len(o.Failed) != 2 || len(o.Deferred) != 0 {
		t.Fatalf("inserted %d, failed %v, deferred %d", len(o.Inserted), o.Failed, len(o.Deferred))
	}
	if f.inserts > 2*8+1 {
		t.Errorf("%d inserts to isolate one row of 99: not a bisection", f.inserts)
	}
	// The row the streamer's own validation refused can never pass: final
	// (dead at once). ClickHouse's refusal is retried as usual.
	for _, fl := range o.Failed {
		if want := fl.ID == 11; fl.Final != want {
			t.Errorf("row %d (%s): final %v, want %v", fl.ID, fl.Reason, fl.Final, want)
		}
	}
}

func TestTooBigIsSplitAndItsHalvesLookedUp(t *testing.T) {
	f := &fakeSink{refuse: func(evs []record.Event) error {
		if len(evs) > 40 {
			return &clickhouse.Exception{Code: 252, Message: "too many parts"}
		}
		return nil
	}}
	o, err := engine(f, 0).Deliver(context.Background(), rows(150), nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(o.Inserted) != 150 || len(o.Failed) != 0 {
		t.Fatalf("inserted %d, failed %v", len(o.Inserted), o.Failed)
	}
	if f.lookups == 0 {
		t.Error("the halves of an insert refused for its size were sent without a lookup")
	}
}

func TestSingleRowTooBig(t *testing.T) {
	tooBig := func([]record.Event) error { return &clickhouse.Exception{Code: 241, Message: "memory limit"} }
	// The sweep does not wait: the row counts an attempt.
	o, err := engine(&fakeSink{refuse: tooBig}, -1).Deliver(context.Background(), rows(1), nil)
	if err != nil || len(o.Failed) != 1 || len(o.Deferred) != 0 {
		t.Fatalf("sweep: %+v, %v", o, err)
	}
	// The writer retries it as the server's trouble, then defers it.
	o, err = engine(&fakeSink{refuse: tooBig}, 20*time.Millisecond).Deliver(context.Background(), rows(1), nil)
	if err != nil || len(o.Failed) != 0 || len(o.Deferred) != 1 {
		t.Fatalf("writer: %+v, %v", o, err)
	}
}

func TestOutageDefersWithoutRetryForTheSweep(t *testing.T) {
	f := &fakeSink{refuse: func([]record.Event) error { return &clickhouse.Exception{Code: 210, Message: "network"} }}
	o, err := engine(f, -1).Deliver(context.Background(), rows(20), nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(o.Deferred) != 20 || o.OutageErr == nil || f.inserts != 1 {
		t.Fatalf("deferred %d, outage %v, inserts %d", len(o.Deferred), o.OutageErr, f.inserts)
	}
}

func TestPresentRowsAreNotInsertedAgain(t *testing.T) {
	f := &fakeSink{held: map[int64]bool{2: true, 3: true}}
	o, err := engine(f, 0).Deliver(context.Background(), rows(5), func(ev *record.Event) bool { return ev.ID <= 3 })
	if err != nil {
		t.Fatal(err)
	}
	if len(o.Present) != 2 || len(o.Inserted) != 3 || len(o.Processed()) != 5 {
		t.Fatalf("present %d, inserted %d", len(o.Present), len(o.Inserted))
	}
}

func TestTableRejectingEveryRowStops(t *testing.T) {
	f := &fakeSink{refuse: func([]record.Event) error { return &clickhouse.Exception{Code: 6, Message: "cannot parse"} }}
	_, err := engine(f, 0).Deliver(context.Background(), rows(16), nil)
	if !errors.Is(err, ErrTableRejectsRows) {
		t.Fatalf("err = %v, want ErrTableRejectsRows", err)
	}
}
