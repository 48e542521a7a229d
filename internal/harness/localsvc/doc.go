// Package localsvc starts PostgreSQL and ClickHouse as plain local processes
// for tests and local development, on machines without Docker.
//
// Three services are supported:
//
//   - PostgreSQL from the distribution's server binaries
//     (/usr/lib/postgresql/*/bin), configured for logical replication.
//   - A modern ClickHouse (26.7): the chDB library (libchdb.so, which is
//     clickhouse-local built as a shared library) run by a launcher that is
//     the calling binary itself, re-executed with OUTBOX_CHDB_LAUNCHER=1.
//     Every binary that starts it must call RunCHDBLauncherIfRequested first
//     thing in main or TestMain.
//   - A legacy ClickHouse (18.16) from Debian's clickhouse-server package.
//
// Every server listens on 127.0.0.1 on ports picked at start, keeps its data
// and its log in a directory of its own, and is tied to the calling process
// with a parent-death signal so that no server outlives a crashed test binary.
// Servers support Halt/Kill/Start/Restart so that chaos tests can take them
// away and bring them back with their data intact.
package localsvc
