// Package pgsql is the one place that quotes values into PostgreSQL SQL text,
// for the few statements that take no parameters (SET TRANSACTION SNAPSHOT,
// DDL, replication commands). Everything else passes values as parameters.
package pgsql

import (
	"strings"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
)

// Ident quotes an identifier, or a qualified one from its parts
// ("public", "event_outbox" → "public"."event_outbox").
func Ident(parts ...string) string { return pgx.Identifier(parts).Sanitize() }

// Literal quotes s as a string constant. The server runs with
// standard_conforming_strings on (the default since 9.1), so a backslash is
// an ordinary character and only quotes are doubled; a NUL, which no text
// value can hold, is dropped.
func Literal(s string) string {
	return "'" + strings.ReplaceAll(strings.ReplaceAll(s, "\x00", ""), "'", "''") + "'"
}

// ParseLSN parses an LSN in PostgreSQL's text form (16/B374D848).
func ParseLSN(s string) (uint64, error) {
	lsn, err := pglogrepl.ParseLSN(s)
	return uint64(lsn), err
}
