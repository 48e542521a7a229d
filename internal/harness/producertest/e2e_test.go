package producertest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/fixture"
	"github.com/outbox-streamer/outbox-streamer/internal/harness/testenv"
	"github.com/outbox-streamer/outbox-streamer/outbox"
)

// TestRolledBackNeverReachesClickHouse streams into a real ClickHouse: events
// appended in transactions that roll back (one of them after a later
// transaction committed) never arrive, those that commit arrive exactly once
// with their fields intact.
func TestRolledBackNeverReachesClickHouse(t *testing.T) {
	e := fixture.New(t, testenv.ModernClickHouse(t))
	e.StartPipeline(t)
	ctx := context.Background()
	b := make([]byte, 8)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	run := hex.EncodeToString(b)
	rolledBack := "rolled-back-" + run
	committed := "committed-" + run
	mark := func(marker string, n int) []outbox.Event {
		evs := make([]outbox.Event, n)
		for i := range evs {
			evs[i] = outbox.Event{Type: "test.batch", Time: time.Now(), Environment: "e2e", Context: map[string]any{"marker": marker, "i": i}}
		}
		return evs
	}

	// A rolled-back transaction with one Append and a COPY of 500.
	tx, err := e.Pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := outbox.Append(ctx, tx, mark(rolledBack, 1)[0]); err != nil {
		t.Fatal(err)
	}
	if _, err := outbox.AppendBatch(ctx, tx, mark(rolledBack, 500)); err != nil {
		t.Fatal(err)
	}
	if err := tx.Rollback(ctx); err != nil {
		t.Fatal(err)
	}

	// A transaction that stays open while another commits, then rolls back.
	late, err := e.Pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer late.Rollback(ctx) //nolint:errcheck
	if _, err := outbox.Append(ctx, late, mark(rolledBack, 1)[0]); err != nil {
		t.Fatal(err)
	}

	// The committed events: one with fields to check, and a COPY of 500.
	at := time.Date(2024, 2, 29, 23, 59, 58, 987654321, time.FixedZone("UTC-7", -7*3600))
	want := outbox.Event{Type: "order.paid", Time: at, Environment: "e2e", MetadataVersion: 2,
		RawContext: []byte(`{"marker":"` + committed + `","amount":12.50,"note":"é \"quoted\""}`)}
	var id int64
	err = pgx.BeginFunc(ctx, e.Pool, func(tx pgx.Tx) error {
		var err error
		if id, err = outbox.Append(ctx, tx, want); err != nil {
			return err
		}
		_, err = outbox.AppendBatch(ctx, tx, mark(committed, 500))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := late.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	walPos := e.CurrentWAL(t)

	countMarker := func(marker string) uint64 {
		var n uint64
		if err := e.CHConn.QueryRow(ctx, "SELECT count() FROM "+e.Table+" WHERE position(event_context, ?) > 0", marker).Scan(&n); err != nil {
			t.Fatalf("count %s in ClickHouse: %v", marker, err)
		}
		return n
	}
	fixture.WaitFor(t, time.Minute, "the committed events in ClickHouse", func() bool { return countMarker(committed) == 501 })
	// The rolled-back transactions come before the committed one in the WAL
	// (or end after it, without a commit): had the streamer delivered them,
	// they would be there by now.
	if n := countMarker(rolledBack); n != 0 {
		t.Fatalf("%d rolled-back events reached ClickHouse", n)
	}
	e.AssertExactlyDelivered(t, time.Minute, walPos)

	var (
		gotType, gotEnv, gotContext string
		gotTime                     time.Time
		gotVersion                  int64
	)
	err = e.CHConn.QueryRow(ctx, "SELECT event_type, event_date_time, environment, event_context, metadata_version FROM "+e.Table+" WHERE event_id = ?", uint64(id)).
		Scan(&gotType, &gotTime, &gotEnv, &gotContext, &gotVersion)
	if err != nil {
		t.Fatal(err)
	}
	wantTime := at.UTC().Truncate(time.Microsecond)
	if gotType != want.Type || !gotTime.Equal(wantTime) || gotEnv != want.Environment || gotVersion != 2 {
		t.Fatalf("ClickHouse holds %q %s %q v%d, want %q %s %q v2", gotType, gotTime.UTC().Format(time.RFC3339Nano), gotEnv, gotVersion,
			want.Type, wantTime.Format(time.RFC3339Nano), want.Environment)
	}
	jsonEqual(t, gotContext, map[string]any{"marker": committed, "amount": 12.5, "note": `é "quoted"`})
	t.Logf("ClickHouse context: %s", gotContext)
}
