package pipeline

import "testing"

func TestRecordCoversReplay(t *testing.T) {
	for _, c := range []struct {
		inflight, start uint64
		want            bool
	}{
		{0, 0, false},    // nothing recorded
		{0, 100, false},  // nothing recorded
		{99, 100, false}, // every recorded commit was confirmed
		{100, 100, true}, // a commit starting where the confirmed one ended is sent again
		{150, 100, true}, // recorded past the confirmed position
	} {
		if got := recordCoversReplay(c.inflight, c.start); got != c.want {
			t.Errorf("recordCoversReplay(%d, %d) = %v, want %v", c.inflight, c.start, got, c.want)
		}
	}
}
