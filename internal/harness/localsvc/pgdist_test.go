package localsvc_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/localsvc"
)

// TestPostgresMajors starts every supported major (downloading the missing
// ones) and decodes one insert through pgoutput, the plugin the streamer
// needs: the package's libraries and links must all be in place.
func TestPostgresMajors(t *testing.T) {
	for _, major := range localsvc.PGMajors() {
		t.Run(fmt.Sprintf("pg%d", major), func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
			defer cancel()
			pg, err := localsvc.StartPostgres(ctx, localsvc.PostgresOptions{Major: major})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = pg.Stop() })
			if pg.Major != major {
				t.Fatalf("server reports major %d (%s), want %d", pg.Major, pg.Version, major)
			}
			if n := pgoutputChanges(ctx, t, pg.DSN()); n < 3 {
				t.Fatalf("pgoutput gave %d messages for one inserted row, want begin, relation, insert, commit", n)
			}
		})
	}
}

// TestPostgresMajorFromEnvironment: OUTBOX_PG_VERSION picks the binaries of
// servers whose options name none, and a value outside the supported majors
// is refused with the list.
func TestPostgresMajorFromEnvironment(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	t.Setenv(localsvc.EnvPGBinDir, "")
	t.Setenv(localsvc.EnvPGVersion, "17")
	pg, err := localsvc.StartPostgres(ctx, localsvc.PostgresOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pg.Stop() })
	if pg.Major != 17 {
		t.Fatalf("%s=17 started %s", localsvc.EnvPGVersion, pg.Version)
	}
	t.Setenv(localsvc.EnvPGVersion, "12")
	_, err = localsvc.StartPostgres(ctx, localsvc.PostgresOptions{})
	if err == nil || !strings.Contains(err.Error(), "want one of") {
		t.Fatalf("%s=12: err = %v, want the list of supported majors", localsvc.EnvPGVersion, err)
	}
}

// pgoutputChanges inserts a row into a published table and counts the
// pgoutput messages a fresh slot decodes.
func pgoutputChanges(ctx context.Context, t *testing.T, dsn string) int {
	t.Helper()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	for _, q := range []string{
		"CREATE TABLE t (id int PRIMARY KEY, v text)",
		"CREATE PUBLICATION p FOR TABLE t",
		"SELECT pg_create_logical_replication_slot('s', 'pgoutput')",
		"INSERT INTO t VALUES (1, 'one')",
	} {
		if _, err := conn.Exec(ctx, q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	var n int
	err = conn.QueryRow(ctx, `SELECT count(*) FROM pg_logical_slot_peek_binary_changes('s', NULL, NULL,
		'proto_version', '1', 'publication_names', 'p')`).Scan(&n)
	if err != nil {
		t.Fatalf("decode with pgoutput: %v", err)
	}
	return n
}
