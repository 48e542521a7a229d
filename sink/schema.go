package sink

import (
	"context"
	"fmt"
	"strings"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
)

// eventColumns are the columns Insert writes and the type families each
// accepts. The migrations create DateTime64(6, 'UTC') or, on legacy servers,
// DateTime('UTC'); LowCardinality and Nullable wrappers take the same values.
var eventColumns = []struct {
	name     string
	families []string
}{
	{"event_id", []string{"UInt64"}},
	{"event_type", []string{"String"}},
	{"event_date_time", []string{"DateTime64", "DateTime"}},
	{"environment", []string{"String"}},
	{"event_context", []string{"String", "JSON", "Object"}},
	{"metadata_version", []string{"Int64"}},
	{"created_at", []string{"DateTime64", "DateTime"}},
	{"commit_lsn", []string{"UInt64"}},
}

// SchemaMismatch is an event table whose columns Insert cannot write.
type SchemaMismatch struct {
	Table       string   // database.table
	Differences []string // "missing event_id", "commit_lsn is String, want UInt64"
}

func (e *SchemaMismatch) Error() string {
	return fmt.Sprintf("clickhouse table %s exists with another schema (%s): set CLICKHOUSE_EVENT_LOG_TABLE_NAME to a new table name (migrate up creates it), or convert this table as docs/migrating-from-celery.md shows; nothing was changed",
		e.Table, strings.Join(e.Differences, "; "))
}

// CheckEventTable compares the columns of database.table, when it exists,
// with those Insert writes. It returns exists false for a missing table, and
// a *SchemaMismatch naming every difference. It only reads system.columns.
func CheckEventTable(ctx context.Context, conn driver.Conn, database, table string) (exists bool, err error) {
	rows, err := conn.Query(ctx, "SELECT name, type FROM system.columns WHERE database = "+quoteString(database)+" AND table = "+quoteString(table))
	if err != nil {
		return false, fmt.Errorf("read the columns of %s.%s: %w", database, table, err)
	}
	defer rows.Close()
	have := map[string]string{}
	for rows.Next() {
		var name, typ string
		if err := rows.Scan(&name, &typ); err != nil {
			return false, fmt.Errorf("read the columns of %s.%s: %w", database, table, err)
		}
		have[name] = typ
	}
	if err := rows.Err(); err != nil {
		return false, fmt.Errorf("read the columns of %s.%s: %w", database, table, err)
	}
	if len(have) == 0 {
		return false, nil
	}
	if diff := columnDifferences(have); len(diff) > 0 {
		return true, &SchemaMismatch{Table: database + "." + table, Differences: diff}
	}
	return true, nil
}

// columnDifferences lists how have (name → type) differs from eventColumns.
// Columns beyond them are allowed: Insert names its columns, the others
// take their defaults.
func columnDifferences(have map[string]string) []string {
	var diff []string
	for _, want := range eventColumns {
		typ, ok := have[want.name]
		if !ok {
			diff = append(diff, "missing "+want.name+" "+want.families[0])
			continue
		}
		if fam := typeFamily(typ); !contains(want.families, fam) {
			diff = append(diff, fmt.Sprintf("%s is %s, want %s", want.name, typ, strings.Join(want.families, " or ")))
		}
	}
	return diff
}

// typeFamily strips LowCardinality(...) and Nullable(...) and the type's
// parameters: "LowCardinality(String)" → "String", "DateTime64(6, 'UTC')" →
// "DateTime64".
func typeFamily(typ string) string {
	for {
		inner, ok := unwrap(typ, "LowCardinality")
		if !ok {
			inner, ok = unwrap(typ, "Nullable")
		}
		if !ok {
			break
		}
		typ = inner
	}
	if i := strings.IndexByte(typ, '('); i >= 0 {
		typ = typ[:i]
	}
	return strings.TrimSpace(typ)
}

func unwrap(typ, wrapper string) (string, bool) {
	if strings.HasPrefix(typ, wrapper+"(") && strings.HasSuffix(typ, ")") {
		return typ[len(wrapper)+1 : len(typ)-1], true
	}
	return typ, false
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// CheckTable is CheckEventTable on the writer's event table (on a cluster,
// the Distributed table Insert writes to).
func (w *Writer) CheckTable(ctx context.Context) error {
	_, err := CheckEventTable(ctx, w.conn, w.cfg.Database, w.cfg.Table)
	return err
}
