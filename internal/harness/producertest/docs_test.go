package producertest

import (
	"os"
	"strings"
	"testing"

	"github.com/outbox-streamer/outbox-streamer/outbox"
)

// TestDocsShowInsertSQL: the statement docs/producing-events.md tells sqlc
// and hand-written SQL users about is the one the package executes.
func TestDocsShowInsertSQL(t *testing.T) {
	doc, err := os.ReadFile("../../../docs/producing-events.md")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(doc), "```sql\n"+outbox.InsertSQL+"\n```") {
		t.Fatalf("docs/producing-events.md does not show outbox.InsertSQL:\n%s", outbox.InsertSQL)
	}
}
