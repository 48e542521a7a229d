package migrations

// Read-only probes: `migrate status`, `migrate up --dry-run` and the checks
// `migrate up` makes before changing anything. None of them creates a
// database, a schema or a version table (golang-migrate's drivers create
// their version table when opened, so these read the tables themselves).

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/zap"

	"github.com/outbox-streamer/outbox-streamer/internal/outboxstore"

	"github.com/outbox-streamer/outbox-streamer/sink"
)

// Statuses reports both databases' migration state, changing nothing.
func Statuses(ctx context.Context, cfg Config) ([]Status, error) {
	if err := cfg.ClickHouse.Validate(); err != nil {
		return nil, err
	}
	pg, err := postgresStatus(ctx, cfg)
	if err != nil {
		return nil, err
	}
	ch, err := clickhouseStatus(ctx, cfg)
	if err != nil {
		return nil, err
	}
	return []Status{pg, ch}, nil
}

func postgresStatus(ctx context.Context, cfg Config) (Status, error) {
	conn, err := pgx.Connect(ctx, cfg.PostgresDSN)
	if err != nil {
		return Status{}, fmt.Errorf("connect to postgres: %w", err)
	}
	defer conn.Close(context.Background())
	vt, err := versionTableIdent(ctx, conn, cfg)
	if err != nil {
		return Status{}, err
	}
	v, dirty, _, err := readVersion(ctx, conn, vt)
	if err != nil {
		return Status{}, err
	}
	s := Status{Database: Postgres, Version: uint(max(v, 0)), Dirty: dirty, Latest: latest("")}
	s.setState()
	if s.Version == 0 || (dirty && s.Version == adoptedVersion) {
		if err := conn.QueryRow(ctx, "SELECT to_regclass($1) IS NOT NULL", cfg.Outbox.Ident()).Scan(&s.Adopt); err != nil {
			return Status{}, fmt.Errorf("look up %s: %w", cfg.Outbox, err)
		}
	}
	return s, nil
}

// clickhouseProbe connects to cfg's server through the system database (the
// configured one may not exist) and returns the connection and the
// migrations' flavour.
func clickhouseProbe(ctx context.Context, mcfg Config) (driver.Conn, string, error) {
	bootstrap := mcfg.ClickHouse
	bootstrap.Database = "system"
	var conn driver.Conn
	var legacy bool
	err := connectRetrying(ctx, mcfg, ClickHouse, func(ctx context.Context) error {
		c, err := sink.Connect(bootstrap)
		if err != nil {
			return err
		}
		if legacy, _, err = sink.DetectVersion(ctx, c); err != nil {
			c.Close()
			return err
		}
		conn = c
		return nil
	})
	if err != nil {
		return nil, "", fmt.Errorf("connect to clickhouse at %s: %w", mcfg.ClickHouse.Addr, err)
	}
	flavour := "modern"
	if legacy {
		flavour = "legacy"
	}
	if mcfg.ClickHouse.Cluster != "" {
		flavour += "-cluster"
	}
	return conn, flavour, nil
}

func clickhouseStatus(ctx context.Context, cfg Config) (Status, error) {
	conn, flavour, err := clickhouseProbe(ctx, cfg)
	if err != nil {
		return Status{}, err
	}
	defer conn.Close()
	s := Status{Database: ClickHouse, Flavour: flavour, Latest: latest(flavour)}
	db, vt := cfg.ClickHouse.Database, ClickHouseMigrationsTable(cfg.ClickHouse.Table)
	var n uint64
	if err := conn.QueryRow(ctx, "SELECT count() FROM system.tables WHERE database = "+quoteCH(db)+" AND name = "+quoteCH(vt)).Scan(&n); err != nil {
		return Status{}, fmt.Errorf("look up the clickhouse migrations table: %w", err)
	}
	if n > 0 {
		d := &chDriver{conn: conn, table: sink.QuoteIdent(db) + "." + sink.QuoteIdent(vt), timeout: cfg.ClickHouse.ReadTimeout + time.Minute}
		v, dirty, err := d.Version()
		if err != nil {
			return Status{}, err
		}
		s.Version, s.Dirty = uint(max(v, 0)), dirty
	}
	s.setState()
	return s, nil
}

// CheckEventTable refuses an existing ClickHouse event table whose columns
// the streamer cannot insert into (a *sink.SchemaMismatch); a missing one is
// fine (migrate up creates it).
func CheckEventTable(ctx context.Context, cfg Config) error {
	conn, _, err := clickhouseProbe(ctx, cfg)
	if err != nil {
		return err
	}
	defer conn.Close()
	_, err = sink.CheckEventTable(ctx, conn, cfg.ClickHouse.Database, cfg.ClickHouse.Table)
	return err
}

func quoteCH(s string) string { return sink.QuoteString(s) }

// PlanClickHouse returns the ClickHouse migrations `migrate up` would run, as
// rendered SQL, changing nothing; an existing event table of another schema
// is a *sink.SchemaMismatch.
func PlanClickHouse(ctx context.Context, cfg Config) ([]string, error) {
	if err := CheckEventTable(ctx, cfg); err != nil {
		return nil, err
	}
	st, err := clickhouseStatus(ctx, cfg)
	if err != nil {
		return nil, err
	}
	conn, _, err := clickhouseProbe(ctx, cfg)
	if err != nil {
		return nil, err
	}
	legacy, version, err := sink.DetectVersion(ctx, conn)
	conn.Close()
	if err != nil {
		return nil, err
	}
	contextType, err := contextColumnType(cfg.ContextType, legacy, version)
	if err != nil {
		return nil, err
	}
	rendered, err := Rendered("clickhouse/"+st.Flavour, ClickHouseData(cfg.ClickHouse, contextType))
	if err != nil {
		return nil, err
	}
	from := st.Version
	if st.Dirty && from > 0 {
		from--
	}
	var out []string
	if st.Version == 0 {
		out = append(out, "CREATE DATABASE IF NOT EXISTS "+sink.QuoteIdent(cfg.ClickHouse.Database)+onCluster(cfg.ClickHouse))
	}
	for _, name := range sortedUp(rendered, from) {
		out = append(out, name+"\n"+strings.TrimSpace(rendered[name]))
	}
	return out, nil
}

// sortedUp is the names of the up migrations after version, in order.
func sortedUp(rendered map[string]string, version uint) []string {
	var names []string
	for name := range rendered {
		var v uint
		if _, err := fmt.Sscanf(name, "%d_", &v); err == nil && v > version && strings.HasSuffix(name, ".up.sql") {
			names = append(names, name)
		}
	}
	slices.Sort(names)
	return names
}

// PreviewRetention counts what the first retention pass of `run` would
// remove from the outbox with this retention.
func PreviewRetention(ctx context.Context, cfg Config, retention time.Duration) (outboxstore.RetentionPreview, error) {
	pool, err := pgxpool.New(ctx, cfg.PostgresDSN)
	if err != nil {
		return outboxstore.RetentionPreview{}, fmt.Errorf("DATABASE_URL: %w", err)
	}
	defer pool.Close()
	p := outboxstore.NewPruner(outboxstore.PruneConfig{Table: cfg.Outbox, Retention: retention, TimeZone: cfg.TimeZone}, pool, zap.NewNop())
	return p.Preview(ctx)
}
