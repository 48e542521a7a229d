package record

import "testing"

func TestSize(t *testing.T) {
	empty := Event{}
	if got := empty.Size(); got != 43 {
		t.Errorf("empty event: Size() = %d, want 43 (5 fixed columns of 8 bytes, 3 length prefixes)", got)
	}
	ev := Event{Type: "order.created", Environment: "prod", Context: `{"a":1}`}
	if got, want := ev.Size(), 43+len("order.created")+len("prod")+len(`{"a":1}`); got != want {
		t.Errorf("Size() = %d, want %d", got, want)
	}
}
