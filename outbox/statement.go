package outbox

import (
	"fmt"
	"strings"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
)

// DefaultTable is the outbox table written when Options.Table is empty, the
// one the streamer's migrations create.
const DefaultTable = "event_outbox"

// InsertSQL is the statement Append executes to insert one event into
// DefaultTable, for code that writes events with its own SQL layer (sqlc,
// hand-written queries) and still wants the package's encoding. Use
// InsertStatement for another table.
//
// Every parameter is text, cast in the statement, so that it means the same
// for every driver and query mode:
//
//	$1  event_type        the event type
//	$2  event_date_time   the event time in UTC, without an offset, formatted
//	                      with the layout "2006-01-02 15:04:05.999999"
//	$3  environment       the environment ("" is allowed)
//	$4  event_context     the context as JSON
//	$5  metadata_version  the version as a decimal integer, such as "1"
//
// It returns the new row's id. The time must be UTC text because the column
// is TIMESTAMP without time zone: a zoned value would be converted through
// the session's TimeZone (see the package documentation). The statement checks
// nothing that the column types do not; call Validate first to apply the
// rules Append applies.
const InsertSQL = `INSERT INTO "event_outbox" (event_type, event_date_time, environment, event_context, metadata_version)
VALUES ($1::text, $2::text::timestamp, $3::text, $4::text::jsonb, $5::text::bigint)
RETURNING id`

// insertTail is InsertSQL after its table name; InsertStatement puts another
// name in front of it (a test checks that the two agree).
const insertTail = ` (event_type, event_date_time, environment, event_context, metadata_version)
VALUES ($1::text, $2::text::timestamp, $3::text, $4::text::jsonb, $5::text::bigint)
RETURNING id`

// InsertStatement returns InsertSQL for table, named as in Options.Table:
// "" for DefaultTable, a table name or schema.table. Each part is quoted, so
// it must be spelled as PostgreSQL stores it (lower case for a table created
// without quotes).
func InsertStatement(table string) (string, error) {
	t := resolveTable(table)
	return t.insert, t.err
}

// copyColumns are the columns AppendBatch fills, those of InsertSQL; the
// others take their defaults (id from the sequence, status 'pending',
// created_at now in UTC).
var copyColumns = []string{"event_type", "event_date_time", "environment", "event_context", "metadata_version"}

// table is a resolved Options.Table: what Append and AppendBatch send, worked
// out once per Writer.
type table struct {
	name   string         // as configured, for error messages
	ident  pgx.Identifier // for COPY
	insert string         // InsertStatement
	err    error          // why the name is unusable, or nil
}

// defaultTable serves the zero Writer.
var defaultTable = resolveTable("")

// resolveTable parses name ("" for DefaultTable, "table" or "schema.table")
// and quotes it. Quoting every part, instead of only those that need it,
// keeps keywords and mixed case safe without a list of reserved words;
// pgx.Identifier.Sanitize is the same quoting CopyFrom applies, so the INSERT
// and the COPY name the same table by construction.
func resolveTable(name string) table {
	if name == "" {
		name = DefaultTable
	}
	parts := strings.Split(name, ".")
	fail := func(reason string) table {
		return table{name: name, err: fmt.Errorf("outbox: table %q: %s", name, reason)}
	}
	if len(parts) > 2 {
		return fail("want a table name or schema.table, without dots in the names")
	}
	for _, p := range parts {
		switch {
		case p == "":
			return fail("empty name part")
		case !utf8.ValidString(p):
			return fail("not valid UTF-8")
		case strings.IndexByte(p, 0) >= 0:
			// Sanitize would drop the NUL silently and name another table.
			return fail("contains a NUL byte")
		case len(p) >= 2 && p[0] == '"' && p[len(p)-1] == '"':
			// Quoting it again would look for a name with quotes in it.
			return fail("give the name unquoted: each part is quoted by the package")
		}
	}
	ident := pgx.Identifier(parts)
	return table{name: name, ident: ident, insert: "INSERT INTO " + ident.Sanitize() + insertTail}
}
