package replication

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/localsvc"
	"github.com/outbox-streamer/outbox-streamer/internal/harness/testenv"
	"github.com/outbox-streamer/outbox-streamer/migrations"
	"github.com/outbox-streamer/outbox-streamer/sink"
)

func TestMain(m *testing.M) { testenv.Main(m) }

var updateGolden = flag.Bool("update-golden", false, "capture testdata/pgoutput/*.bin from a real server")

// goldenDir holds one directory of captures per PostgreSQL major, pg<major>:
// the byte formats are the same by the documentation, and these files are
// how we know the servers agree.
const goldenDir = "testdata/pgoutput"

// goldenMajorDir is where captures from PostgreSQL major are kept.
func goldenMajorDir(major int) string { return filepath.Join(goldenDir, fmt.Sprintf("pg%d", major)) }

// forEachGoldenMajor runs f in a subtest per supported major from minMajor
// on, failing when a major has no capture.
func forEachGoldenMajor(t *testing.T, minMajor int, f func(t *testing.T, dir string)) {
	for _, major := range localsvc.PGMajors() {
		if major < minMajor {
			continue
		}
		t.Run(fmt.Sprintf("pg%d", major), func(t *testing.T) {
			dir := goldenMajorDir(major)
			if _, err := os.Stat(dir); err != nil {
				t.Fatalf("no capture from PostgreSQL %d: %v (run: OUTBOX_PG_VERSION=%d bin/outbox-devenv -- go test ./replication -run 'TestCaptureGolden' -update-golden)", major, err, major)
			}
			f(t, dir)
		})
	}
}

// TestGoldenMessages decodes messages captured from a real server of every
// supported major (an insert of a known row, see TestCaptureGolden) and
// checks every field.
func TestGoldenMessages(t *testing.T) {
	forEachGoldenMajor(t, 0, checkGoldenMessages)
}

func checkGoldenMessages(t *testing.T, dir string) {
	files, _ := filepath.Glob(filepath.Join(dir, "0*.bin"))
	sort.Strings(files)
	if len(files) == 0 {
		t.Fatalf("no golden messages in %s", dir)
	}
	d := NewDecoder("public", "event_outbox", nil)
	var kinds []Kind
	var got Message
	var insert Message
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if err := d.Decode(data, &got); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		kinds = append(kinds, got.Kind)
		if got.Kind == KindInsert {
			insert = got
		}
	}
	want := []Kind{KindBegin, KindRelation, KindInsert, KindCommit}
	if fmt.Sprint(kinds) != fmt.Sprint(want) {
		t.Fatalf("kinds = %v, want %v", kinds, want)
	}
	ev := insert.Event
	if ev.Type != "golden.event" || ev.Environment != "prod" || ev.Context != `{"k": "v", "n": 1}` || ev.MetadataVersion != 7 ||
		!ev.Time.Equal(time.Date(2026, 11, 23, 18, 49, 29, 123456000, time.UTC)) || ev.ID == 0 || ev.Problem != "" || ev.CommitLSN == 0 {
		t.Fatalf("decoded event = %+v", ev)
	}
}

// goldenSession migrates a fresh database and opens a replication connection
// to it with the streamer's settings plus extra ones (replicationConn).
func goldenSession(ctx context.Context, t *testing.T, extra map[string]string) (string, *pgconn.PgConn) {
	t.Helper()
	dsn := testenv.NewDatabase(t)
	srv := testenv.ModernClickHouse(t)
	chCfg := sink.Config{Addr: srv.Addr, Database: testenv.NewCHDatabase(t, srv)}
	if err := chCfg.Validate(); err != nil {
		t.Fatal(err)
	}
	if err := migrations.Up(ctx, migrations.Config{PostgresDSN: dsn, Publication: "outbox_publication", ClickHouse: chCfg}); err != nil {
		t.Fatal(err)
	}
	return dsn, replicationConn(ctx, t, dsn, extra)
}

// TestCaptureGolden streams one known insert from a real server and writes each
// pgoutput message to testdata/pgoutput/pg<major>. It runs only with
// -update-golden.
func TestCaptureGolden(t *testing.T) {
	if !*updateGolden {
		t.Skip("run with -update-golden to capture messages from a real server")
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	dsn, conn := goldenSession(ctx, t, nil)
	if _, err := pglogrepl.CreateReplicationSlot(ctx, conn, "golden", "pgoutput", pglogrepl.CreateReplicationSlotOptions{Temporary: true}); err != nil {
		t.Fatal(err)
	}
	plain, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close(context.Background())
	if _, err := plain.Exec(ctx, `INSERT INTO event_outbox (event_type, event_date_time, environment, event_context, metadata_version)
		VALUES ('golden.event', '2026-11-23 18:49:29.123456', 'prod', '{"n": 1, "k": "v"}', 7)`); err != nil {
		t.Fatal(err)
	}
	if err := pglogrepl.StartReplication(ctx, conn, "golden", 0, pglogrepl.StartReplicationOptions{
		PluginArgs: []string{"proto_version '1'", "publication_names 'outbox_publication'"}}); err != nil {
		t.Fatal(err)
	}
	dir := goldenMajorDir(serverMajor(conn.ParameterStatus("server_version")))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	names := map[byte]string{'B': "begin", 'R': "relation", 'I': "insert", 'C': "commit"}
	for n := 0; n < 4; {
		raw, err := conn.ReceiveMessage(ctx)
		if err != nil {
			t.Fatal(err)
		}
		cd, ok := raw.(*pgproto3.CopyData)
		if !ok || len(cd.Data) == 0 || cd.Data[0] != pglogrepl.XLogDataByteID {
			continue
		}
		xld, err := pglogrepl.ParseXLogData(cd.Data[1:])
		if err != nil {
			t.Fatal(err)
		}
		name := names[xld.WALData[0]]
		if name == "" {
			continue
		}
		path := filepath.Join(dir, fmt.Sprintf("%02d_%s.bin", n, name))
		if err := os.WriteFile(path, xld.WALData, 0o644); err != nil {
			t.Fatal(err)
		}
		n++
	}
}
