// Package sink is the one package that talks to ClickHouse: it connects (native
// protocol or HTTP), learns the server's version, validates events against
// what the event table can hold, inserts batches into event_log, looks up
// which event ids it holds, and quotes ClickHouse identifiers and strings.
// Migrations dial through its Connect; no other package writes ClickHouse SQL
// for the streamer.
package sink

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/fnv"
	"math"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"go.uber.org/zap"

	"github.com/outbox-streamer/outbox-streamer/internal/fault"
	"github.com/outbox-streamer/outbox-streamer/internal/record"
)

// Config describes the ClickHouse connection and target table.
type Config struct {
	// Addr is host:port; the port is the native (9000) or HTTP (8123) one depending on
	// Protocol.
	Addr     string
	User     string
	Password string
	// Database is the ClickHouse database (CLICKHOUSE_SCHEMA). Default "default".
	Database string
	// Table is the event table (CLICKHOUSE_EVENT_LOG_TABLE_NAME). Default "event_log".
	Table string
	// Protocol is "native" (default) or "http".
	Protocol string
	// DialTimeout bounds connecting (CLICKHOUSE_CONNECT_TIMEOUT, default 30 s).
	DialTimeout time.Duration
	// ReadTimeout bounds each request (CLICKHOUSE_SEND_RECEIVE_TIMEOUT, default 10 s).
	ReadTimeout time.Duration
	// TLS enables TLS when not nil.
	TLS *tls.Config
	// MaxContextBytes is the largest event_context accepted; larger rows are failed.
	// Default 1 MiB.
	MaxContextBytes int
	// Cluster is the ClickHouse cluster (CLICKHOUSE_CLUSTER, a <remote_servers>
	// name) whose Distributed table Table is, over LocalTable on every node;
	// empty: a single server. See cluster.go.
	Cluster string
}

// Validate checks the configuration and fills defaults.
func (c *Config) Validate() error {
	if c.Addr == "" {
		return errors.New("clickhouse address is empty (set CLICKHOUSE_HOST and CLICKHOUSE_PORT)")
	}
	if c.Database == "" {
		c.Database = "default"
	}
	if c.Table == "" {
		c.Table = "event_log"
	}
	switch c.Protocol {
	case "":
		c.Protocol = "native"
	case "native", "tcp", "http", "https":
	default:
		return fmt.Errorf("CLICKHOUSE_PROTOCOL %q: want native or http", c.Protocol)
	}
	if c.DialTimeout <= 0 {
		c.DialTimeout = 30 * time.Second
	}
	if c.ReadTimeout <= 0 {
		c.ReadTimeout = 10 * time.Second
	}
	if c.MaxContextBytes <= 0 {
		c.MaxContextBytes = 1 << 20
	}
	return nil
}

// Writer inserts batches into the event table.
type Writer struct {
	conn  driver.Conn
	cfg   Config
	table string // quoted db.table
	log   *zap.Logger

	// Set once the server's version is known (Open, or Ready after OpenLazy).
	mu       sync.Mutex
	detected bool
	legacy   bool
	minT     time.Time
	maxT     time.Time

	// When the server last failed a request transiently, and when a quiet
	// spell was last seen after that (see awaitInsertsDone).
	lastFailure, settledAt time.Time

	// The cluster's nodes, learnt by Ready when cfg.Cluster is set.
	cluster *clusterInfo
}

// settleQuiet is how long the server must run no insert into the table, after
// it failed us, before a lookup trusts that no insert of ours is still to come.
const settleQuiet = time.Second

// noteFailure records a transient failure of the server.
func (w *Writer) noteFailure(err error) {
	if err != nil && fault.Retryable(err) {
		w.mu.Lock()
		w.lastFailure = time.Now()
		w.mu.Unlock()
	}
}

// ErrNotConnected is returned by Validate before the server's version is
// known: which times a row may hold depends on it.
var ErrNotConnected = errors.New("clickhouse version not known yet (not connected)")

// Columns inserted by the writer, in order.
const insertColumns = "event_id, event_type, event_date_time, environment, event_context, metadata_version, created_at, commit_lsn"

// Open connects to ClickHouse and detects the server version; an unreachable
// server is an error.
func Open(ctx context.Context, cfg Config, log *zap.Logger) (*Writer, error) {
	w, err := OpenLazy(cfg, log)
	if err != nil {
		return nil, err
	}
	if err := w.Ready(ctx); err != nil {
		w.Close()
		return nil, err
	}
	return w, nil
}

// OpenLazy returns a writer without talking to the server: the streamer
// starts, and reads its slot, while ClickHouse is down (the outbox is the
// buffer). Call Ready before Validate; Insert calls it itself.
func OpenLazy(cfg Config, log *zap.Logger) (*Writer, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	conn, err := Connect(cfg)
	if err != nil {
		return nil, err
	}
	return &Writer{conn: conn, cfg: cfg, table: QuoteIdent(cfg.Database) + "." + QuoteIdent(cfg.Table), log: log.Named("sink")}, nil
}

// Ready detects the server's version unless known already. Its error says
// which server could not be reached; fault.Retryable tells whether waiting
// may help.
func (w *Writer) Ready(ctx context.Context) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.detected {
		return nil
	}
	legacy, ver, err := DetectVersion(ctx, w.conn)
	if err != nil {
		if fault.AuthFailed(err) {
			return &AuthError{Addr: w.cfg.Addr, User: w.cfg.User, Code: fault.ClickHouseCode(err), err: err}
		}
		if fault.Retryable(err) {
			w.lastFailure = time.Now()
		}
		return fmt.Errorf("clickhouse at %s is unreachable (check CLICKHOUSE_HOST/CLICKHOUSE_PORT/CLICKHOUSE_PROTOCOL and credentials): %w", w.cfg.Addr, err)
	}
	if w.cfg.Cluster != "" {
		ci, err := loadCluster(ctx, w.conn, w.cfg, ver)
		if err != nil {
			if fault.Retryable(err) {
				w.lastFailure = time.Now()
			}
			return err
		}
		w.cluster = ci
		w.log.Info("clickhouse cluster", zap.String("cluster", w.cfg.Cluster), zap.Int("shards", ci.shards),
			zap.Int("replicas_per_shard", ci.replicas), zap.Strings("nodes", ci.addrs()), zap.Int("insert_quorum", ci.quorum()))
	}
	w.legacy, w.detected = legacy, true
	w.minT, w.maxT = TimeRange(legacy)
	w.log.Info("connected to clickhouse", zap.String("addr", w.cfg.Addr), zap.String("version", ver), zap.Bool("legacy_schema", legacy))
	return nil
}

// AuthError is ClickHouse refusing the configured user or password. Its
// text is one line: the server's own message adds advice for the server's
// administrator (how to reset a password) over several lines, and the
// connection was not "unreachable".
type AuthError struct {
	Addr, User string
	Code       int32
	err        error
}

func (e *AuthError) Error() string {
	return fmt.Sprintf("clickhouse at %s rejected user %q: authentication failed (%d); check CLICKHOUSE_USER and CLICKHOUSE_PASSWORD", e.Addr, e.User, e.Code)
}

// Unwrap returns the server's exception, for fault's classification.
func (e *AuthError) Unwrap() error { return e.err }

// version returns what Ready learnt.
func (w *Writer) version() (detected, legacy bool, minT, maxT time.Time) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.detected, w.legacy, w.minT, w.maxT
}

// Connect opens a clickhouse-go connection from cfg (without checking it).
func Connect(cfg Config) (driver.Conn, error) {
	proto := clickhouse.Native
	if cfg.Protocol == "http" || cfg.Protocol == "https" {
		proto = clickhouse.HTTP
	}
	opts := &clickhouse.Options{
		Addr:        []string{cfg.Addr},
		Protocol:    proto,
		Auth:        clickhouse.Auth{Database: cfg.Database, Username: cfg.User, Password: cfg.Password},
		DialTimeout: cfg.DialTimeout,
		ReadTimeout: cfg.ReadTimeout,
		TLS:         cfg.TLS,
		Compression: &clickhouse.Compression{Method: clickhouse.CompressionLZ4},
		// One insert at a time plus the occasional lookup.
		MaxOpenConns: 4,
		MaxIdleConns: 2,
	}
	if proto == clickhouse.HTTP {
		opts.Compression = nil
	}
	conn, err := clickhouse.Open(opts)
	if err != nil {
		return nil, fmt.Errorf("open clickhouse connection to %s: %w", cfg.Addr, err)
	}
	return conn, nil
}

// DetectVersion reports whether the server needs the legacy schema (older than 22.x:
// no DateTime64 or LowCardinality by default) and its version string.
func DetectVersion(ctx context.Context, conn driver.Conn) (legacy bool, version string, err error) {
	var v string
	if err := conn.QueryRow(ctx, "SELECT version()").Scan(&v); err != nil {
		return false, "", err
	}
	major, _ := strconv.Atoi(strings.SplitN(v, ".", 2)[0])
	return major < 22, v, nil
}

// TimeRange is the range of times the event table's time columns hold without
// wrapping: DateTime on legacy servers (1970 to 2106); on modern ones
// DateTime64(6) holds 1900 to 2299, but clickhouse-go converts a time.Time
// through UnixNano, which overflows after 2262-04-11 23:47:16.854775807 (2290
// was stored as 1705): the range ends there, cut to microseconds.
func TimeRange(legacy bool) (min, max time.Time) {
	if legacy {
		return time.Unix(0, 0).UTC(), time.Unix(1<<32-1, 0).UTC()
	}
	return time.Date(1900, 1, 1, 0, 0, 0, 0, time.UTC), time.Unix(0, math.MaxInt64).UTC().Truncate(time.Microsecond)
}

// Close closes the connection (and those to the cluster's nodes).
func (w *Writer) Close() error {
	w.mu.Lock()
	ci := w.cluster
	w.mu.Unlock()
	if ci != nil {
		ci.close()
	}
	return w.conn.Close()
}

// Validate reports why ev cannot be stored faithfully, or nil. ClickHouse would
// silently wrap an out-of-range DateTime, so ranges are checked here.
func (w *Writer) Validate(ev *record.Event) error {
	detected, _, minT, maxT := w.version()
	if !detected {
		return ErrNotConnected
	}
	if ev.Problem != "" {
		return errors.New(ev.Problem)
	}
	if ev.Type == "" {
		return errors.New("event_type is empty")
	}
	if err := checkTime("event_date_time", ev.Time, minT, maxT); err != nil {
		return err
	}
	if err := checkTime("created_at", ev.CreatedAt, minT, maxT); err != nil {
		return err
	}
	if len(ev.Context) > w.cfg.MaxContextBytes {
		return fmt.Errorf("event_context is %d bytes, over the %d-byte limit", len(ev.Context), w.cfg.MaxContextBytes)
	}
	return nil
}

func checkTime(col string, t, minT, maxT time.Time) error {
	if t.Before(minT) || t.After(maxT) {
		return fmt.Errorf("%s %s is outside what ClickHouse stores in this column (%s to %s)",
			col, t.UTC().Format(time.RFC3339Nano), minT.Format("2006-01-02"), maxT.Format("2006-01-02"))
	}
	return nil
}

// Insert writes events in one INSERT. The caller validated them.
func (w *Writer) Insert(ctx context.Context, events []record.Event) error {
	if len(events) == 0 {
		return nil
	}
	if err := w.Ready(ctx); err != nil {
		return err
	}
	_, legacy, _, _ := w.version()
	settings := clickhouse.Settings{}
	if !legacy {
		// A re-sent copy of this insert (after an answer that was lost) is
		// then dropped by the server, whatever of it had been committed.
		settings["insert_deduplication_token"] = DedupToken(events) + "-" + attemptOf(ctx)
	}
	if ci := w.clusterInfo(); ci != nil {
		ci.insertSettings(settings, w.cfg.ReadTimeout)
	}
	if len(settings) > 0 {
		ctx = clickhouse.Context(ctx, clickhouse.WithSettings(settings))
	}
	b, err := w.conn.PrepareBatch(ctx, "INSERT INTO "+w.table+" ("+insertColumns+")")
	if err != nil {
		return fmt.Errorf("prepare insert into %s: %w", w.table, err)
	}
	n := len(events)
	ids := make([]uint64, n)
	types := make([]string, n)
	times := make([]time.Time, n)
	envs := make([]string, n)
	ctxs := make([]string, n)
	versions := make([]int64, n)
	created := make([]time.Time, n)
	lsns := make([]uint64, n)
	for i := range events {
		ev := &events[i]
		ids[i] = uint64(ev.ID)
		types[i] = ev.Type
		times[i] = ev.Time
		envs[i] = ev.Environment
		ctxs[i] = ev.Context
		versions[i] = ev.MetadataVersion
		created[i] = ev.CreatedAt
		lsns[i] = ev.CommitLSN
	}
	cols := []any{ids, types, times, envs, ctxs, versions, created, lsns}
	for i, c := range cols {
		if err := b.Column(i).Append(c); err != nil {
			_ = b.Abort()
			return fmt.Errorf("build column %d of insert into %s: %w", i, w.table, err)
		}
	}
	if err := b.Send(); err != nil {
		w.noteFailure(err)
		return fmt.Errorf("insert %d rows into %s: %w", n, w.table, err)
	}
	return nil
}

type attemptKey struct{}

// WithInsertAttempt names one delivery attempt of a set of rows: inserts of
// the same rows under the same attempt carry the same deduplication token, so
// that the server drops a re-sent copy after a lost answer. A new attempt (a
// later re-drive of a row deleted from ClickHouse by hand) gets a new token
// and is not mistaken for a copy.
func WithInsertAttempt(ctx context.Context, attempt string) context.Context {
	return context.WithValue(ctx, attemptKey{}, attempt)
}

// NewAttempt returns a fresh attempt name.
func NewAttempt() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func attemptOf(ctx context.Context) string {
	if a, ok := ctx.Value(attemptKey{}).(string); ok {
		return a
	}
	return NewAttempt()
}

// DedupToken names an insert by the events it carries (their count, first and
// last id, and a hash of all ids in order): the same rows in the same order give
// the same token, any other insert another.
func DedupToken(events []record.Event) string {
	h := fnv.New64a()
	var buf [8]byte
	for i := range events {
		binary.LittleEndian.PutUint64(buf[:], uint64(events[i].ID))
		_, _ = h.Write(buf[:])
	}
	if len(events) == 0 {
		return "outbox-empty"
	}
	return fmt.Sprintf("outbox-%d-%d-%d-%016x", len(events), events[0].ID, events[len(events)-1].ID, h.Sum64())
}

// ExistingIDs returns which of the events' ids the table already holds. The time
// bounds let ClickHouse prune partitions.
func (w *Writer) ExistingIDs(ctx context.Context, events []record.Event) (map[int64]struct{}, error) {
	found := make(map[int64]struct{})
	if len(events) == 0 {
		return found, nil
	}
	if err := w.Ready(ctx); err != nil {
		return nil, err
	}
	if ci := w.clusterInfo(); ci != nil {
		return w.clusterExistingIDs(ctx, ci, events)
	}
	w.awaitInsertsDone(ctx)
	q := w.lookupQuery(events, w.table)
	rows, err := w.conn.Query(ctx, q)
	if err != nil {
		w.noteFailure(err)
		return nil, fmt.Errorf("look up %d event ids in %s: %w", len(events), w.table, err)
	}
	defer rows.Close()
	if err := scanIDs(rows, found); err != nil {
		return nil, fmt.Errorf("look up event ids in %s: %w", w.table, err)
	}
	return found, nil
}

// lookupQuery selects which of the events' ids table holds; the time bounds
// let ClickHouse prune partitions.
func (w *Writer) lookupQuery(events []record.Event, table string) string {
	_, legacy, _, maxValid := w.version()
	var sb strings.Builder
	minT, maxT := events[0].Time, events[0].Time
	sb.WriteString("SELECT event_id FROM ")
	sb.WriteString(table)
	sb.WriteString(" WHERE event_id IN (")
	for i := range events {
		if i > 0 {
			sb.WriteByte(',')
		}
		sb.WriteString(strconv.FormatInt(events[i].ID, 10))
		if events[i].Time.Before(minT) {
			minT = events[i].Time
		}
		if events[i].Time.After(maxT) {
			maxT = events[i].Time
		}
	}
	sb.WriteString(") AND event_date_time >= ")
	sb.WriteString(timeLiteral(legacy, minT.Truncate(time.Second)))
	sb.WriteString(" AND event_date_time <= ")
	// Whole seconds around the range; on a legacy server the second after
	// its last one would wrap to 1970.
	upper := maxT.Truncate(time.Second).Add(time.Second)
	if upper.After(maxValid) {
		upper = maxValid
	}
	sb.WriteString(timeLiteral(legacy, upper))
	return sb.String()
}

// scanIDs adds the event ids rows return to found.
func scanIDs(rows driver.Rows, found map[int64]struct{}) error {
	for rows.Next() {
		var id uint64
		if err := rows.Scan(&id); err != nil {
			return fmt.Errorf("scan event id: %w", err)
		}
		found[int64(id)] = struct{}{}
	}
	return rows.Err()
}

// awaitInsertsDone waits until the server runs no insert into the table.
// ExistingIDs answers "what does ClickHouse hold" after an insert whose outcome
// is unknown — the client timed out or was killed — and such an insert may
// still be running on the server, with all its data received, and commit after
// the lookup: the rows it reported missing would then be sent twice. Other
// inserts (the sweep's) only make the wait longer.
//
// After the server failed us (a timeout: it may have been frozen or stalled),
// an insert whose data sat unread in its socket may not even be listed yet when
// it resumes; then the server must show no insert for settleQuiet in a row,
// once per recovery, before the lookup is trusted. The wait is bounded (three
// ReadTimeouts), after which the lookup goes ahead with a warning.
func (w *Writer) awaitInsertsDone(ctx context.Context) {
	q := "SELECT count() FROM system.processes WHERE position(query, " + quoteString("INSERT INTO "+w.table) + ") = 1"
	running := func(ctx context.Context) (uint64, error) {
		var n uint64
		err := w.conn.QueryRow(ctx, q).Scan(&n)
		return n, err
	}
	if ci := w.clusterInfo(); ci != nil {
		running = ci.runningInserts
	}
	w.mu.Lock()
	needQuiet := w.lastFailure.After(w.settledAt)
	w.mu.Unlock()
	deadline := time.Now().Add(3 * w.cfg.ReadTimeout)
	var quietSince time.Time
	for {
		n, err := running(ctx)
		if err != nil {
			w.noteFailure(err)
			return // the error shows again in the lookup itself
		}
		if n == 0 {
			if !needQuiet {
				return
			}
			if quietSince.IsZero() {
				quietSince = time.Now()
			} else if time.Since(quietSince) >= settleQuiet {
				w.mu.Lock()
				w.settledAt = time.Now()
				w.mu.Unlock()
				return
			}
		} else {
			quietSince = time.Time{}
		}
		if time.Now().After(deadline) {
			w.log.Warn("inserts into the event table still running; looking up ids anyway", zap.Uint64("running", n))
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// quoteString quotes s as a ClickHouse string literal.
func quoteString(s string) string {
	return "'" + strings.NewReplacer(`\`, `\\`, `'`, `\'`).Replace(s) + "'"
}

func timeLiteral(legacy bool, t time.Time) string {
	// Numbers, not date strings: nothing to parse, and no time zone rules.
	if legacy {
		return "toDateTime(" + strconv.FormatInt(t.Unix(), 10) + ", 'UTC')"
	}
	return "fromUnixTimestamp64Micro(toInt64(" + strconv.FormatInt(t.UnixMicro(), 10) + "), 'UTC')"
}

// QuoteIdent quotes a ClickHouse identifier with backticks.
func QuoteIdent(s string) string {
	s = strings.ReplaceAll(s, `\`, `\\`)
	return "`" + strings.ReplaceAll(s, "`", "\\`") + "`"
}

// Table is the event table's quoted name (database.table).
func (w *Writer) Table() string { return w.table }

// Count returns the number of rows in the event table (for the demo's
// progress; not for checks of delivery, which need the ids).
func (w *Writer) Count(ctx context.Context) (uint64, error) {
	var n uint64
	if err := w.conn.QueryRow(ctx, "SELECT count() FROM "+w.table).Scan(&n); err != nil {
		w.noteFailure(err)
		return 0, fmt.Errorf("count rows in %s: %w", w.table, err)
	}
	return n, nil
}

// DeliveredCeiling returns the highest commit LSN among the rows inserted
// into the event table within the last window (0 when there are none): what
// ClickHouse holds, whatever record of it PostgreSQL kept. inserted_at has a
// skipping index on modern servers (migration 3).
func (w *Writer) DeliveredCeiling(ctx context.Context, window time.Duration) (uint64, error) {
	var lsn uint64
	q := fmt.Sprintf("SELECT max(commit_lsn) FROM %s WHERE inserted_at >= now() - INTERVAL %d SECOND", w.table, int64(window/time.Second))
	if err := w.conn.QueryRow(ctx, q).Scan(&lsn); err != nil {
		w.noteFailure(err)
		return 0, fmt.Errorf("read the highest commit LSN in %s: %w", w.table, err)
	}
	return lsn, nil
}
