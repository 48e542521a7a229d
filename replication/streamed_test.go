package replication

import (
	"context"
	"encoding/binary"
	"errors"
	"testing"
	"time"

	"github.com/outbox-streamer/outbox-streamer/checkpoint"
	"github.com/outbox-streamer/outbox-streamer/internal/batch"
)

// TestStreamedMessagesWithoutStreaming: on a session that did not ask for
// in-progress transactions (no streamedTxns), a streamed insert is malformed
// and the other stream messages are ignored, without touching the batches.
func TestStreamedMessagesWithoutStreaming(t *testing.T) {
	st := &Stream{cfg: Config{StatusInterval: time.Hour}, dec: NewDecoder("public", "event_outbox", nil)}
	st.tracker = checkpoint.NewTracker(0)
	out := make(chan *batch.Batch, 10)
	r := &receiver{s: st, out: out, builder: batch.NewBuilder(1000, 0, time.Hour)}
	ctx := context.Background()
	streamCommit := binary.BigEndian.AppendUint32([]byte{'c'}, 42)
	streamCommit = append(streamCommit, 0)
	streamCommit = binary.BigEndian.AppendUint64(streamCommit, 100)
	streamCommit = binary.BigEndian.AppendUint64(streamCommit, 200)
	streamCommit = binary.BigEndian.AppendUint64(streamCommit, 0)
	insert := streamed(insertMsg(1, s("9"), s("t"), s("2020-01-01 00:00:00"), s(""), s("{}"), s("1"), s("pending"), nil, nil), 42)
	for i, m := range [][]byte{
		streamStart(42),
		streamed(relationMsg(1, "public", "event_outbox", outboxCols...), 42),
		insert,
		{'E'},
		streamAbort(42, 43),
		streamAbort(42, 42),
		streamCommit,
	} {
		err := r.handleCopyData(ctx, xlogData(uint64(i), m))
		switch {
		case i == 2 && !errors.Is(err, ErrMalformed):
			t.Fatalf("streamed insert without streaming: %v, want ErrMalformed", err)
		case i != 2 && err != nil:
			t.Fatalf("message %d (%q): %v", i, m[0], err)
		}
	}
	if len(out) != 0 || r.builder.Pending() != 0 {
		t.Errorf("%d batches handed over, %d rows open; want none", len(out), r.builder.Pending())
	}
}
