package main

import (
	"bytes"
	"context"
	"sort"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/testenv"
	"github.com/outbox-streamer/outbox-streamer/migrations"
)

func TestMain(m *testing.M) { testenv.Main(m) }

func TestRunCount(t *testing.T) {
	dsn := testenv.NewDatabase(t)
	ctx := context.Background()
	files, err := migrations.Rendered("postgres", migrations.PostgresData("p"))
	if err != nil {
		t.Fatal(err)
	}
	pool, err := pgxpool.New(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	var names []string
	for name := range files {
		if strings.HasSuffix(name, ".up.sql") {
			names = append(names, name)
		}
	}
	sort.Strings(names)
	for _, name := range names {
		if _, err := pool.Exec(ctx, files[name]); err != nil {
			t.Fatal(err)
		}
	}

	var stdout, stderr bytes.Buffer
	getenv := func(k string) string {
		if k == "DATABASE_URL" {
			return dsn
		}
		return ""
	}
	code := run(ctx, []string{"--count", "300", "--tx-size", "25", "--rollback-fraction", "0.3", "--copy", "--seed", "3"}, &stdout, &stderr, getenv)
	if code != 0 {
		t.Fatalf("exit %d\nstdout:\n%s\nstderr:\n%s", code, &stdout, &stderr)
	}
	t.Logf("output:\n%s", &stdout)
	if !strings.Contains(stdout.String(), "committed 300 events in 12 transactions") || !strings.Contains(stdout.String(), "(seed 3)") {
		t.Fatalf("summary missing from:\n%s", &stdout)
	}
	var n int64
	if err := pool.QueryRow(ctx, "SELECT count(*) FROM event_outbox").Scan(&n); err != nil || n != 300 {
		t.Fatalf("%d rows, %v; want 300", n, err)
	}
}

func TestRunUsageErrors(t *testing.T) {
	none := func(string) string { return "" }
	for _, args := range [][]string{
		{},                             // no DSN
		{"--dsn", "x", "--rate", "-1"}, // invalid config
		{"--dsn", "x", "extra"},        // stray argument
		{"--no-such-flag"},
	} {
		var stdout, stderr bytes.Buffer
		if code := run(context.Background(), args, &stdout, &stderr, none); code != 2 {
			t.Errorf("%q: exit %d, want 2 (stderr: %s)", args, code, &stderr)
		}
	}
	var stdout, stderr bytes.Buffer
	if code := run(context.Background(), []string{"--help"}, &stdout, &stderr, none); code != 0 || !strings.Contains(stderr.String(), "rollback-fraction") {
		t.Errorf("--help: exit %d, output %s", code, &stderr)
	}
}
