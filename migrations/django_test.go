package migrations_test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/fixture"
	"github.com/outbox-streamer/outbox-streamer/migrations"
)

// djangoPython is Debian's python3, which sees python3-django and
// python3-psycopg2 (another python3 first on PATH may not).
const djangoPython = "/usr/bin/python3"

// django runs testdata/django/manage.py with args against dsn.
func django(t *testing.T, dsn string, useTZ bool, args ...string) string {
	t.Helper()
	dir, err := filepath.Abs("testdata/django")
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(djangoPython, append([]string{"manage.py"}, args...)...)
	cmd.Dir = dir
	tz := "0"
	if useTZ {
		tz = "1"
	}
	cmd.Env = append(os.Environ(), "DATABASE_URL="+dsn, "USE_TZ="+tz, "PYTHONPATH="+dir, "PYTHONDONTWRITEBYTECODE=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("manage.py %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// TestAdoptDjangoOutbox follows docs/migrating-from-celery.md with the
// earlier service's real Django model: Django's migration creates
// event_outbox, the application writes events through the ORM inside
// transaction.atomic() with nested savepoints (some rolled back) and the
// Celery task's outcome leaves processed, failed and pending rows; then
// migrate up adopts the table, the application keeps writing, and the
// streamer delivers every pending and failed row and every new one exactly
// once, no processed one, and nothing of a rolled-back savepoint.
func TestAdoptDjangoOutbox(t *testing.T) {
	if err := exec.Command(djangoPython, "-c", "import django, psycopg2").Run(); err != nil {
		t.Skip("Django is missing: apt-get install -y python3-django python3-psycopg2 (scripts/install-deps.sh installs them)")
	}
	for _, useTZ := range []bool{false, true} {
		name := "USE_TZ=False"
		if useTZ {
			name = "USE_TZ=True"
		}
		t.Run(name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
			defer cancel()
			cfg := freshConfig(t)
			django(t, cfg.PostgresDSN, useTZ, "migrate")
			django(t, cfg.PostgresDSN, useTZ, "seed", "100")
			conn := connect(t, cfg.PostgresDSN)
			var timeType string
			if err := conn.QueryRow(ctx, "SELECT format_type(atttypid, NULL) FROM pg_attribute WHERE attrelid = 'event_outbox'::regclass AND attname = 'created_at'").Scan(&timeType); err != nil {
				t.Fatal(err)
			}
			// Django's PostgreSQL backend makes every DateTimeField
			// timestamptz, whatever USE_TZ says; USE_TZ=False writes naive
			// times in TIME_ZONE, which the server converts.
			if timeType != "timestamp with time zone" {
				t.Fatalf("Django made created_at %s, want timestamp with time zone", timeType)
			}
			undelivered := idsWhere(t, conn, "status <> 'processed'")
			if len(undelivered) == 0 || len(idsWhere(t, conn, "status = 'processed'")) == 0 {
				t.Fatal("the seed left no processed or no undelivered rows")
			}

			if err := migrations.Up(ctx, cfg); err != nil {
				t.Fatalf("migrate up on Django's table: %v", err)
			}
			assertClean(t, conn)
			django(t, cfg.PostgresDSN, useTZ, "migrate") // the application's deploys keep running it
			chConn := stopMerges(t, cfg)
			startPipeline(t, cfg)
			produced, err := strconv.Atoi(strings.TrimSpace(django(t, cfg.PostgresDSN, useTZ, "produce", "200")))
			if err != nil || produced != 160 {
				t.Fatalf("the application wrote %d events after the switch (%v), want 160 (every 5th rolled back)", produced, err)
			}
			fixture.WaitFor(t, 2*time.Minute, "every row processed", func() bool {
				var left int64
				_ = conn.QueryRow(ctx, "SELECT count(*) FROM event_outbox WHERE status <> 'processed'").Scan(&left)
				return left == 0
			})
			after := idsWhere(t, conn, "event_type = 'after_switch'")
			if len(after) != produced {
				t.Fatalf("%d rows written after the switch in the outbox, want %d", len(after), produced)
			}
			want := append(slices.Clone(undelivered), after...)
			slices.Sort(want)
			got := chIDs(t, chConn, cfg)
			if !slices.Equal(got, want) {
				t.Fatalf("ClickHouse holds %d events, want the %d undelivered and new ones once each (first got %v, first want %v)", len(got), len(want), head(got), head(want))
			}
			var rolledBack uint64
			if err := chConn.QueryRow(ctx, "SELECT count() FROM "+table(cfg)+" WHERE event_type = 'rolled_back'").Scan(&rolledBack); err != nil || rolledBack != 0 {
				t.Fatalf("%d events of rolled-back savepoints in ClickHouse (%v)", rolledBack, err)
			}
		})
	}
}
