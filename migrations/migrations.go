// Package migrations holds the schema of both databases — the PostgreSQL outbox and
// the ClickHouse event table — and applies it with golang-migrate. The SQL is embedded
// in the binary and rendered with the configured (quoted) names before it runs; the
// ClickHouse flavour is chosen from the server's version.
package migrations

import (
	"bytes"
	"context"
	"embed"
	"errors"
	"fmt"
	"io/fs"
	"strings"
	"testing/fstest"
	"text/template"
	"time"

	"github.com/golang-migrate/migrate/v4"
	pgxmigrate "github.com/golang-migrate/migrate/v4/database/pgx/v5"
	"github.com/golang-migrate/migrate/v4/source"
	"github.com/golang-migrate/migrate/v4/source/iofs"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"

	"go.uber.org/zap"

	"github.com/outbox-streamer/outbox-streamer/internal/outboxstore"
	"github.com/outbox-streamer/outbox-streamer/internal/pgsql"
	"github.com/outbox-streamer/outbox-streamer/sink"
)

//go:embed postgres/*.sql clickhouse/modern/*.sql clickhouse/legacy/*.sql
var files embed.FS

// MigrationsTable is the version table in both databases. It is not golang-migrate's
// default name, so it cannot collide with an application's own migrations.
const MigrationsTable = "outbox_streamer_migrations"

// Config names the databases and objects the migrations create.
type Config struct {
	// PostgresDSN is the PostgreSQL connection string (DATABASE_URL).
	PostgresDSN string
	// Publication is the PostgreSQL publication created for the outbox.
	Publication string
	// ClickHouse is the ClickHouse connection and table.
	ClickHouse sink.Config
	// PartitionInterval, when set, creates event_outbox range-partitioned by
	// created_at with partitions of this width (OUTBOX_PARTITION_INTERVAL).
	// It applies when the table is created; an existing table stays as it is.
	PartitionInterval time.Duration
	// TimeZone is the zone of created_at's wall clock (EVENT_TIME_ZONE,
	// default UTC), which partition bounds follow.
	TimeZone *time.Location
}

// Status is one database's migration state.
type Status struct {
	Database string // "postgres" or "clickhouse"
	Flavour  string // "", "modern" or "legacy"
	Version  uint   // 0 when nothing is applied
	Dirty    bool
	Latest   uint
}

func (s Status) String() string {
	name := s.Database
	if s.Flavour != "" {
		name += " (" + s.Flavour + ")"
	}
	state := fmt.Sprintf("version %d of %d", s.Version, s.Latest)
	switch {
	case s.Dirty:
		state += ", DIRTY: a migration failed half-way; fix the schema by hand, then force the version"
	case s.Version == s.Latest:
		state += ", up to date"
	default:
		state += ", pending migrations (run: outbox-streamer migrate up)"
	}
	return name + ": " + state
}

// Up applies every pending migration to both databases.
func Up(ctx context.Context, cfg Config) error {
	return each(ctx, cfg, func(m *migrate.Migrate, _ string) error {
		if err := m.Up(); err != nil && !errors.Is(err, migrate.ErrNoChange) {
			return err
		}
		return nil
	})
}

// Down rolls back the last steps migrations of both databases.
func Down(ctx context.Context, cfg Config, steps int) error {
	return each(ctx, cfg, func(m *migrate.Migrate, _ string) error {
		if err := m.Steps(-steps); err != nil && !errors.Is(err, migrate.ErrNoChange) && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
		return nil
	})
}

// Statuses reports both databases' migration state.
func Statuses(ctx context.Context, cfg Config) ([]Status, error) {
	var out []Status
	err := each(ctx, cfg, func(m *migrate.Migrate, db string) error {
		v, dirty, err := m.Version()
		if err != nil && !errors.Is(err, migrate.ErrNilVersion) {
			return err
		}
		s := Status{Database: db, Version: v, Dirty: dirty}
		if i := strings.IndexByte(db, '/'); i > 0 {
			s.Database, s.Flavour = db[:i], db[i+1:]
		}
		s.Latest = latest(s.Flavour)
		out = append(out, s)
		return nil
	})
	return out, err
}

func latest(flavour string) uint {
	dir := "postgres"
	if flavour != "" {
		dir = "clickhouse/" + flavour
	}
	entries, _ := fs.ReadDir(files, dir)
	var max uint
	for _, e := range entries {
		var v uint
		if _, err := fmt.Sscanf(e.Name(), "%d_", &v); err == nil && v > max {
			max = v
		}
	}
	return max
}

// each runs fn against the PostgreSQL migrator, then the ClickHouse one.
func each(ctx context.Context, cfg Config, fn func(*migrate.Migrate, string) error) error {
	if err := cfg.ClickHouse.Validate(); err != nil {
		return err
	}
	if cfg.Publication == "" {
		return errors.New("publication name is empty")
	}
	pg, err := postgresMigrator(ctx, cfg)
	if err != nil {
		return err
	}
	err = fn(pg, "postgres")
	closeMigrator(pg)
	if err != nil {
		return fmt.Errorf("postgres migrations: %w", err)
	}
	ch, flavour, err := clickhouseMigrator(ctx, cfg.ClickHouse)
	if err != nil {
		return err
	}
	err = fn(ch, "clickhouse/"+flavour)
	closeMigrator(ch)
	if err != nil {
		return fmt.Errorf("clickhouse migrations (%s schema): %w", flavour, err)
	}
	return nil
}

func closeMigrator(m *migrate.Migrate) {
	_, _ = m.Close()
}

func postgresMigrator(ctx context.Context, cfg Config) (*migrate.Migrate, error) {
	pcfg, err := pgx.ParseConfig(cfg.PostgresDSN)
	if err != nil {
		return nil, fmt.Errorf("DATABASE_URL is not a valid PostgreSQL connection string: %w", err)
	}
	db := stdlib.OpenDB(*pcfg)
	if err := db.PingContext(ctx); err != nil {
		db.Close()
		return nil, fmt.Errorf("connect to postgres %s: %w", pcfg.Host, err)
	}
	drv, err := pgxmigrate.WithInstance(db, &pgxmigrate.Config{MigrationsTable: MigrationsTable})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("prepare postgres migrations: %w", err)
	}
	data := PostgresData(cfg.Publication)
	if cfg.PartitionInterval > 0 {
		data["Partitioned"] = "true"
	}
	src, err := render("postgres", data)
	if err != nil {
		return nil, err
	}
	return migrate.NewWithInstance("iofs", src, "pgx5", drv)
}

func clickhouseMigrator(ctx context.Context, cfg sink.Config) (*migrate.Migrate, string, error) {
	// The database must exist before a connection can use it, so it is created
	// outside the versioned migrations.
	bootstrap := cfg
	bootstrap.Database = "system"
	conn, err := sink.Connect(bootstrap)
	if err != nil {
		return nil, "", err
	}
	legacy, _, err := sink.DetectVersion(ctx, conn)
	if err == nil {
		err = conn.Exec(ctx, "CREATE DATABASE IF NOT EXISTS "+sink.QuoteIdent(cfg.Database))
	}
	conn.Close()
	if err != nil {
		return nil, "", fmt.Errorf("prepare clickhouse database %q at %s: %w", cfg.Database, cfg.Addr, err)
	}
	flavour := "modern"
	if legacy {
		flavour = "legacy"
	}
	chConn, err := sink.Connect(cfg)
	if err != nil {
		return nil, "", err
	}
	drv, err := newCHDriver(ctx, chConn, cfg.Database, cfg.ReadTimeout+time.Minute)
	if err != nil {
		chConn.Close()
		return nil, "", err
	}
	src, err := render("clickhouse/"+flavour, map[string]string{
		"Table": sink.QuoteIdent(cfg.Database) + "." + sink.QuoteIdent(cfg.Table),
	})
	if err != nil {
		return nil, "", err
	}
	m, err := migrate.NewWithInstance("iofs", src, "clickhouse", drv)
	return m, flavour, err
}

// Rendered returns the SQL of one migration file after templating, for tests and
// for operators who apply the schema by hand.
func Rendered(dir string, data map[string]string) (map[string]string, error) {
	entries, err := fs.ReadDir(files, dir)
	if err != nil {
		return nil, err
	}
	out := make(map[string]string, len(entries))
	for _, e := range entries {
		raw, err := fs.ReadFile(files, dir+"/"+e.Name())
		if err != nil {
			return nil, err
		}
		tmpl, err := template.New(e.Name()).Option("missingkey=error").Parse(string(raw))
		if err != nil {
			return nil, fmt.Errorf("parse migration %s: %w", e.Name(), err)
		}
		var buf bytes.Buffer
		if err := tmpl.Execute(&buf, data); err != nil {
			return nil, fmt.Errorf("render migration %s: %w", e.Name(), err)
		}
		out[e.Name()] = buf.String()
	}
	return out, nil
}

// render templates a migration directory into an in-memory golang-migrate source.
func render(dir string, data map[string]string) (source.Driver, error) {
	rendered, err := Rendered(dir, data)
	if err != nil {
		return nil, err
	}
	mfs := fstest.MapFS{}
	for name, body := range rendered {
		mfs[name] = &fstest.MapFile{Data: []byte(body)}
	}
	src, err := iofs.New(mfs, ".")
	if err != nil {
		return nil, fmt.Errorf("load %s migrations: %w", dir, err)
	}
	return src, nil
}

// PostgresData is the template data of the PostgreSQL migrations for the
// publication name (from PUBLICATION_NAME), quoted for every place it goes.
func PostgresData(publication string) map[string]string {
	return map[string]string{
		"Publication":        pgx.Identifier{publication}.Sanitize(),
		"PublicationLiteral": pgsql.Literal(publication),
		"DollarTag":          dollarTag(publication),
		"Partitioned":        "",
	}
}

// dollarTag returns a dollar-quote tag ($outbox$, $outbox_x$, ...) that does
// not occur in s, so that s, quoted inside a body delimited by it, cannot end
// the body early (a name holding "$$" would otherwise run as SQL).
func dollarTag(s string) string {
	tag := "outbox"
	for strings.Contains(s, "$"+tag+"$") {
		tag += "_x"
	}
	return "$" + tag + "$"
}

// DescribeLayout creates the partitions a partitioned outbox needs now (the
// current one and PartitionsAhead after it; the leader keeps creating them) and
// returns one line saying how event_outbox is laid out.
func DescribeLayout(ctx context.Context, cfg Config) (string, error) {
	pool, err := pgxpool.New(ctx, cfg.PostgresDSN)
	if err != nil {
		return "", fmt.Errorf("DATABASE_URL: %w", err)
	}
	defer pool.Close()
	partitioned, err := outboxstore.Partitioned(ctx, pool)
	if err != nil {
		return "", err
	}
	if !partitioned {
		if cfg.PartitionInterval > 0 {
			return "event_outbox: not partitioned — OUTBOX_PARTITION_INTERVAL applies when the table is created; docs/partitioned-outbox.md shows how to convert an existing one", nil
		}
		return "event_outbox: not partitioned", nil
	}
	if cfg.PartitionInterval > 0 {
		if _, err := outboxstore.EnsurePartitions(ctx, pool, cfg.PartitionInterval, time.Now(), cfg.TimeZone, 1, 3, zap.NewNop()); err != nil {
			return "", err
		}
	}
	parts, err := outboxstore.Partitions(ctx, pool)
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("event_outbox: range-partitioned by created_at, %d partitions (the default one included)", len(parts)), nil
}
