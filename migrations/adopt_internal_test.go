package migrations

import (
	"strings"
	"testing"
)

// seedShape is the earlier service's table as the catalog shows it: the nine
// columns, no defaults but id's, a primary key, nothing of the streamer's.
func seedShape(timeType string) tableShape {
	s := tableShape{columns: map[string]column{}, idUnique: true, versionTable: `"public"."outbox_streamer_migrations"`}
	for name, typ := range map[string]string{"id": "bigint", "event_type": "character varying", "event_date_time": timeType,
		"environment": "character varying", "event_context": "jsonb", "metadata_version": "bigint", "status": "character varying",
		"created_at": timeType, "updated_at": timeType} {
		s.columns[name] = column{name: name, typ: typ, base: typ, hasDefault: name == "id"}
	}
	return s
}

func TestAdoptionStatements(t *testing.T) {
	cfg := Config{Publication: "outbox_publication"}
	cases := []struct {
		name       string
		shape      func() tableShape
		want, dont []string
	}{
		{"timestamp seed", func() tableShape { return seedShape("timestamp without time zone") }, []string{
			`ADD COLUMN IF NOT EXISTS "attempts" INTEGER NOT NULL DEFAULT 0`,
			`ADD COLUMN IF NOT EXISTS "next_attempt_at" TIMESTAMPTZ`,
			`ALTER COLUMN "status" SET DEFAULT 'pending'`,
			`ALTER COLUMN "created_at" SET DEFAULT (now() AT TIME ZONE 'UTC')`,
			`CHECK (status IN ('pending', 'processed', 'failed', 'dead')) NOT VALID`,
			`CREATE INDEX IF NOT EXISTS "event_outbox_undelivered_idx"`,
			`CREATE TABLE IF NOT EXISTS outbox_checkpoint`,
			`CREATE PUBLICATION "outbox_publication" FOR TABLE "event_outbox" WITH (publish = 'insert')`,
			`INSERT INTO "public"."outbox_streamer_migrations" (version, dirty) VALUES (1, false)`,
		}, []string{"NOT NULL DEFAULT ''", "SET NOT NULL"}},
		{"timestamptz seed", func() tableShape { return seedShape("timestamp with time zone") }, []string{
			`ALTER COLUMN "updated_at" SET DEFAULT now()`,
		}, []string{"AT TIME ZONE"}},
		{"missing optional columns", func() tableShape {
			s := seedShape("timestamp with time zone")
			delete(s.columns, "environment")
			delete(s.columns, "created_at")
			return s
		}, []string{
			`ADD COLUMN IF NOT EXISTS "environment" VARCHAR(50) NOT NULL DEFAULT ''`,
			`ADD COLUMN IF NOT EXISTS "created_at" TIMESTAMPTZ NOT NULL DEFAULT now()`,
		}, nil},
		{"complete but unrecorded", func() tableShape {
			s := seedShape("timestamp without time zone")
			for _, c := range []string{"attempts", "last_error", "next_attempt_at"} {
				s.columns[c] = column{name: c, typ: "integer", base: "integer"}
			}
			for _, c := range []string{"status", "created_at", "updated_at"} {
				col := s.columns[c]
				col.hasDefault = true
				s.columns[c] = col
			}
			valid := true
			s.indexValid, s.hasCheck, s.checkpoint, s.publication = &valid, true, true, &publication{hasTable: true}
			return s
		}, []string{`DELETE FROM "public"."outbox_streamer_migrations"`}, []string{"ALTER TABLE", "CREATE INDEX", "PUBLICATION", "outbox_checkpoint"}},
		{"publication without the table", func() tableShape {
			s := seedShape("timestamp without time zone")
			s.publication = &publication{}
			return s
		}, []string{`ALTER PUBLICATION "outbox_publication" ADD TABLE "event_outbox"`}, []string{"CREATE PUBLICATION"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			sql := strings.Join(adoptionStatements(cfg, c.shape()), ";\n")
			for _, w := range c.want {
				if !strings.Contains(sql, w) {
					t.Errorf("statements lack %q:\n%s", w, sql)
				}
			}
			for _, d := range c.dont {
				if strings.Contains(sql, d) {
					t.Errorf("statements contain %q:\n%s", d, sql)
				}
			}
		})
	}
}
