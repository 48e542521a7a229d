package testenv

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// MinStreamingMajor is the first PostgreSQL whose pgoutput streams
// in-progress transactions (protocol 2).
const MinStreamingMajor = 14

// PGMajor returns the major version of the PostgreSQL server at dsn.
func PGMajor(t testing.TB, dsn string) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatalf("testenv: connect to read the server version: %v", err)
	}
	defer conn.Close(context.Background())
	var num int
	if err := conn.QueryRow(ctx, "SELECT current_setting('server_version_num')::int").Scan(&num); err != nil {
		t.Fatalf("testenv: server_version_num: %v", err)
	}
	return num / 10000
}

// RequireStreaming skips t on a server older than PostgreSQL 14, which
// cannot stream in-progress transactions (pgoutput protocol 2).
func RequireStreaming(t testing.TB, dsn string) {
	t.Helper()
	if m := PGMajor(t, dsn); m < MinStreamingMajor {
		t.Skipf("PostgreSQL %d cannot stream in-progress transactions (pgoutput protocol 2 needs %d or newer)", m, MinStreamingMajor)
	}
}
