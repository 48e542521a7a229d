package migrations_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/fixture"
	"github.com/outbox-streamer/outbox-streamer/internal/harness/testenv"
	"github.com/outbox-streamer/outbox-streamer/internal/outboxstore"
	"github.com/outbox-streamer/outbox-streamer/internal/pipeline"
	"github.com/outbox-streamer/outbox-streamer/migrations"
	"github.com/outbox-streamer/outbox-streamer/replication"
	"github.com/outbox-streamer/outbox-streamer/sink"
)

// seedTable creates event_outbox as the earlier Django + Celery service had
// it (SEED.md): the nine columns, only event_type NOT NULL, no defaults but
// id's sequence, a plain btree index on status. timeType is "timestamp" or
// "timestamptz".
func seedTable(t *testing.T, conn *pgx.Conn, timeType string) {
	t.Helper()
	_, err := conn.Exec(context.Background(), fmt.Sprintf(`CREATE TABLE event_outbox (
		id BIGSERIAL PRIMARY KEY,
		event_type VARCHAR(255) NOT NULL,
		event_date_time %[1]s,
		environment VARCHAR(50),
		event_context JSONB,
		metadata_version BIGINT,
		status VARCHAR(20),
		created_at %[1]s,
		updated_at %[1]s);
		CREATE INDEX event_outbox_status_idx ON event_outbox (status)`, timeType))
	if err != nil {
		t.Fatal(err)
	}
}

// seedRows inserts n rows of each status as the old service wrote them:
// processed ones 30 days old, every 7th without environment, every 11th
// without event_context; and one pending row without event_date_time.
func seedRows(t *testing.T, conn *pgx.Conn, timeType string, n int) {
	t.Helper()
	now := "(now() AT TIME ZONE 'UTC')"
	if timeType == "timestamptz" {
		now = "now()"
	}
	_, err := conn.Exec(context.Background(), fmt.Sprintf(`INSERT INTO event_outbox
		(event_type, event_date_time, environment, event_context, metadata_version, status, created_at, updated_at)
		SELECT 'type_' || (g %% 3), %[1]s - interval '1 hour' * g,
		       CASE WHEN g %% 7 = 0 THEN NULL ELSE 'prod' END,
		       CASE WHEN g %% 11 = 0 THEN NULL ELSE jsonb_build_object('g', g) END, 1, s,
		       CASE WHEN s = 'processed' THEN %[1]s - interval '30 days' ELSE %[1]s - interval '1 hour' END, %[1]s
		FROM generate_series(1, %[2]d) g, unnest(ARRAY['processed', 'pending', 'failed']) s;
		INSERT INTO event_outbox (event_type, status, created_at) VALUES ('no_time', 'pending', %[1]s)`, now, n))
	if err != nil {
		t.Fatal(err)
	}
}

// dbState is the catalog of the test database (relations, columns with
// types and defaults, constraints, indexes, publications, slots) and a
// checksum of event_outbox's rows: equal states are the same database.
func dbState(t *testing.T, conn *pgx.Conn) string {
	t.Helper()
	var s string
	err := conn.QueryRow(context.Background(), `SELECT string_agg(x, E'\n' ORDER BY x) FROM (
		SELECT 'rel ' || n.nspname || '.' || c.relname || ' ' || c.relkind::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
			WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
		UNION ALL SELECT 'col ' || a.attrelid::regclass || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod) || ' '
			|| a.attnotnull || ' ' || coalesce(pg_get_expr(d.adbin, d.adrelid), '')
			FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
			WHERE c.relnamespace = 'public'::regnamespace AND a.attnum > 0 AND NOT a.attisdropped
		UNION ALL SELECT 'con ' || conname || ' ' || pg_get_constraintdef(oid) FROM pg_constraint WHERE connamespace = 'public'::regnamespace
		UNION ALL SELECT 'idx ' || indexrelid::regclass || ' ' || indisvalid FROM pg_index WHERE indrelid = 'event_outbox'::regclass
		UNION ALL SELECT 'pub ' || pubname FROM pg_publication
		UNION ALL SELECT 'slot ' || slot_name FROM pg_replication_slots WHERE database = current_database()
		UNION ALL SELECT 'rows ' || count(*) || ' ' || coalesce(sum(hashtext(t::text)), 0) FROM event_outbox t
	) s(x)`).Scan(&s)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func connect(t *testing.T, dsn string) *pgx.Conn {
	t.Helper()
	conn, err := pgx.Connect(context.Background(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}

// idsWhere returns the ids of event_outbox's rows matching cond.
func idsWhere(t *testing.T, conn *pgx.Conn, cond string) []int64 {
	t.Helper()
	rows, err := conn.Query(context.Background(), "SELECT id FROM event_outbox WHERE "+cond+" ORDER BY id")
	if err != nil {
		t.Fatal(err)
	}
	ids, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	if err != nil {
		t.Fatal(err)
	}
	return ids
}

// TestAdoptSeedTable (issue 26): a table of the earlier service, TIMESTAMP or
// timestamptz, with rows in each status and NULLs where the seed allowed
// them, is adopted by migrate up in one step; producers that omit status and
// the timestamps keep working; the streamer then delivers the pending and
// failed rows exactly once, never a processed one, and fails the row without
// event_date_time with its reason.
func TestAdoptSeedTable(t *testing.T) {
	for _, timeType := range []string{"timestamp", "timestamptz"} {
		t.Run(timeType, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
			defer cancel()
			cfg := freshConfig(t)
			conn := connect(t, cfg.PostgresDSN)
			seedTable(t, conn, timeType)
			seedRows(t, conn, timeType, 500)
			undelivered := idsWhere(t, conn, "status <> 'processed' AND event_date_time IS NOT NULL")
			processed := idsWhere(t, conn, "status = 'processed'")
			seededAs := map[string][]int64{"pending": idsWhere(t, conn, "status = 'pending'"), "failed": idsWhere(t, conn, "status = 'failed'")}
			nullID := idsWhere(t, conn, "environment IS NULL AND event_context IS NULL AND status <> 'processed' AND event_date_time IS NOT NULL")[0]

			before := dbState(t, conn)
			st, err := migrations.Statuses(ctx, cfg)
			if err != nil || !st[0].Adopt || !strings.Contains(st[0].String(), "adopts it") {
				t.Fatalf("status before adoption: %v, %v; want it to say migrate up adopts the table", st, err)
			}
			plan, err := migrations.PlanPostgres(ctx, cfg)
			if err != nil {
				t.Fatalf("plan: %v", err)
			}
			if !plan.Adopt || plan.Rows != 1501 || len(plan.Statements) == 0 {
				t.Fatalf("plan: adopt=%t rows=%d, %d statements; want an adoption of 1501 rows", plan.Adopt, plan.Rows, len(plan.Statements))
			}
			if after := dbState(t, conn); after != before {
				t.Fatalf("the plan changed the database:\nbefore:\n%s\nafter:\n%s", before, after)
			}
			if _, err := migrations.UpReport(ctx, cfg); err != nil {
				t.Fatalf("migrate up: %v", err)
			}
			st, err = migrations.Statuses(ctx, cfg)
			if err != nil {
				t.Fatal(err)
			}
			for _, s := range st {
				if s.State != "up to date" {
					t.Fatalf("after adoption: %s", s)
				}
			}
			again, err := migrations.UpReport(ctx, cfg)
			if err != nil || again.Adopt {
				t.Fatalf("a second migrate up: adopt=%t, %v; want nothing to do", again.Adopt, err)
			}
			pv, err := migrations.PreviewRetention(ctx, cfg, 7*24*time.Hour)
			if err != nil || pv.Rows != int64(len(processed)) || pv.Oldest == nil {
				t.Fatalf("retention preview: %+v, %v; want the %d processed rows", pv, err, len(processed))
			}

			// A producer of the earlier service omits status and the timestamps.
			var fresh int64
			if err := conn.QueryRow(ctx, `INSERT INTO event_outbox (event_type, event_date_time, environment, event_context, metadata_version)
				VALUES ('after', now(), 'prod', '{"x":1}', 1) RETURNING id`).Scan(&fresh); err != nil {
				t.Fatalf("insert without status and timestamps after adoption: %v", err)
			}
			var status string
			var createdSet bool
			if err := conn.QueryRow(ctx, "SELECT status, created_at IS NOT NULL FROM event_outbox WHERE id = $1", fresh).Scan(&status, &createdSet); err != nil || status != "pending" || !createdSet {
				t.Fatalf("defaults: status %q, created_at set %t, %v", status, createdSet, err)
			}

			chConn := stopMerges(t, cfg)
			startPipeline(t, cfg)
			want := append(slices.Clone(undelivered), fresh)
			fixture.WaitFor(t, 2*time.Minute, "every deliverable row processed", func() bool {
				var left int64
				_ = conn.QueryRow(ctx, "SELECT count(*) FROM event_outbox WHERE status <> 'processed' AND event_date_time IS NOT NULL").Scan(&left)
				return left == 0
			})
			got := chIDs(t, chConn, cfg)
			if !slices.Equal(got, want) {
				t.Fatalf("ClickHouse holds %d events, want the %d undelivered ones once each (first got %v, first want %v)", len(got), len(want), head(got), head(want))
			}
			var bad int
			if err := conn.QueryRow(ctx, "SELECT count(*) FROM event_outbox WHERE event_date_time IS NULL AND status IN ('failed', 'dead') AND last_error LIKE '%event_date_time is NULL%'").Scan(&bad); err != nil || bad != 1 {
				t.Fatalf("the row without event_date_time: %d failed with its reason, %v; want 1", bad, err)
			}
			// NULLs delivered with their documented defaults.
			var env, ectx string
			q := "SELECT environment, toString(event_context) FROM " + table(cfg) + " WHERE event_id = ?"
			if err := chConn.QueryRow(ctx, q, uint64(nullID)).Scan(&env, &ectx); err != nil || env != "" || ectx != "{}" {
				t.Fatalf("row %d with NULL environment and event_context: %q, %q, %v; want \"\" and {}", nullID, env, ectx, err)
			}
			// Times: timestamptz as instants, TIMESTAMP as UTC wall clock, on
			// the backfill's path (a pending row) and the sweep's (a failed one).
			sel := "SELECT id, event_date_time FROM event_outbox WHERE id = ANY($1) AND updated_at IS NOT NULL AND event_type = 'type_1' ORDER BY id LIMIT 1"
			if timeType == "timestamp" {
				sel = strings.Replace(sel, "event_date_time", "event_date_time AT TIME ZONE 'UTC'", 1)
			}
			for _, status := range []string{"pending", "failed"} {
				var id int64
				var pgTime time.Time
				if err := conn.QueryRow(ctx, sel, seededAs[status]).Scan(&id, &pgTime); err != nil {
					t.Fatal(err)
				}
				var chTime time.Time
				if err := chConn.QueryRow(ctx, "SELECT event_date_time FROM "+table(cfg)+" WHERE event_id = ?", uint64(id)).Scan(&chTime); err != nil {
					t.Fatal(err)
				}
				if !chTime.Equal(pgTime) {
					t.Fatalf("event_date_time of %s row %d: ClickHouse %s, PostgreSQL %s", status, id, chTime, pgTime)
				}
			}
			for _, p := range processed[:3] {
				if slices.Contains(got, p) {
					t.Fatalf("processed row %d was sent again", p)
				}
			}
		})
	}
}

func head(ids []int64) []int64 { return ids[:min(len(ids), 5)] }

func table(cfg migrations.Config) string {
	return sink.QuoteIdent(cfg.ClickHouse.Database) + "." + sink.QuoteIdent(cfg.ClickHouse.Table)
}

// stopMerges keeps every inserted row visible (a ReplacingMergeTree merge
// would hide a duplicate) and returns a connection to the event table's
// database.
func stopMerges(t *testing.T, cfg migrations.Config) clickhouse.Conn {
	t.Helper()
	conn := chConnect(t, cfg)
	if err := conn.Exec(context.Background(), "SYSTEM STOP MERGES "+table(cfg)); err != nil {
		t.Fatal(err)
	}
	return conn
}

// chIDs returns every event_id of the event table, sorted, duplicates kept.
func chIDs(t *testing.T, conn clickhouse.Conn, cfg migrations.Config) []int64 {
	t.Helper()
	rows, err := conn.Query(context.Background(), "SELECT event_id FROM "+table(cfg)+" ORDER BY event_id")
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var ids []int64
	for rows.Next() {
		var id uint64
		if err := rows.Scan(&id); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, int64(id))
	}
	return ids
}

// startPipeline runs the streamer in-process with a sweep every 200 ms until
// the test ends.
func startPipeline(t *testing.T, cfg migrations.Config) {
	t.Helper()
	pcfg := pipeline.Config{
		Replication: replication.Config{DSN: cfg.PostgresDSN, Slot: "s_adopt", Publication: cfg.Publication, StatusInterval: 100 * time.Millisecond},
		Run:         replication.RunConfig{BatchSize: 1000, BatchTimeout: 50 * time.Millisecond},
		Sink:        cfg.ClickHouse, SweepInterval: 200 * time.Millisecond,
	}
	fixture.RunPipeline(t, pcfg, zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel)))
}

// TestAdoptRefused: a table adoption cannot take is refused with one line
// saying what to do, and PostgreSQL and ClickHouse are left exactly as they
// were (no version table, no publication, no event table).
func TestAdoptRefused(t *testing.T) {
	cases := []struct {
		name, breakIt, want string
	}{
		{"no primary key", "ALTER TABLE event_outbox DROP CONSTRAINT event_outbox_pkey", "ADD PRIMARY KEY (id)"},
		{"unreadable context", "ALTER TABLE event_outbox ALTER COLUMN event_context TYPE bytea USING convert_to(event_context::text, 'UTF8')", "TYPE jsonb USING"},
		{"no event time", "ALTER TABLE event_outbox DROP COLUMN event_date_time", "has no column event_date_time"},
		{"unknown status", "UPDATE event_outbox SET status = NULL WHERE id % 100 = 0; UPDATE event_outbox SET status = 'sent' WHERE id % 100 = 1", "status IS NULL"},
		{"a view", "ALTER TABLE event_outbox RENAME TO old_outbox; CREATE VIEW event_outbox AS SELECT * FROM old_outbox", "not a table"},
		{"invalid index", "CREATE INDEX event_outbox_undelivered_idx ON event_outbox (id); UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'event_outbox_undelivered_idx'::regclass", "DROP INDEX"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			cfg := freshConfig(t)
			conn := connect(t, cfg.PostgresDSN)
			seedTable(t, conn, "timestamp")
			seedRows(t, conn, "timestamp", 100)
			if _, err := conn.Exec(ctx, c.breakIt); err != nil {
				t.Fatal(err)
			}
			before := dbState(t, conn)
			_, planErr := migrations.PlanPostgres(ctx, cfg)
			err := migrations.Up(ctx, cfg)
			var ae *migrations.AdoptionError
			if !errors.As(err, &ae) || !errors.As(planErr, &ae) {
				t.Fatalf("migrate up: %v; plan: %v; want an *AdoptionError from both", err, planErr)
			}
			t.Logf("refused: %v", err)
			if msg := err.Error(); !strings.Contains(msg, c.want) || strings.Contains(msg, "\n") || !strings.Contains(msg, "nothing was changed") {
				t.Fatalf("refusal %q: want one line naming %q", msg, c.want)
			}
			if after := dbState(t, conn); after != before {
				t.Fatalf("a refused adoption changed the database:\nbefore:\n%s\nafter:\n%s", before, after)
			}
			if n := chTables(t, cfg); n != 0 {
				t.Fatalf("a refused adoption created %d ClickHouse tables", n)
			}
		})
	}
}

func chTables(t *testing.T, cfg migrations.Config) uint64 {
	t.Helper()
	srv := testenv.ModernClickHouse(t)
	conn, err := clickhouse.Open(srv.Options("system"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	var n uint64
	if err := conn.QueryRow(context.Background(), "SELECT count() FROM system.tables WHERE database = ?", cfg.ClickHouse.Database).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// TestAdoptAfterFailedMigration: today's main left a seed table's database
// at version 1, dirty (migration 1 failed on the missing column, and rolled
// back). migrate up adopts it; a dirty version on a fresh database is run
// again instead of asking for migrate force.
func TestAdoptAfterFailedMigration(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	t.Run("seed table", func(t *testing.T) {
		cfg := freshConfig(t)
		conn := connect(t, cfg.PostgresDSN)
		seedTable(t, conn, "timestamp")
		if _, err := conn.Exec(ctx, `CREATE TABLE outbox_streamer_migrations (version bigint not null primary key, dirty boolean not null);
			INSERT INTO outbox_streamer_migrations VALUES (1, true)`); err != nil {
			t.Fatal(err)
		}
		if err := migrations.Up(ctx, cfg); err != nil {
			t.Fatalf("migrate up on a dirty seed table: %v", err)
		}
		assertClean(t, conn)
	})
	t.Run("fresh database", func(t *testing.T) {
		cfg := freshConfig(t)
		conn := connect(t, cfg.PostgresDSN)
		if _, err := conn.Exec(ctx, `CREATE TABLE outbox_streamer_migrations (version bigint not null primary key, dirty boolean not null);
			INSERT INTO outbox_streamer_migrations VALUES (1, true)`); err != nil {
			t.Fatal(err)
		}
		if err := migrations.Up(ctx, cfg); err != nil {
			t.Fatalf("migrate up on a dirty fresh database: %v", err)
		}
		assertClean(t, conn)
	})
}

// assertClean checks the latest version, clean, and the objects the streamer needs.
func assertClean(t *testing.T, conn *pgx.Conn) {
	t.Helper()
	var v int64
	var dirty, objects bool
	err := conn.QueryRow(context.Background(), `SELECT version, dirty,
		to_regclass('outbox_checkpoint') IS NOT NULL AND EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'outbox_publication')
		AND to_regclass('event_outbox_undelivered_idx') IS NOT NULL
		FROM outbox_streamer_migrations`).Scan(&v, &dirty, &objects)
	if err != nil || v != int64(migrations.LatestPostgres()) || dirty || !objects {
		t.Fatalf("version %d dirty %t objects %t, %v; want version %d, clean, with the checkpoint table, publication and index", v, dirty, objects, err, migrations.LatestPostgres())
	}
}

// TestAdoptWhileProducersInsert: producers of the earlier service keep
// inserting while migrate up adopts the table; none of them fails (they wait
// for the adoption's lock), and every row they committed is there.
func TestAdoptWhileProducersInsert(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cfg := freshConfig(t)
	conn := connect(t, cfg.PostgresDSN)
	seedTable(t, conn, "timestamp")
	seedRows(t, conn, "timestamp", 20000)
	var seeded int64
	if err := conn.QueryRow(ctx, "SELECT count(*) FROM event_outbox").Scan(&seeded); err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	var inserted, afterAdoption atomic.Int64
	var adopted atomic.Bool
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p, err := pgx.Connect(ctx, cfg.PostgresDSN)
			if err != nil {
				errs <- err
				return
			}
			defer p.Close(context.Background())
			for {
				select {
				case <-stop:
					return
				default:
				}
				was := adopted.Load()
				_, err := p.Exec(ctx, `INSERT INTO event_outbox (event_type, event_date_time, environment, event_context, metadata_version, status, created_at, updated_at)
					VALUES ('during', now(), 'prod', '{}', 1, 'pending', now() AT TIME ZONE 'UTC', now() AT TIME ZONE 'UTC')`)
				if err != nil {
					errs <- err
					return
				}
				inserted.Add(1)
				if was {
					afterAdoption.Add(1)
				}
			}
		}()
	}
	fixture.WaitFor(t, 30*time.Second, "producers inserting", func() bool { return inserted.Load() > 100 })
	err := migrations.Up(ctx, cfg)
	adopted.Store(true)
	fixture.WaitFor(t, 30*time.Second, "producers inserting after the adoption", func() bool { return afterAdoption.Load() > 100 })
	close(stop)
	wg.Wait()
	close(errs)
	if err != nil {
		t.Fatalf("migrate up: %v", err)
	}
	for err := range errs {
		t.Fatalf("a producer failed during the adoption: %v", err)
	}
	var total int64
	if err := conn.QueryRow(ctx, "SELECT count(*) FROM event_outbox").Scan(&total); err != nil {
		t.Fatal(err)
	}
	if total != seeded+inserted.Load() {
		t.Fatalf("%d rows, want %d seeded + %d inserted", total, seeded, inserted.Load())
	}
	assertClean(t, conn)
}

// TestAdoptKilledMidway: `outbox-streamer migrate up` SIGKILLed while it
// builds the partial index of a large adopted table leaves the database as it
// was, and the next migrate up completes.
func TestAdoptKilledMidway(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary and a 2,000,000-row table")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	bin := filepath.Join(t.TempDir(), "outbox-streamer")
	if out, err := exec.CommandContext(ctx, "go", "build", "-o", bin, "github.com/outbox-streamer/outbox-streamer/cmd/outbox-streamer").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	cfg := freshConfig(t)
	conn := connect(t, cfg.PostgresDSN)
	seedTable(t, conn, "timestamp")
	if _, err := conn.Exec(ctx, `INSERT INTO event_outbox (event_type, event_date_time, environment, event_context, metadata_version, status, created_at, updated_at)
		SELECT 't', now(), 'prod', '{}', 1, CASE WHEN g % 2 = 0 THEN 'processed' ELSE 'pending' END, now(), now()
		FROM generate_series(1, 2000000) g`); err != nil {
		t.Fatal(err)
	}
	before := dbState(t, conn)
	host, port, _ := net.SplitHostPort(cfg.ClickHouse.Addr)
	env := append(os.Environ(), "DATABASE_URL="+cfg.PostgresDSN, "CLICKHOUSE_HOST="+host, "CLICKHOUSE_PORT="+port,
		"CLICKHOUSE_SCHEMA="+cfg.ClickHouse.Database, "OUTBOX_RETENTION=0")
	cmd := exec.Command(bin, "migrate", "up")
	cmd.Env = env
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	fixture.WaitFor(t, time.Minute, "the adoption building its index", func() bool {
		var building bool
		_ = conn.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM pg_stat_progress_create_index WHERE relid = 'event_outbox'::regclass)").Scan(&building)
		return building
	})
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = cmd.Wait()
	// The server rolls the transaction back once its backend sees the client gone.
	fixture.WaitFor(t, time.Minute, "the killed migration's backends gone", func() bool {
		var n int
		_ = conn.QueryRow(ctx, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()").Scan(&n)
		return n == 0
	})
	if after := dbState(t, conn); after != before {
		t.Fatalf("a killed adoption changed the database:\nbefore:\n%s\nafter:\n%s", before, after)
	}
	again := exec.Command(bin, "migrate", "up")
	again.Env = env
	if out, err := again.CombinedOutput(); err != nil {
		t.Fatalf("migrate up after the kill: %v\n%s", err, out)
	}
	assertClean(t, conn)
}

// TestStatusCreatesNothing (issue 26 item 7): migrate status with a
// ClickHouse database that does not exist used to create it and the version
// table; PostgreSQL's version table too. A probe changes nothing.
func TestStatusCreatesNothing(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cfg := freshConfig(t)
	cfg.ClickHouse.Database = "typo_" + strings.TrimPrefix(cfg.ClickHouse.Database, "t_")
	conn := connect(t, cfg.PostgresDSN)
	before := dbStateNoOutbox(t, conn)
	st, err := migrations.Statuses(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range st {
		if s.Version != 0 || s.State != "pending" {
			t.Fatalf("status of empty databases: %s", s)
		}
	}
	if after := dbStateNoOutbox(t, conn); after != before {
		t.Fatalf("migrate status changed PostgreSQL:\nbefore:\n%s\nafter:\n%s", before, after)
	}
	srv := testenv.ModernClickHouse(t)
	ch, err := clickhouse.Open(srv.Options("system"))
	if err != nil {
		t.Fatal(err)
	}
	defer ch.Close()
	var n uint64
	if err := ch.QueryRow(ctx, "SELECT count() FROM system.databases WHERE name = ?", cfg.ClickHouse.Database).Scan(&n); err != nil || n != 0 {
		t.Fatalf("migrate status created ClickHouse database %s (%d, %v)", cfg.ClickHouse.Database, n, err)
	}
}

func dbStateNoOutbox(t *testing.T, conn *pgx.Conn) string {
	t.Helper()
	var s string
	if err := conn.QueryRow(context.Background(), `SELECT coalesce(string_agg(n.nspname || '.' || c.relname, ',' ORDER BY 1), '')
		FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')`).Scan(&s); err != nil {
		t.Fatal(err)
	}
	return s
}

// TestAdoptRefusesForeignEventLog (issue 26 item 6): an event_log of another
// schema (the earlier service's) is refused with one line naming the
// differences and the choices, before anything changes in either database.
func TestAdoptRefusesForeignEventLog(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cfg := freshConfig(t)
	conn := connect(t, cfg.PostgresDSN)
	seedTable(t, conn, "timestamp")
	ch := chConnect(t, cfg)
	if err := ch.Exec(ctx, "CREATE TABLE "+table(cfg)+` (id UInt64, event_type String, event_date_time DateTime,
		environment String, event_context String, metadata_version UInt64) ENGINE = MergeTree ORDER BY id`); err != nil {
		t.Fatal(err)
	}
	before := dbState(t, conn)
	err := migrations.Up(ctx, cfg)
	var mm *sink.SchemaMismatch
	if !errors.As(err, &mm) {
		t.Fatalf("migrate up over a foreign event_log: %v; want a *sink.SchemaMismatch", err)
	}
	t.Logf("refused: %v", err)
	msg := err.Error()
	for _, want := range []string{"missing event_id", "metadata_version is UInt64", "missing commit_lsn", "CLICKHOUSE_EVENT_LOG_TABLE_NAME"} {
		if !strings.Contains(msg, want) {
			t.Fatalf("refusal %q does not name %q", msg, want)
		}
	}
	if after := dbState(t, conn); after != before {
		t.Fatalf("the refusal changed PostgreSQL:\nbefore:\n%s\nafter:\n%s", before, after)
	}
	if n := chTables(t, cfg); n != 1 {
		t.Fatalf("ClickHouse database holds %d tables after the refusal, want the foreign one only", n)
	}
}

// chConnect connects to the event table's ClickHouse database.
func chConnect(t *testing.T, cfg migrations.Config) clickhouse.Conn {
	t.Helper()
	srv := testenv.ModernClickHouse(t)
	conn, err := clickhouse.Open(srv.Options(cfg.ClickHouse.Database))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// TestRunChecksBeforeSlot (issue 26 item 8): with the publication made by
// hand but no outbox_checkpoint and no retry columns, the stream refuses to
// start, names migrate up, and creates no replication slot.
func TestRunChecksBeforeSlot(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cfg := freshConfig(t)
	conn := connect(t, cfg.PostgresDSN)
	seedTable(t, conn, "timestamp")
	if _, err := conn.Exec(ctx, "CREATE PUBLICATION outbox_publication FOR TABLE event_outbox WITH (publish = 'insert')"); err != nil {
		t.Fatal(err)
	}
	_, err := replication.Open(ctx, replication.Config{DSN: cfg.PostgresDSN, Slot: "s_adopt", Publication: "outbox_publication"}, zap.NewNop())
	var pre *replication.PreconditionError
	if !errors.As(err, &pre) || !strings.Contains(pre.Hint, "migrate up") || !strings.Contains(pre.Problem, "outbox_checkpoint") {
		t.Fatalf("open: %v; want a precondition naming outbox_checkpoint and migrate up", err)
	}
	var slots int
	if err := conn.QueryRow(ctx, "SELECT count(*) FROM pg_replication_slots WHERE database = current_database()").Scan(&slots); err != nil || slots != 0 {
		t.Fatalf("%d replication slots (%v); want none", slots, err)
	}
}

// TestAdoptRetentionAnnounced (issue 26 item 5): the first prune after an
// adoption logs how many processed rows it is about to remove, and the
// oldest, before removing them.
func TestAdoptRetentionAnnounced(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cfg := freshConfig(t)
	conn := connect(t, cfg.PostgresDSN)
	seedTable(t, conn, "timestamp")
	seedRows(t, conn, "timestamp", 200)
	processed := idsWhere(t, conn, "status = 'processed'")
	if err := migrations.Up(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	pool, err := pgxpool.New(ctx, cfg.PostgresDSN)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	core, logs := observer.New(zap.InfoLevel)
	p := outboxstore.NewPruner(outboxstore.PruneConfig{Retention: 7 * 24 * time.Hour}, pool, zap.New(core))
	res, err := p.Maintain(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if res.Removed != int64(len(processed)) {
		t.Fatalf("the first prune removed %d rows, want the %d processed ones", res.Removed, len(processed))
	}
	entries := logs.All()
	if len(entries) == 0 || !strings.Contains(entries[0].Message, "retention is about to remove") {
		t.Fatalf("first log entries %v: want the announcement first", entries)
	}
	fields := entries[0].ContextMap()
	if fields["rows"] != int64(len(processed)) || fields["oldest_created_at"] == nil {
		t.Fatalf("announcement fields %v: want rows=%d and the oldest row", fields, len(processed))
	}
	if _, err := p.Maintain(ctx); err != nil {
		t.Fatal(err)
	}
	for _, e := range logs.All()[1:] {
		if strings.Contains(e.Message, "about to remove") {
			t.Fatalf("announced twice: %v", e)
		}
	}
}

// TestAdoptOtherShapes: an outbox in its own schema (OUTBOX_TABLE=
// billing.event_outbox) and a range-partitioned one are adopted too.
func TestAdoptOtherShapes(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	t.Run("schema", func(t *testing.T) {
		cfg := freshConfig(t)
		cfg.Outbox = outboxstore.Name{Schema: "billing", Table: "event_outbox"}
		cfg.Publication = "billing_publication"
		conn := connect(t, cfg.PostgresDSN)
		if _, err := conn.Exec(ctx, "CREATE SCHEMA billing; SET search_path = billing"); err != nil {
			t.Fatal(err)
		}
		seedTable(t, conn, "timestamptz")
		if err := migrations.Up(ctx, cfg); err != nil {
			t.Fatalf("migrate up: %v", err)
		}
		var v int64
		var dirty, published bool
		if err := conn.QueryRow(ctx, `SELECT version, dirty, EXISTS (SELECT 1 FROM pg_publication_tables
			WHERE pubname = 'billing_publication' AND schemaname = 'billing' AND tablename = 'event_outbox')
			FROM billing.outbox_streamer_migrations`).Scan(&v, &dirty, &published); err != nil || v != int64(migrations.LatestPostgres()) || dirty || !published {
			t.Fatalf("version %d dirty %t published %t, %v", v, dirty, published, err)
		}
	})
	t.Run("partitioned", func(t *testing.T) {
		cfg := freshConfig(t)
		conn := connect(t, cfg.PostgresDSN)
		if _, err := conn.Exec(ctx, `CREATE TABLE event_outbox (id BIGSERIAL, event_type VARCHAR(255) NOT NULL,
			event_date_time TIMESTAMP, environment VARCHAR(50), event_context JSONB, metadata_version BIGINT,
			status VARCHAR(20), created_at TIMESTAMP NOT NULL, updated_at TIMESTAMP, PRIMARY KEY (id, created_at))
			PARTITION BY RANGE (created_at);
			CREATE TABLE event_outbox_default PARTITION OF event_outbox DEFAULT;
			INSERT INTO event_outbox (event_type, event_date_time, status, created_at) VALUES ('t', now(), 'pending', now())`); err != nil {
			t.Fatal(err)
		}
		if err := migrations.Up(ctx, cfg); err != nil {
			t.Fatalf("migrate up: %v", err)
		}
		assertClean(t, conn)
		var viaRoot bool
		if err := conn.QueryRow(ctx, "SELECT pubviaroot FROM pg_publication WHERE pubname = 'outbox_publication'").Scan(&viaRoot); err != nil || !viaRoot {
			t.Fatalf("publish_via_partition_root %t, %v", viaRoot, err)
		}
	})
}

// TestRunRefusesForeignEventLog: an event table replaced by one of another
// schema after migrate up is refused when the streamer starts, before it
// creates a replication slot; nothing is inserted into it.
func TestRunRefusesForeignEventLog(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cfg := freshConfig(t)
	if err := migrations.Up(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	ch := chConnect(t, cfg)
	if err := ch.Exec(ctx, "DROP TABLE "+table(cfg)); err != nil {
		t.Fatal(err)
	}
	if err := ch.Exec(ctx, "CREATE TABLE "+table(cfg)+` (id UInt64, event_type String, event_date_time DateTime)
		ENGINE = MergeTree ORDER BY id`); err != nil {
		t.Fatal(err)
	}
	conn := connect(t, cfg.PostgresDSN)
	if _, err := conn.Exec(ctx, "INSERT INTO event_outbox (event_type, event_date_time) VALUES ('a', now())"); err != nil {
		t.Fatal(err)
	}
	pcfg := pipeline.Config{
		Replication: replication.Config{DSN: cfg.PostgresDSN, Slot: "s_adopt", Publication: cfg.Publication},
		Run:         replication.RunConfig{BatchSize: 1000, BatchTimeout: 50 * time.Millisecond},
		Sink:        cfg.ClickHouse, SweepInterval: 200 * time.Millisecond,
	}
	err := pipeline.Stream(ctx, context.Background(), pcfg, zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel)))
	var mm *sink.SchemaMismatch
	if !errors.As(err, &mm) {
		t.Fatalf("stream over a foreign event table: %v; want a *sink.SchemaMismatch", err)
	}
	var slots, rows uint64
	if err := conn.QueryRow(ctx, "SELECT count(*) FROM pg_replication_slots WHERE database = current_database()").Scan(&slots); err != nil || slots != 0 {
		t.Fatalf("%d replication slots (%v); want none", slots, err)
	}
	if err := ch.QueryRow(ctx, "SELECT count() FROM "+table(cfg)).Scan(&rows); err != nil || rows != 0 {
		t.Fatalf("%d rows in the foreign table (%v); want none", rows, err)
	}
}

// TestFailedMigrationLeavesNoDirtyVersion: a PostgreSQL migration that fails
// is rolled back with its version (golang-migrate marked it dirty first), and
// the next migrate up, once the cause is gone, applies it; no migrate force.
func TestFailedMigrationLeavesNoDirtyVersion(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cfg := freshConfig(t)
	conn := connect(t, cfg.PostgresDSN)
	// An event trigger makes the migration's last statement fail, after it
	// created the tables.
	if _, err := conn.Exec(ctx, `CREATE FUNCTION refuse() RETURNS event_trigger LANGUAGE plpgsql AS
		$$BEGIN RAISE EXCEPTION 'publications are refused here'; END$$;
		CREATE EVENT TRIGGER refuse_publications ON ddl_command_end WHEN TAG IN ('CREATE PUBLICATION') EXECUTE FUNCTION refuse()`); err != nil {
		t.Fatal(err)
	}
	before := dbStateNoOutbox(t, conn)
	err := migrations.Up(ctx, cfg)
	if err == nil || !strings.Contains(err.Error(), "rolled back") || strings.Contains(err.Error(), "CREATE TABLE IF NOT EXISTS") {
		t.Fatalf("migrate up: %v; want the server's error, said to be rolled back, without the migration's SQL", err)
	}
	st, err := migrations.Statuses(ctx, cfg)
	if err != nil || st[0].Dirty || st[0].Version != 0 {
		t.Fatalf("status after the failure: %v, %v; want version 0, clean", st, err)
	}
	// golang-migrate's version table (created before the migration runs,
	// empty now) is the only relation left.
	after := strings.TrimSuffix(dbStateNoOutbox(t, conn), "public.outbox_streamer_migrations,public.outbox_streamer_migrations_pkey")
	if after != before {
		t.Fatalf("the failed migration left relations behind:\nbefore: %s\nafter:  %s", before, after)
	}
	if _, err := conn.Exec(ctx, "DROP EVENT TRIGGER refuse_publications"); err != nil {
		t.Fatal(err)
	}
	if err := migrations.Up(ctx, cfg); err != nil {
		t.Fatalf("migrate up once the cause is gone: %v", err)
	}
	assertClean(t, conn)
}
