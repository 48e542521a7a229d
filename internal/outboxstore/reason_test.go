package outboxstore

import (
	"strings"
	"testing"
	"unicode/utf8"
)

func TestCleanReason(t *testing.T) {
	for _, c := range []struct {
		name, in string
	}{
		{"multibyte at the cut", strings.Repeat("a", 1999) + "ééé"},
		{"emoji at the cut", strings.Repeat("a", 1998) + "😀😀"},
		{"NUL byte", "bad \x00 value"},
		{"invalid UTF-8", "bad \xff\xfe value"},
		{"short", "fine"},
	} {
		t.Run(c.name, func(t *testing.T) {
			got := cleanReason(c.in, maxReasonBytes)
			if !utf8.ValidString(got) || strings.ContainsRune(got, 0) {
				t.Fatalf("cleanReason(%q) = %q: not storable", c.in, got)
			}
			if len(got) > maxReasonBytes+len("…") {
				t.Fatalf("cleanReason kept %d bytes", len(got))
			}
		})
	}
}
