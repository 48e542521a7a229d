package migrations

// Adoption: an outbox table that exists before the first `migrate up` (the
// earlier Django + Celery service's event_outbox, or one applied by hand) is
// brought to the shape migration 1 creates, in one transaction that also
// records version 1 in golang-migrate's version table. Migration 1's
// CREATE TABLE IF NOT EXISTS would skip such a table and then fail on the
// first index over a column it lacks; adoption adds what is missing instead,
// or refuses — before changing anything — with one line saying what to do.

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/outbox-streamer/outbox-streamer/internal/outboxstore"
	"github.com/outbox-streamer/outbox-streamer/internal/pgsql"
)

// adoptedVersion is the PostgreSQL migration whose shape adoption produces.
// Later migrations (none yet) run through golang-migrate after it.
const adoptedVersion = 1

// AdoptLockTimeout bounds the wait for the outbox's lock: a long transaction
// holding the table would otherwise queue every producer behind adoption.
const AdoptLockTimeout = 10 * time.Second

// statuses are the values of status the streamer knows.
var statuses = []string{"pending", "processed", "failed", "dead"}

// PostgresPlan is what `migrate up` does to PostgreSQL.
type PostgresPlan struct {
	// Adopt is true when the outbox table exists but no migration is
	// recorded (or the only one recorded failed): Statements then run in one
	// transaction, instead of golang-migrate's migrations.
	Adopt bool
	// Statements are the SQL statements in order; empty when nothing is to do.
	Statements []string
	// TimeType is the type of created_at of an existing table
	// ("timestamp without time zone" or "timestamp with time zone").
	TimeType string
	// Rows is the row count of an adopted table.
	Rows int64
}

// AdoptionError is a table that adoption cannot take as it is; Fix says what
// to do. Nothing was changed.
type AdoptionError struct {
	Table, Problem, Fix string
}

func (e *AdoptionError) Error() string {
	return fmt.Sprintf("cannot adopt the existing outbox table %s: %s; %s, then run outbox-streamer migrate up again (nothing was changed)", e.Table, e.Problem, e.Fix)
}

// column is one column of an existing table as the catalog shows it.
type column struct {
	name, typ  string // typ: format_type, e.g. "character varying(20)"
	base       string // the type without modifiers: "character varying"
	hasDefault bool
}

// tableShape is what adoption reads of an existing outbox.
type tableShape struct {
	oid          uint32
	partitioned  bool
	columns      map[string]column
	idUnique     bool
	indexValid   *bool // the undelivered index; nil when missing
	hasCheck     bool
	checkpoint   bool
	publication  *publication
	versionTable string // quoted schema.table of golang-migrate's version table
}

type publication struct {
	allTables, hasTable bool
}

// readVersion reads golang-migrate's record in PostgreSQL without creating
// anything: exists is false when there is no version table or no row.
func readVersion(ctx context.Context, q querier, versionTable string) (version int64, dirty, exists bool, err error) {
	var found bool
	if err := q.QueryRow(ctx, "SELECT to_regclass($1) IS NOT NULL", versionTable).Scan(&found); err != nil {
		return 0, false, false, fmt.Errorf("look up the migrations table: %w", err)
	}
	if !found {
		return 0, false, false, nil
	}
	err = q.QueryRow(ctx, "SELECT version, dirty FROM "+versionTable+" LIMIT 1").Scan(&version, &dirty)
	if errors.Is(err, pgx.ErrNoRows) {
		return 0, false, false, nil
	}
	if err != nil {
		return 0, false, false, fmt.Errorf("read the migrations table: %w", err)
	}
	return version, dirty, true, nil
}

// querier is a connection or a transaction.
type querier interface {
	QueryRow(context.Context, string, ...any) pgx.Row
	Query(context.Context, string, ...any) (pgx.Rows, error)
}

// versionTableIdent is the quoted version table of cfg's outbox: in its schema,
// or in current_schema() as golang-migrate places it.
func versionTableIdent(ctx context.Context, q querier, cfg Config) (string, error) {
	schema := cfg.Outbox.Schema
	if schema == "" {
		if err := q.QueryRow(ctx, "SELECT current_schema()").Scan(&schema); err != nil {
			return "", fmt.Errorf("read current_schema(): %w", err)
		}
	}
	return pgsql.Ident(schema, PostgresMigrationsTable(cfg.Outbox)), nil
}

// PlanPostgres reads the database and returns what `migrate up` would run on
// it, changing nothing. A table that cannot be adopted is an *AdoptionError.
func PlanPostgres(ctx context.Context, cfg Config) (PostgresPlan, error) {
	conn, err := pgx.Connect(ctx, cfg.PostgresDSN)
	if err != nil {
		return PostgresPlan{}, fmt.Errorf("connect to postgres: %w", err)
	}
	defer conn.Close(context.Background())
	tx, err := conn.BeginTx(ctx, pgx.TxOptions{AccessMode: pgx.ReadOnly})
	if err != nil {
		return PostgresPlan{}, fmt.Errorf("begin: %w", err)
	}
	defer tx.Rollback(context.Background())
	plan, adopt, err := planAdoption(ctx, tx, cfg)
	if err != nil || adopt {
		return plan, err
	}
	return planMigrations(ctx, tx, cfg)
}

// planMigrations lists golang-migrate's pending migrations as rendered SQL.
func planMigrations(ctx context.Context, q querier, cfg Config) (PostgresPlan, error) {
	vt, err := versionTableIdent(ctx, q, cfg)
	if err != nil {
		return PostgresPlan{}, err
	}
	version, dirty, _, err := readVersion(ctx, q, vt)
	if err != nil {
		return PostgresPlan{}, err
	}
	if dirty {
		version-- // see recoverDirty: a failed migration left nothing behind
	}
	data := PostgresDataFor(cfg.Publication, cfg.Outbox)
	if cfg.PartitionInterval > 0 {
		data["Partitioned"] = "true"
	}
	rendered, err := Rendered("postgres", data)
	if err != nil {
		return PostgresPlan{}, err
	}
	var plan PostgresPlan
	for _, name := range sortedUp(rendered, uint(max(version, 0))) {
		plan.Statements = append(plan.Statements, name+" (one transaction)\n"+strings.TrimSpace(rendered[name]))
	}
	return plan, nil
}

// planAdoption reads the outbox and, when it exists without a completed
// migration, returns the adoption statements (adopt true). It reads the
// catalog and the table's statuses, and changes nothing; under adopt's lock
// what it read cannot go stale before the statements run.
func planAdoption(ctx context.Context, q querier, cfg Config) (PostgresPlan, bool, error) {
	var oid *uint32
	if err := q.QueryRow(ctx, "SELECT to_regclass($1)::oid", cfg.Outbox.Ident()).Scan(&oid); err != nil {
		return PostgresPlan{}, false, fmt.Errorf("look up %s: %w", cfg.Outbox, err)
	}
	if oid == nil {
		return PostgresPlan{}, false, nil
	}
	vt, err := versionTableIdent(ctx, q, cfg)
	if err != nil {
		return PostgresPlan{}, false, err
	}
	version, dirty, versioned, err := readVersion(ctx, q, vt)
	if err != nil {
		return PostgresPlan{}, false, err
	}
	if versioned && version >= adoptedVersion && !(dirty && version == adoptedVersion) {
		return PostgresPlan{}, false, nil
	}
	shape, err := readShape(ctx, q, cfg, *oid)
	if err != nil {
		return PostgresPlan{}, false, err
	}
	shape.versionTable = vt
	rows, err := refusal(ctx, q, cfg, shape)
	if err != nil {
		return PostgresPlan{}, false, err
	}
	plan := PostgresPlan{Adopt: true, Statements: adoptionStatements(cfg, shape), Rows: rows}
	plan.TimeType = shape.columns["created_at"].base
	if plan.TimeType == "" {
		plan.TimeType = shape.columns["event_date_time"].base
	}
	return plan, true, nil
}

func readShape(ctx context.Context, q querier, cfg Config, oid uint32) (tableShape, error) {
	s := tableShape{oid: oid, columns: map[string]column{}}
	var relkind string
	if err := q.QueryRow(ctx, "SELECT relkind::text FROM pg_class WHERE oid = $1", oid).Scan(&relkind); err != nil {
		return s, fmt.Errorf("read %s: %w", cfg.Outbox, err)
	}
	if relkind != "r" && relkind != "p" {
		return s, &AdoptionError{Table: cfg.Outbox.String(), Problem: fmt.Sprintf("it is not a table (pg_class.relkind %q)", relkind),
			Fix: "rename or drop it, or set OUTBOX_TABLE to another name"}
	}
	s.partitioned = relkind == "p"
	rows, err := q.Query(ctx, `SELECT a.attname, format_type(a.atttypid, a.atttypmod), format_type(a.atttypid, NULL), a.atthasdef
		FROM pg_attribute a WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped`, oid)
	if err != nil {
		return s, fmt.Errorf("read the columns of %s: %w", cfg.Outbox, err)
	}
	for rows.Next() {
		var c column
		if err := rows.Scan(&c.name, &c.typ, &c.base, &c.hasDefault); err != nil {
			rows.Close()
			return s, fmt.Errorf("read the columns of %s: %w", cfg.Outbox, err)
		}
		s.columns[c.name] = c
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return s, fmt.Errorf("read the columns of %s: %w", cfg.Outbox, err)
	}
	// id is unique when a valid, non-partial unique index has only id as its
	// key, or, on a partitioned table, id and created_at (PostgreSQL requires
	// the partition key in a partitioned table's unique indexes).
	err = q.QueryRow(ctx, `SELECT EXISTS (
		SELECT 1 FROM pg_index i
		WHERE i.indrelid = $1 AND i.indisunique AND i.indisvalid AND i.indpred IS NULL AND i.indexprs IS NULL
		  AND 'id' = ANY (SELECT attname FROM pg_attribute WHERE attrelid = $1 AND attnum = ANY (i.indkey))
		  AND (SELECT bool_and(attname IN ('id', 'created_at')) FROM pg_attribute WHERE attrelid = $1 AND attnum = ANY (i.indkey))
		  AND (i.indnatts = 1 OR $2))`, oid, s.partitioned).Scan(&s.idUnique)
	if err != nil {
		return s, fmt.Errorf("read the unique indexes of %s: %w", cfg.Outbox, err)
	}
	err = q.QueryRow(ctx, `SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass($1)`, cfg.Outbox.Related("_undelivered_idx")).Scan(&s.indexValid)
	if err != nil && !errors.Is(err, pgx.ErrNoRows) {
		return s, fmt.Errorf("look up the undelivered index: %w", err)
	}
	err = q.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = $1 AND conname = $2)`,
		oid, outboxTable(cfg)+"_status_check").Scan(&s.hasCheck)
	if err != nil {
		return s, fmt.Errorf("look up the status check of %s: %w", cfg.Outbox, err)
	}
	if err := q.QueryRow(ctx, "SELECT to_regclass('outbox_checkpoint') IS NOT NULL").Scan(&s.checkpoint); err != nil {
		return s, fmt.Errorf("look up outbox_checkpoint: %w", err)
	}
	var p publication
	err = q.QueryRow(ctx, `SELECT puballtables, EXISTS (SELECT 1 FROM pg_publication_rel r WHERE r.prpubid = p.oid AND r.prrelid = $2)
		FROM pg_publication p WHERE pubname = $1`, cfg.Publication, oid).Scan(&p.allTables, &p.hasTable)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
	case err != nil:
		return s, fmt.Errorf("read publication %q: %w", cfg.Publication, err)
	default:
		s.publication = &p
	}
	return s, nil
}

// The types the streamer reads, by column (format_type without modifiers).
var (
	integerTypes = []string{"smallint", "integer", "bigint"}
	textTypes    = []string{"text", "character varying", "character"}
	timeTypes    = []string{"timestamp without time zone", "timestamp with time zone"}
	contextTypes = []string{"jsonb", "json"}
)

// columnRule is what adoption requires of one column.
type columnRule struct {
	name     string
	types    []string
	required bool   // refuse when missing
	add      string // ADD COLUMN definition when missing ("" with required)
	// fix is the statement that makes an unreadable column readable.
	fix string
}

// columnRules follows migration 1. The columns a producer has always written
// (id, event_type, event_date_time, status) are required: adding them would
// invent events' data. The others are added with migration 1's definition
// (a constant default: metadata-only since PostgreSQL 11, no table rewrite).
func columnRules(ident, timeType string) []columnRule {
	return []columnRule{
		{name: "id", types: integerTypes, required: true},
		{name: "event_type", types: textTypes, required: true},
		{name: "event_date_time", types: timeTypes, required: true},
		{name: "environment", types: textTypes, add: "VARCHAR(50) NOT NULL DEFAULT ''"},
		{name: "event_context", types: contextTypes, add: "JSONB NOT NULL DEFAULT '{}'::jsonb",
			fix: "ALTER TABLE " + ident + " ALTER COLUMN event_context TYPE jsonb USING event_context::jsonb"},
		{name: "metadata_version", types: integerTypes, add: "BIGINT NOT NULL DEFAULT 1"},
		{name: "status", types: textTypes, required: true},
		{name: "created_at", types: timeTypes, add: timeType + " NOT NULL DEFAULT " + nowFor(timeType)},
		{name: "updated_at", types: timeTypes, add: timeType + " NOT NULL DEFAULT " + nowFor(timeType)},
		{name: "attempts", types: integerTypes, add: "INTEGER NOT NULL DEFAULT 0"},
		{name: "last_error", types: textTypes, add: "TEXT"},
		{name: "next_attempt_at", types: timeTypes, add: "TIMESTAMPTZ"},
	}
}

// nowFor is the current time as a default of a column of type typ: a
// TIMESTAMP without time zone holds UTC, converted explicitly so the session's
// TimeZone cannot shift it (as migration 1 does).
func nowFor(typ string) string {
	if typ == "timestamp with time zone" || strings.EqualFold(typ, "TIMESTAMPTZ") {
		return "now()"
	}
	return "(now() AT TIME ZONE 'UTC')"
}

// timeTypeOf is the type new time columns get: event_date_time's, so the
// table keeps one convention.
func timeTypeOf(s tableShape) string {
	if c, ok := s.columns["event_date_time"]; ok && c.base == "timestamp with time zone" {
		return "TIMESTAMPTZ"
	}
	return "TIMESTAMP"
}

// refusal returns the *AdoptionError of a table adoption cannot take, after
// reading only the catalog and, for status, the table; and the table's rows.
func refusal(ctx context.Context, q querier, cfg Config, s tableShape) (int64, error) {
	refuse := func(problem, fix string) error {
		return &AdoptionError{Table: cfg.Outbox.String(), Problem: problem, Fix: fix}
	}
	ident := cfg.Outbox.Ident()
	for _, r := range columnRules(ident, timeTypeOf(s)) {
		c, ok := s.columns[r.name]
		if !ok {
			if r.required {
				return 0, refuse("it has no column "+r.name, "add it (the outbox needs id, event_type, event_date_time and status; see docs/migrating-from-celery.md)")
			}
			continue
		}
		if !slices.Contains(r.types, c.base) {
			fix := r.fix
			if fix == "" {
				fix = fmt.Sprintf("ALTER TABLE %s ALTER COLUMN %s TYPE %s", ident, pgsql.Ident(r.name), r.types[len(r.types)-1])
			}
			return 0, refuse(fmt.Sprintf("column %s is %s, the streamer reads %s", r.name, c.typ, strings.Join(r.types, " or ")),
				"convert it (e.g. "+fix+")")
		}
	}
	if !s.idUnique {
		return 0, refuse("id is not its primary key (no unique index on id alone)",
			"make it one: ALTER TABLE "+ident+" ADD PRIMARY KEY (id)")
	}
	if s.indexValid != nil && !*s.indexValid {
		return 0, refuse("the index "+cfg.Outbox.Related("_undelivered_idx")+" is invalid (a CREATE INDEX CONCURRENTLY that failed)",
			"drop it: DROP INDEX "+cfg.Outbox.Related("_undelivered_idx"))
	}
	if s.publication != nil && s.publication.allTables {
		return 0, refuse(fmt.Sprintf("publication %q publishes all tables", cfg.Publication),
			"set PUBLICATION_NAME to a publication of the outbox alone")
	}
	// Rows the streamer would never deliver nor prune: say which, before
	// anything changes. One scan of the table (no index serves NOT IN).
	var rows, unknown int64
	var examples []string
	err := q.QueryRow(ctx, `SELECT count(*), count(*) FILTER (WHERE NOT known),
			(array_agg(DISTINCT coalesce(quote_literal(status), 'NULL')) FILTER (WHERE NOT known))[1:5]
		FROM (SELECT status, coalesce(status IN ('pending', 'processed', 'failed', 'dead'), false) AS known FROM `+ident+`) s`).Scan(&rows, &unknown, &examples)
	if err != nil {
		return 0, fmt.Errorf("count the statuses of %s: %w", cfg.Outbox, err)
	}
	if unknown > 0 {
		return 0, refuse(fmt.Sprintf("%d rows have a status other than %s (%s)", unknown, strings.Join(statuses, ", "), strings.Join(examples, ", ")),
			"set them to one of these, e.g. UPDATE "+ident+" SET status = 'pending' WHERE status IS NULL")
	}
	return rows, nil
}

// adoptionStatements are the statements that bring s to migration 1's shape,
// each only when needed, then record the version. NOT NULL is not added to
// the columns the table has: rows may hold NULLs (the streamer delivers them,
// see docs/migrating-from-celery.md), and checking would scan the table.
func adoptionStatements(cfg Config, s tableShape) []string {
	ident := cfg.Outbox.Ident()
	data := PostgresDataFor(cfg.Publication, cfg.Outbox)
	var out []string
	timeType := timeTypeOf(s)
	for _, r := range columnRules(ident, timeType) {
		if _, ok := s.columns[r.name]; !ok && r.add != "" {
			out = append(out, fmt.Sprintf("ALTER TABLE %s ADD COLUMN IF NOT EXISTS %s %s", ident, pgsql.Ident(r.name), r.add))
		}
	}
	// Defaults for the columns producers of the earlier service never wrote
	// (Django before 5.0 fills defaults in Python, not in the table).
	defaults := []struct{ col, expr string }{{"status", "'pending'"}}
	for _, col := range []string{"created_at", "updated_at"} {
		if c, ok := s.columns[col]; ok {
			defaults = append(defaults, struct{ col, expr string }{col, nowFor(c.base)})
		}
	}
	for _, d := range defaults {
		if c, ok := s.columns[d.col]; ok && !c.hasDefault {
			out = append(out, fmt.Sprintf("ALTER TABLE %s ALTER COLUMN %s SET DEFAULT %s", ident, pgsql.Ident(d.col), d.expr))
		}
	}
	if !s.hasCheck {
		// NOT VALID: existing rows were counted by refusal; validating would
		// scan the table again under the lock. New rows are checked.
		out = append(out, fmt.Sprintf("ALTER TABLE %s ADD CONSTRAINT %s CHECK (status IN ('pending', 'processed', 'failed', 'dead')) NOT VALID",
			ident, data["StatusCheck"]))
	}
	if s.indexValid == nil {
		out = append(out, fmt.Sprintf("CREATE INDEX IF NOT EXISTS %s ON %s (status, next_attempt_at, id) WHERE status <> 'processed'",
			data["UndeliveredIndex"], ident))
	}
	if !s.checkpoint {
		out = append(out, `CREATE TABLE IF NOT EXISTS outbox_checkpoint (
    slot_name    TEXT        PRIMARY KEY,
    inflight_lsn PG_LSN      NOT NULL DEFAULT '0/0',
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now()
)`)
	}
	switch {
	case s.publication == nil:
		with := "publish = 'insert'"
		if s.partitioned {
			with += ", publish_via_partition_root = true"
		}
		out = append(out, fmt.Sprintf("CREATE PUBLICATION %s FOR TABLE %s WITH (%s)", data["Publication"], ident, with))
	case !s.publication.hasTable:
		out = append(out, fmt.Sprintf("ALTER PUBLICATION %s ADD TABLE %s", data["Publication"], ident))
	}
	// golang-migrate's version table, as its pgx driver creates it.
	out = append(out, "CREATE TABLE IF NOT EXISTS "+s.versionTable+" (version bigint not null primary key, dirty boolean not null)",
		"DELETE FROM "+s.versionTable,
		fmt.Sprintf("INSERT INTO %s (version, dirty) VALUES (%d, false)", s.versionTable, adoptedVersion))
	return out
}

// adopt runs the adoption of cfg's outbox when it needs one: under an
// ACCESS EXCLUSIVE lock (producers wait, they do not fail), in one
// transaction with the version record, so a failure or a killed process
// leaves the database as it was. It returns the plan it ran.
func adopt(ctx context.Context, cfg Config) (PostgresPlan, error) {
	conn, err := pgx.Connect(ctx, cfg.PostgresDSN)
	if err != nil {
		return PostgresPlan{}, fmt.Errorf("connect to postgres: %w", err)
	}
	defer conn.Close(context.Background())
	var relkind *string
	if err := conn.QueryRow(ctx, "SELECT (SELECT relkind::text FROM pg_class WHERE oid = to_regclass($1))", cfg.Outbox.Ident()).Scan(&relkind); err != nil {
		return PostgresPlan{}, fmt.Errorf("look up %s: %w", cfg.Outbox, err)
	}
	if relkind == nil {
		return PostgresPlan{}, nil
	}
	if *relkind != "r" && *relkind != "p" {
		// A view, a composite type, a sequence...: nothing to adopt, and
		// migration 1 could not create the table beside it.
		return PostgresPlan{}, &AdoptionError{Table: cfg.Outbox.String(), Problem: fmt.Sprintf("it is not a table (pg_class.relkind %q)", *relkind),
			Fix: "rename or drop it, or set OUTBOX_TABLE to another name"}
	}
	tx, err := conn.Begin(ctx)
	if err != nil {
		return PostgresPlan{}, fmt.Errorf("begin: %w", err)
	}
	defer tx.Rollback(context.Background())
	if _, err := tx.Exec(ctx, fmt.Sprintf("SET LOCAL lock_timeout = '%dms'", AdoptLockTimeout.Milliseconds())); err != nil {
		return PostgresPlan{}, fmt.Errorf("set lock_timeout: %w", err)
	}
	if _, err := tx.Exec(ctx, "LOCK TABLE "+cfg.Outbox.Ident()+" IN ACCESS EXCLUSIVE MODE"); err != nil {
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == "55P03" {
			return PostgresPlan{}, fmt.Errorf("adopt %s: another transaction held the table for %s (see pg_locks and pg_stat_activity); nothing was changed, run outbox-streamer migrate up again", cfg.Outbox, AdoptLockTimeout)
		}
		return PostgresPlan{}, fmt.Errorf("lock %s: %w", cfg.Outbox, err)
	}
	plan, ok, err := planAdoption(ctx, tx, cfg)
	if err != nil || !ok {
		return plan, err
	}
	for _, stmt := range plan.Statements {
		if _, err := tx.Exec(ctx, stmt); err != nil {
			return PostgresPlan{}, fmt.Errorf("adopt %s: %s: %w (rolled back, nothing was changed)", cfg.Outbox, firstLine(stmt), err)
		}
	}
	if err := tx.Commit(ctx); err != nil {
		return PostgresPlan{}, fmt.Errorf("adopt %s: commit: %w", cfg.Outbox, err)
	}
	return plan, nil
}

// outboxTable is the outbox's table name without its schema.
func outboxTable(cfg Config) string {
	if cfg.Outbox.Table == "" {
		return outboxstore.DefaultName.Table
	}
	return cfg.Outbox.Table
}

func firstLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i] + " ..."
	}
	return s
}
