package migrations_test

import (
	"strings"
	"testing"

	"github.com/outbox-streamer/outbox-streamer/internal/outboxstore"
	"github.com/outbox-streamer/outbox-streamer/migrations"
)

// TestOutboxNamesDerivedFromTable: the objects made beside an outbox are named
// after it (so two outboxes in one schema never collide), and event_outbox's
// keep the names every existing database has.
func TestOutboxNamesDerivedFromTable(t *testing.T) {
	for _, c := range []struct {
		outbox outboxstore.Name
		want   []string
		not    []string
	}{
		{outboxstore.DefaultName, []string{`CREATE TABLE IF NOT EXISTS "event_outbox" (`, `"event_outbox_undelivered_idx"`,
			`"event_outbox_status_check"`, `FOR TABLE "event_outbox"`, "DROP TABLE IF EXISTS outbox_checkpoint;"}, nil},
		{outboxstore.Name{Table: "orders_outbox"}, []string{`"orders_outbox_undelivered_idx"`, `"orders_outbox_status_check"`,
			`FOR TABLE "orders_outbox"`, `DROP TABLE IF EXISTS "orders_outbox";`}, []string{"event_outbox_", "DROP TABLE IF EXISTS outbox_checkpoint"}},
		{outboxstore.Name{Schema: "billing", Table: "event_outbox"}, []string{`CREATE TABLE IF NOT EXISTS "billing"."event_outbox" (`,
			`FOR TABLE "billing"."event_outbox"`}, []string{"DROP TABLE IF EXISTS outbox_checkpoint"}},
	} {
		for _, partitioned := range []string{"", "true"} {
			data := migrations.PostgresDataFor("pub", c.outbox)
			data["Partitioned"] = partitioned
			files, err := migrations.Rendered("postgres", data)
			if err != nil {
				t.Fatal(err)
			}
			all := strings.Join([]string{files["000001_event_outbox.up.sql"], files["000001_event_outbox.down.sql"]}, "\n")
			want := c.want
			if partitioned != "" {
				want = append(want, "CREATE TABLE IF NOT EXISTS "+c.outbox.Related("_default")+" PARTITION OF "+c.outbox.Ident()+" DEFAULT;")
			}
			for _, w := range want {
				if !strings.Contains(all, w) {
					t.Errorf("%s (partitioned %q): the migration lacks %s", c.outbox, partitioned, w)
				}
			}
			for _, n := range c.not {
				if strings.Contains(strings.SplitN(all, "\n", 4)[3], n) { // past the leading comment
					t.Errorf("%s: the migration holds %s", c.outbox, n)
				}
			}
		}
	}
	if migrations.ClickHouseMigrationsTable("event_log") != migrations.MigrationsTable || migrations.ClickHouseMigrationsTable("billing_log") != "outbox_streamer_migrations_billing_log" {
		t.Error("ClickHouse version tables")
	}
}
