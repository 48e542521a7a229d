package outboxstore

import (
	"strings"
	"testing"
)

func TestName(t *testing.T) {
	for _, c := range []struct {
		in                                 string
		ident, literal, related, migration string
	}{
		{"", `"event_outbox"`, `'"event_outbox"'`, `"event_outbox_default"`, "outbox_streamer_migrations"},
		{"event_outbox", `"event_outbox"`, `'"event_outbox"'`, `"event_outbox_default"`, "outbox_streamer_migrations"},
		{"billing.event_outbox", `"billing"."event_outbox"`, `'"billing"."event_outbox"'`, `"billing"."event_outbox_default"`, "outbox_streamer_migrations"},
		{"orders_outbox", `"orders_outbox"`, `'"orders_outbox"'`, `"orders_outbox_default"`, "outbox_streamer_migrations_orders_outbox"},
	} {
		n, err := ParseName(c.in)
		if err != nil {
			t.Fatalf("ParseName(%q): %v", c.in, err)
		}
		if n.Ident() != c.ident || n.Literal() != c.literal || n.Related("_default") != c.related || n.MigrationsTable() != c.migration {
			t.Errorf("%q: %s %s %s %s", c.in, n.Ident(), n.Literal(), n.Related("_default"), n.MigrationsTable())
		}
	}
	if (Name{}).Ident() != `"event_outbox"` || !(Name{}).IsDefault() || (Name{Schema: "public", Table: Table}).IsDefault() {
		t.Error("the zero Name is event_outbox; public.event_outbox is not the unqualified default")
	}
	long := strings.Repeat("t", MaxTableBytes)
	n, err := ParseName(long)
	if err != nil || len(n.MigrationsTable()) > 63 || len(long+"_p20261201_1500") > 63 {
		t.Errorf("longest table: %v, derived %d bytes", err, len(n.MigrationsTable()))
	}
	if _, err := ParseName(long + "t"); err == nil {
		t.Error("a table name past MaxTableBytes was accepted")
	}
	if got := DefaultName.sql("SELECT 1 FROM {outbox} o, {outbox} p"); got != `SELECT 1 FROM "event_outbox" o, "event_outbox" p` {
		t.Errorf("sql = %s", got)
	}
	if got := ClaimStatements(Name{Schema: "billing", Table: "event_outbox"})[0]; !strings.Contains(got, `FROM "billing"."event_outbox"`) {
		t.Errorf("claim on billing.event_outbox: %s", got)
	}
}
