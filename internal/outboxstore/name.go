package outboxstore

import (
	"fmt"
	"regexp"
	"strings"

	"github.com/outbox-streamer/outbox-streamer/internal/pgsql"
)

// Name is an outbox table's name (OUTBOX_TABLE): a table and, when given, its
// schema. Without a schema the table is found through the connection's
// search_path, as an unqualified name in SQL is; the replication stream then
// matches it in schema public (replication.Config's default).
//
// Every statement of the store, the migrations and the preconditions names
// the table through Ident or Literal, so two outboxes (one per streamer
// instance) never touch each other's rows. The zero Name is event_outbox.
type Name struct {
	Schema, Table string
}

// DefaultName is event_outbox, found through the search_path.
var DefaultName = Name{Table: Table}

// namePart is what OUTBOX_TABLE accepts for a schema or table: an unquoted
// PostgreSQL identifier in lower case. Upper case is refused rather than
// quoted: unquoted in the application's own SQL, "Orders" is orders, and the
// streamer would look for another table than the one the application writes.
var namePart = regexp.MustCompile(`^[a-z_][a-z0-9_]*$`)

// MaxTableBytes bounds the table part: the names derived from it (the
// migrations' version table outbox_streamer_migrations_TABLE, the index
// TABLE_undelivered_idx, the partitions TABLE_p20261201_1500) must fit
// PostgreSQL's 63 bytes, or the server would cut them and two outboxes
// could end up with one name.
const MaxTableBytes = 63 - len(migrationsTablePrefix) - 1

// migrationsTablePrefix is the migrations' version table (see MigrationsTable).
const migrationsTablePrefix = "outbox_streamer_migrations"

// ParseName parses OUTBOX_TABLE: "table" or "schema.table", each part an
// unquoted lower-case identifier; "" is event_outbox.
func ParseName(s string) (Name, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return DefaultName, nil
	}
	parts := strings.Split(s, ".")
	if len(parts) > 2 {
		return Name{}, fmt.Errorf("%q: want table or schema.table", s)
	}
	for _, p := range parts {
		if !namePart.MatchString(p) || len(p) > 63 {
			return Name{}, fmt.Errorf("%q: %q is not a plain PostgreSQL name (lower-case letters, digits and underscores, not starting with a digit, at most 63 bytes)", s, p)
		}
	}
	n := Name{Table: parts[len(parts)-1]}
	if len(parts) == 2 {
		n.Schema = parts[0]
	}
	if len(n.Table) > MaxTableBytes {
		return Name{}, fmt.Errorf("%q: the table name is longer than %d bytes (the names derived from it must fit PostgreSQL's 63)", s, MaxTableBytes)
	}
	return n, nil
}

func (n Name) orDefault() Name {
	if n.Table == "" {
		return DefaultName
	}
	return n
}

// String is the name as OUTBOX_TABLE spells it (for logs and messages).
func (n Name) String() string {
	n = n.orDefault()
	if n.Schema == "" {
		return n.Table
	}
	return n.Schema + "." + n.Table
}

// IsDefault reports whether n is event_outbox without a schema.
func (n Name) IsDefault() bool { return n.orDefault() == DefaultName }

// Ident is the quoted (qualified when a schema is given) name for SQL.
func (n Name) Ident() string {
	n = n.orDefault()
	if n.Schema == "" {
		return pgsql.Ident(n.Table)
	}
	return pgsql.Ident(n.Schema, n.Table)
}

// sql puts Ident where the statement q says {outbox}.
func (n Name) sql(q string) string { return strings.ReplaceAll(q, "{outbox}", n.Ident()) }

// Literal is Ident as a string constant, for regclass casts and to_regclass.
func (n Name) Literal() string { return pgsql.Literal(n.Ident()) }

// Related is the quoted name of an object the migrations or the leader create
// beside the table, in its schema: the table's name followed by suffix
// ("_default", "_p20261201"). Two outboxes never share one.
func (n Name) Related(suffix string) string {
	n = n.orDefault()
	if n.Schema == "" {
		return pgsql.Ident(n.Table + suffix)
	}
	return pgsql.Ident(n.Schema, n.Table+suffix)
}

// MigrationsTable is the unqualified name of the migrations' version table of
// this outbox in PostgreSQL (it lives in the outbox's schema):
// outbox_streamer_migrations for event_outbox — the name every existing
// database has — and outbox_streamer_migrations_TABLE for any other table.
// One version table per outbox: with a shared one, the second outbox's
// `migrate up` would find version 1 applied and create nothing.
func (n Name) MigrationsTable() string {
	n = n.orDefault()
	if n.Table == Table {
		return migrationsTablePrefix
	}
	return migrationsTablePrefix + "_" + n.Table
}
