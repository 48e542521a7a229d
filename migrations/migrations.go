// Package migrations holds the schema of both databases — the PostgreSQL outbox and
// the ClickHouse event table — and applies it with golang-migrate. The SQL is embedded
// in the binary and rendered with the configured (quoted) names before it runs; the
// ClickHouse flavour is chosen from the server's version.
package migrations

import (
	"bytes"
	"context"
	"database/sql"
	"embed"
	"errors"
	"fmt"
	"hash/fnv"
	"io/fs"
	"strings"
	"testing/fstest"
	"text/template"
	"time"

	"github.com/golang-migrate/migrate/v4"
	"github.com/golang-migrate/migrate/v4/database"
	pgxmigrate "github.com/golang-migrate/migrate/v4/database/pgx/v5"
	"github.com/golang-migrate/migrate/v4/source"
	"github.com/golang-migrate/migrate/v4/source/iofs"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"

	"go.uber.org/zap"

	"github.com/outbox-streamer/outbox-streamer/internal/fault"
	"github.com/outbox-streamer/outbox-streamer/internal/outboxstore"
	"github.com/outbox-streamer/outbox-streamer/internal/pgsql"
	"github.com/outbox-streamer/outbox-streamer/internal/retry"
	"github.com/outbox-streamer/outbox-streamer/sink"
)

//go:embed postgres/*.sql clickhouse/modern/*.sql clickhouse/legacy/*.sql clickhouse/modern-cluster/*.sql clickhouse/legacy-cluster/*.sql
var files embed.FS

// MigrationsTable is the version table in both databases for the default outbox
// and event table. It is not golang-migrate's default name, so it cannot collide
// with an application's own migrations. Every other outbox table and every other
// ClickHouse table has a version table of its own (PostgresMigrationsTable,
// ClickHouseMigrationsTable): with one shared table, the second outbox's
// `migrate up` would find version 1 applied and create nothing.
const MigrationsTable = "outbox_streamer_migrations"

// PostgresMigrationsTable is the version table of the outbox's migrations, in
// the outbox's schema (the search_path's first without one):
// outbox_streamer_migrations for event_outbox, outbox_streamer_migrations_TABLE
// for another table.
func PostgresMigrationsTable(outbox outboxstore.Name) string { return outbox.MigrationsTable() }

// ClickHouseMigrationsTable is the version table of the event table's
// migrations, in its ClickHouse database: outbox_streamer_migrations for
// event_log, outbox_streamer_migrations_TABLE for another table. (A database
// whose event table was not named event_log recorded its version in
// outbox_streamer_migrations before; its next `migrate up` records it in the
// new table: migration 1 only creates what does not exist.)
func ClickHouseMigrationsTable(table string) string {
	if table == "" || table == "event_log" {
		return MigrationsTable
	}
	return MigrationsTable + "_" + table
}

// Config names the databases and objects the migrations create.
type Config struct {
	// PostgresDSN is the PostgreSQL connection string (DATABASE_URL).
	PostgresDSN string
	// Publication is the PostgreSQL publication created for the outbox.
	Publication string
	// Outbox is the outbox table (OUTBOX_TABLE; zero: event_outbox). Its
	// schema, when given, is created when missing.
	Outbox outboxstore.Name
	// ClickHouse is the ClickHouse connection and table.
	ClickHouse sink.Config
	// PartitionInterval, when set, creates event_outbox range-partitioned by
	// created_at with partitions of this width (OUTBOX_PARTITION_INTERVAL).
	// It applies when the table is created; an existing table stays as it is.
	PartitionInterval time.Duration
	// TimeZone is the zone of created_at's wall clock (EVENT_TIME_ZONE,
	// default UTC), which partition bounds follow.
	TimeZone *time.Location
	// ContextType is the type of event_context when the event table is
	// created: "String" (the default; every version) or "JSON" (ClickHouse
	// 25.3 and newer). A table that exists keeps its type.
	ContextType string
	// ConnectWait is how long a database that refuses connections is retried
	// before the migration gives up (a compose or Kubernetes migrate job can
	// start before PostgreSQL accepts connections); 0 tries once.
	ConnectWait time.Duration
	// Notify, when set, is told what the migration waits for (a database that
	// is not up yet, another migration holding the lock).
	Notify func(msg string)
}

func (c Config) notify(format string, args ...any) {
	if c.Notify != nil {
		c.Notify(fmt.Sprintf(format, args...))
	}
}

// The databases a migration command can be limited to.
const (
	Postgres   = "postgres"
	ClickHouse = "clickhouse"
)

// Status is one database's migration state.
type Status struct {
	Database string `json:"database"`          // "postgres" or "clickhouse"
	Flavour  string `json:"flavour,omitempty"` // "", "modern" or "legacy"
	Version  uint   `json:"version"`           // 0 when nothing is applied
	Dirty    bool   `json:"dirty"`
	Latest   uint   `json:"latest"`
	// State is "up to date", "pending" or "dirty".
	State string `json:"state"`
	// Adopt is true when PostgreSQL's outbox table exists but no migration
	// completed: migrate up adopts it (see adopt.go).
	Adopt bool `json:"adopt,omitempty"`
}

func (s Status) String() string {
	name := s.Database
	if s.Flavour != "" {
		name += " (" + s.Flavour + ")"
	}
	state := fmt.Sprintf("version %d of %d", s.Version, s.Latest)
	switch {
	case s.State == "dirty":
		if s.Database == Postgres {
			// recoverDirty: a PostgreSQL migration is one transaction.
			state += ", DIRTY: a migration did not complete and was rolled back; run: outbox-streamer migrate up (it runs it again)"
			break
		}
		state += fmt.Sprintf(", DIRTY: a migration failed half-way; repair the schema by hand, then run: outbox-streamer migrate force VERSION --database %s (the version whose changes are now complete)", s.Database)
	case s.State == "up to date":
		state += ", up to date"
	case s.Adopt:
		state += ", pending: the outbox table exists without the streamer's migrations; outbox-streamer migrate up adopts it (see migrate up --dry-run)"
	default:
		state += ", pending migrations (run: outbox-streamer migrate up)"
	}
	return name + ": " + state
}

func (s *Status) setState() {
	switch {
	case s.Dirty:
		s.State = "dirty"
	case s.Version == s.Latest:
		s.State = "up to date"
	default:
		s.State = "pending"
	}
}

// Up applies every pending migration to both databases.
func Up(ctx context.Context, cfg Config) error {
	_, err := UpReport(ctx, cfg)
	return err
}

// UpReport is Up, returning what it did to PostgreSQL when it adopted an
// existing outbox table (see adopt.go). Before anything changes it checks
// an existing ClickHouse event table's columns (CheckEventTable) and an
// existing outbox's shape, and refuses with what to do.
func UpReport(ctx context.Context, cfg Config) (PostgresPlan, error) {
	var plan PostgresPlan
	err := withLock(ctx, cfg, func() error {
		if err := CheckEventTable(ctx, cfg); err != nil {
			return err
		}
		var err error
		if plan, err = adopt(ctx, cfg); err != nil {
			return err
		}
		return eachLocked(ctx, cfg, "", func(m *migrate.Migrate, db string) error {
			if db == Postgres {
				if err := recoverDirty(m, cfg); err != nil {
					return err
				}
			}
			err := m.Up()
			if err == nil || errors.Is(err, migrate.ErrNoChange) {
				return nil
			}
			err = shortError(err)
			if db == Postgres {
				if rerr := recoverDirty(m, cfg); rerr != nil {
					return fmt.Errorf("%w; and then: %v", err, rerr)
				}
				return fmt.Errorf("%w (rolled back: the migration runs in one transaction; fix the cause and run outbox-streamer migrate up again)", err)
			}
			return err
		})
	})
	return plan, err
}

// shortError drops the migration's whole SQL text that golang-migrate puts
// in its error, keeping the server's error and the failing migration's name.
func shortError(err error) error {
	var dbErr database.Error
	if errors.As(err, &dbErr) && dbErr.OrigErr != nil {
		return fmt.Errorf("%s: %w", dbErr.Err, dbErr.OrigErr)
	}
	var dbErrPtr *database.Error
	if errors.As(err, &dbErrPtr) && dbErrPtr.OrigErr != nil {
		return fmt.Errorf("%s: %w", dbErrPtr.Err, dbErrPtr.OrigErr)
	}
	return err
}

// recoverDirty clears a dirty PostgreSQL version: golang-migrate marks a
// migration dirty before running it and clean after, so a migration that
// failed or whose process was killed leaves the flag set. Every PostgreSQL
// migration is one statement string run as one implicit transaction (the
// pgx driver without MultiStatementEnabled), and each is idempotent: a
// dirty version N means N's changes were rolled back, or committed by a
// process killed before it cleared the flag, and running N again is right
// either way. So the version goes back to N-1 and N runs again.
func recoverDirty(m *migrate.Migrate, cfg Config) error {
	v, dirty, err := m.Version()
	if err != nil || !dirty {
		if errors.Is(err, migrate.ErrNilVersion) {
			return nil
		}
		return err
	}
	prev := int(v) - 1
	if prev == 0 {
		prev = database.NilVersion
	}
	cfg.notify("postgres migration %d did not complete (dirty); it runs in one transaction, so it is run again", v)
	if err := m.Force(prev); err != nil {
		return fmt.Errorf("clear the dirty flag of migration %d: %w", v, err)
	}
	return nil
}

// Down rolls back the last steps migrations of both databases.
func Down(ctx context.Context, cfg Config, steps int) error {
	return each(ctx, cfg, "", func(m *migrate.Migrate, _ string) error {
		if err := m.Steps(-steps); err != nil && !errors.Is(err, migrate.ErrNoChange) && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
		return nil
	})
}

// Force records version as database's (Postgres or ClickHouse) migration
// state and clears its dirty flag, without running any migration: the way out
// after a migration failed half-way and the schema was repaired by hand.
// Version 0 records that nothing is applied.
func Force(ctx context.Context, cfg Config, db string, version int) error {
	if db != Postgres && db != ClickHouse {
		return fmt.Errorf("force: unknown database %q (want %s or %s)", db, Postgres, ClickHouse)
	}
	return each(ctx, cfg, db, func(m *migrate.Migrate, name string) error {
		flavour := ""
		if i := strings.IndexByte(name, '/'); i > 0 {
			flavour = name[i+1:]
		}
		if max := latest(flavour); version < 0 || uint(version) > max {
			return fmt.Errorf("force: version %d does not exist (the migrations go from 1 to %d; 0 means none applied)", version, max)
		}
		if version == 0 {
			version = database.NilVersion
		}
		return m.Force(version)
	})
}

// LatestPostgres is the newest PostgreSQL migration's version.
func LatestPostgres() uint { return latest("") }

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

// each runs fn against the PostgreSQL migrator, then the ClickHouse one (only
// the one named by only, when set), holding the migration lock throughout.
func each(ctx context.Context, cfg Config, only string, fn func(*migrate.Migrate, string) error) error {
	return withLock(ctx, cfg, func() error { return eachLocked(ctx, cfg, only, fn) })
}

// withLock validates cfg and runs fn holding the migration lock.
func withLock(ctx context.Context, cfg Config, fn func() error) error {
	if err := cfg.ClickHouse.Validate(); err != nil {
		return err
	}
	if cfg.Publication == "" {
		return errors.New("publication name is empty")
	}
	unlock, err := lock(ctx, cfg)
	if err != nil {
		return err
	}
	defer unlock()
	return fn()
}

// eachLocked is each under a lock its caller holds.
func eachLocked(ctx context.Context, cfg Config, only string, fn func(*migrate.Migrate, string) error) error {
	if only == "" || only == Postgres {
		pg, err := postgresMigrator(ctx, cfg)
		if err != nil {
			return err
		}
		err = fn(pg, Postgres)
		closeMigrator(pg)
		if err != nil {
			return fmt.Errorf("postgres migrations: %w", err)
		}
	}
	if only == "" || only == ClickHouse {
		ch, flavour, err := clickhouseMigrator(ctx, cfg)
		if err != nil {
			return err
		}
		err = fn(ch, ClickHouse+"/"+flavour)
		closeMigrator(ch)
		if err != nil {
			return fmt.Errorf("clickhouse migrations (%s schema): %w", flavour, err)
		}
	}
	return nil
}

// LockKey is the PostgreSQL advisory lock a migration holds for its whole
// run, over both databases. ClickHouse has no lock to take, so two migrate
// jobs (two replicas of a Kubernetes Job, a compose job and an operator) would
// run its migrations at once; every migrate talks to PostgreSQL first, so the
// lock lives there. It is per ClickHouse table: migrations of other tables
// through the same PostgreSQL do not wait for each other.
func LockKey(cfg Config) int64 {
	h := fnv.New64a()
	fmt.Fprintf(h, "outbox-streamer migrate\x00%s\x00%s", cfg.ClickHouse.Database, cfg.ClickHouse.Table)
	return int64(h.Sum64())
}

// lock takes LockKey on a connection of its own, waiting while another
// migration holds it, and returns its release.
func lock(ctx context.Context, cfg Config) (func(), error) {
	var conn *pgx.Conn
	err := connectRetrying(ctx, cfg, Postgres, func(ctx context.Context) error {
		var err error
		conn, err = pgx.Connect(ctx, cfg.PostgresDSN)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("connect to postgres: %w", err)
	}
	release := func() { conn.Close(context.Background()) }
	key := LockKey(cfg)
	for waited := false; ; waited = true {
		var held bool
		if err := conn.QueryRow(ctx, "SELECT pg_try_advisory_lock($1)", key).Scan(&held); err != nil {
			release()
			return nil, fmt.Errorf("take the migration lock: %w", err)
		}
		if held {
			return release, nil
		}
		if !waited {
			cfg.notify("waiting for another migration of this event table to finish (PostgreSQL advisory lock %d)", key)
		}
		select {
		case <-ctx.Done():
			release()
			return nil, fmt.Errorf("another migration holds the migration lock (PostgreSQL advisory lock %d; see pg_locks): %w", key, ctx.Err())
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// connectRetrying runs connect until it succeeds, fails for a reason other
// than an unreachable server, or cfg.ConnectWait has passed.
func connectRetrying(ctx context.Context, cfg Config, database string, connect func(context.Context) error) error {
	if cfg.ConnectWait <= 0 {
		return connect(ctx)
	}
	deadline := time.Now().Add(cfg.ConnectWait)
	return retry.Do(ctx, retry.Policy{Initial: 250 * time.Millisecond, Max: 5 * time.Second},
		func(err error) bool { return fault.Of(err) == fault.Transient && time.Now().Before(deadline) },
		func(attempt int, wait time.Duration, err error) {
			cfg.notify("%s is not reachable yet (attempt %d, next in %s): %v", database, attempt, wait.Round(10*time.Millisecond), err)
		},
		func(ctx context.Context) error {
			actx, cancel := context.WithDeadline(ctx, deadline.Add(time.Second))
			defer cancel()
			return connect(actx)
		})
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
	if err := connectRetrying(ctx, cfg, Postgres, db.PingContext); err != nil {
		db.Close()
		return nil, fmt.Errorf("connect to postgres %s: %w", pcfg.Host, err)
	}
	mcfg := &pgxmigrate.Config{MigrationsTable: PostgresMigrationsTable(cfg.Outbox)}
	if schema := cfg.Outbox.Schema; schema != "" {
		// The version table lives in the outbox's schema, and golang-migrate
		// creates it before the first migration runs: the schema comes first.
		if err := ensureSchema(ctx, db, schema); err != nil {
			db.Close()
			return nil, err
		}
		mcfg.SchemaName = schema
	}
	drv, err := pgxmigrate.WithInstance(db, mcfg)
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("prepare postgres migrations: %w", err)
	}
	data := PostgresDataFor(cfg.Publication, cfg.Outbox)
	if cfg.PartitionInterval > 0 {
		data["Partitioned"] = "true"
	}
	src, err := render("postgres", data)
	if err != nil {
		return nil, err
	}
	return migrate.NewWithInstance("iofs", src, "pgx5", drv)
}

func clickhouseMigrator(ctx context.Context, mcfg Config) (*migrate.Migrate, string, error) {
	cfg := mcfg.ClickHouse
	// The database must exist before a connection can use it, so it is created
	// outside the versioned migrations.
	bootstrap := cfg
	bootstrap.Database = "system"
	var legacy bool
	var version string
	err := connectRetrying(ctx, mcfg, ClickHouse, func(ctx context.Context) error {
		conn, err := sink.Connect(bootstrap)
		if err != nil {
			return err
		}
		defer conn.Close()
		if legacy, version, err = sink.DetectVersion(ctx, conn); err != nil {
			return err
		}
		return conn.Exec(ctx, "CREATE DATABASE IF NOT EXISTS "+sink.QuoteIdent(cfg.Database)+onCluster(cfg))
	})
	if err != nil {
		return nil, "", fmt.Errorf("prepare clickhouse database %q at %s: %w", cfg.Database, cfg.Addr, err)
	}
	flavour := "modern"
	if legacy {
		flavour = "legacy"
	}
	if cfg.Cluster != "" {
		flavour += "-cluster"
	}
	chConn, err := sink.Connect(cfg)
	if err != nil {
		return nil, "", err
	}
	// On a cluster the version table stays a TinyLog on the node migrate
	// talks to: the migrations themselves run ON CLUSTER, the lock that
	// keeps two of them apart is PostgreSQL's, and a migrate pointed at
	// another node (finding no version) re-runs migrations that create only
	// what does not exist. Point migrate at one node (CLICKHOUSE_HOST).
	drv, err := newCHDriver(ctx, chConn, cfg.Database, ClickHouseMigrationsTable(cfg.Table), cfg.ReadTimeout+time.Minute)
	if err != nil {
		chConn.Close()
		return nil, "", err
	}
	contextType, err := contextColumnType(mcfg.ContextType, legacy, version)
	if err != nil {
		chConn.Close()
		return nil, "", err
	}
	src, err := render("clickhouse/"+flavour, ClickHouseData(cfg, contextType))
	if err != nil {
		return nil, "", err
	}
	m, err := migrate.NewWithInstance("iofs", src, "clickhouse", drv)
	return m, flavour, err
}

// ClickHouseData is the template data of the ClickHouse migrations of
// cfg's event table with event_context of type contextType, every name
// quoted for where it goes; Staging is the staging table of streamed
// transactions (sink.StagingTable). The cluster flavours (cfg.Cluster set) also use
// Local (the local table, sink.LocalTable), Cluster (for ON CLUSTER),
// ClusterLiteral, DatabaseLiteral and LocalLiteral (the arguments of
// Distributed) and ReplicaPath (the local table's ZooKeeper path, one per
// shard: /clickhouse/tables/{shard}/DATABASE/TABLE_local).
func ClickHouseData(cfg sink.Config, contextType string) map[string]string {
	data := map[string]string{
		"Table":       sink.QuoteIdent(cfg.Database) + "." + sink.QuoteIdent(cfg.Table),
		"Staging":     sink.QuoteIdent(cfg.Database) + "." + sink.QuoteIdent(sink.StagingTable(cfg.Table)),
		"ContextType": contextType,
	}
	if cfg.Cluster != "" {
		local := sink.LocalTable(cfg.Table)
		data["Local"] = sink.QuoteIdent(cfg.Database) + "." + sink.QuoteIdent(local)
		data["Cluster"] = sink.QuoteIdent(cfg.Cluster)
		data["ClusterLiteral"] = sink.QuoteString(cfg.Cluster)
		data["DatabaseLiteral"] = sink.QuoteString(cfg.Database)
		data["LocalLiteral"] = sink.QuoteString(local)
		data["ReplicaPath"] = sink.QuoteString("/clickhouse/tables/{shard}/" + cfg.Database + "/" + local)
	}
	return data
}

// onCluster is the ON CLUSTER clause of cfg's DDL, or "" on a single server.
func onCluster(cfg sink.Config) string {
	if cfg.Cluster == "" {
		return ""
	}
	return " ON CLUSTER " + sink.QuoteIdent(cfg.Cluster)
}

// contextColumnType is the event_context column type for CLICKHOUSE_CONTEXT_TYPE
// on a server of this version. JSON is production-ready from 25.3 (earlier
// servers have an experimental one with another storage format).
func contextColumnType(want string, legacy bool, version string) (string, error) {
	switch want {
	case "", "String":
		return "String", nil
	case "JSON":
		var major, minor int
		fmt.Sscanf(version, "%d.%d", &major, &minor)
		if legacy || major < 25 || (major == 25 && minor < 3) {
			return "", fmt.Errorf("CLICKHOUSE_CONTEXT_TYPE=JSON needs ClickHouse 25.3 or newer; this server is %s: use String (the default), and JSONExtract* functions in queries", version)
		}
		return "JSON", nil
	}
	return "", fmt.Errorf("CLICKHOUSE_CONTEXT_TYPE %q: want String or JSON", want)
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

// PostgresData is the template data of the PostgreSQL migrations of
// event_outbox for the publication name (from PUBLICATION_NAME), quoted for
// every place it goes.
func PostgresData(publication string) map[string]string {
	return PostgresDataFor(publication, outboxstore.DefaultName)
}

// PostgresDataFor is PostgresData for the outbox table outbox (OUTBOX_TABLE).
// The names of the objects made beside the table (its index, constraint and
// default partition) start with the table's name, so they are the same as
// ever for event_outbox and differ for every other outbox in the schema.
func PostgresDataFor(publication string, outbox outboxstore.Name) map[string]string {
	if outbox.Table == "" {
		outbox = outboxstore.DefaultName
	}
	drop := ""
	if outbox.IsDefault() {
		// outbox_checkpoint is shared by the outboxes of the database (keyed by
		// slot): only rolling back the default outbox drops it, as it always
		// did; rolling back another leaves it to the others.
		drop = "true"
	}
	return map[string]string{
		"Publication":        pgx.Identifier{publication}.Sanitize(),
		"PublicationLiteral": pgsql.Literal(publication),
		"DollarTag":          dollarTag(publication + outbox.Ident()),
		"Partitioned":        "",
		"Outbox":             outbox.Ident(),
		"StatusCheck":        pgx.Identifier{outbox.Table + "_status_check"}.Sanitize(),
		"UndeliveredIndex":   pgx.Identifier{outbox.Table + "_undelivered_idx"}.Sanitize(),
		"DefaultPartition":   outbox.Related("_default"),
		"DropCheckpoint":     drop,
	}
}

// ensureSchema creates schema when it does not exist (looking first, so a
// role without CREATE on the database migrates an outbox whose schema exists).
func ensureSchema(ctx context.Context, db interface {
	QueryRowContext(context.Context, string, ...any) *sql.Row
	ExecContext(context.Context, string, ...any) (sql.Result, error)
}, schema string) error {
	var exists bool
	if err := db.QueryRowContext(ctx, "SELECT to_regnamespace($1) IS NOT NULL", pgx.Identifier{schema}.Sanitize()).Scan(&exists); err != nil {
		return fmt.Errorf("look up schema %q: %w", schema, err)
	}
	if exists {
		return nil
	}
	if _, err := db.ExecContext(ctx, "CREATE SCHEMA IF NOT EXISTS "+pgx.Identifier{schema}.Sanitize()); err != nil {
		return fmt.Errorf("create schema %q of the outbox table: %w", schema, err)
	}
	return nil
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
// returns one line saying how the outbox table is laid out.
func DescribeLayout(ctx context.Context, cfg Config) (string, error) {
	pool, err := pgxpool.New(ctx, cfg.PostgresDSN)
	if err != nil {
		return "", fmt.Errorf("DATABASE_URL: %w", err)
	}
	defer pool.Close()
	partitioned, err := outboxstore.Partitioned(ctx, pool, cfg.Outbox)
	if err != nil {
		return "", err
	}
	if !partitioned {
		if cfg.PartitionInterval > 0 {
			return cfg.Outbox.String() + ": not partitioned — OUTBOX_PARTITION_INTERVAL applies when the table is created; docs/partitioned-outbox.md shows how to convert an existing one", nil
		}
		return cfg.Outbox.String() + ": not partitioned", nil
	}
	if cfg.PartitionInterval > 0 {
		if _, err := outboxstore.EnsurePartitions(ctx, pool, cfg.Outbox, cfg.PartitionInterval, time.Now(), cfg.TimeZone, 1, 3, zap.NewNop()); err != nil {
			return "", err
		}
	}
	parts, err := outboxstore.Partitions(ctx, pool, cfg.Outbox)
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("%s: range-partitioned by created_at, %d partitions (the default one included)", cfg.Outbox, len(parts)), nil
}
