// Package sink writes event batches into the ClickHouse event_log table over the
// native protocol (or HTTP), adapting the column types to the server's version.
package sink

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"go.uber.org/zap"

	"github.com/outbox-streamer/outbox-streamer/record"
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
	conn   driver.Conn
	cfg    Config
	legacy bool
	table  string // quoted db.table
	log    *zap.Logger
	minT   time.Time
	maxT   time.Time
}

// Columns inserted by the writer, in order.
const insertColumns = "event_id, event_type, event_date_time, environment, event_context, metadata_version, created_at, commit_lsn"

// Open connects to ClickHouse and detects the server version.
func Open(ctx context.Context, cfg Config, log *zap.Logger) (*Writer, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	conn, err := Connect(cfg)
	if err != nil {
		return nil, err
	}
	legacy, ver, err := DetectVersion(ctx, conn)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("clickhouse at %s is unreachable (check CLICKHOUSE_HOST/CLICKHOUSE_PORT/CLICKHOUSE_PROTOCOL and credentials): %w", cfg.Addr, err)
	}
	w := &Writer{conn: conn, cfg: cfg, legacy: legacy, table: QuoteIdent(cfg.Database) + "." + QuoteIdent(cfg.Table), log: log.Named("sink")}
	w.minT, w.maxT = TimeRange(legacy)
	w.log.Info("connected to clickhouse", zap.String("addr", cfg.Addr), zap.String("version", ver), zap.Bool("legacy_schema", legacy))
	return w, nil
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

// Close closes the connection.
func (w *Writer) Close() error { return w.conn.Close() }

// Validate reports why ev cannot be stored faithfully, or nil. ClickHouse would
// silently wrap an out-of-range DateTime, so ranges are checked here.
func (w *Writer) Validate(ev *record.Event) error {
	if ev.Problem != "" {
		return errors.New(ev.Problem)
	}
	if ev.Type == "" {
		return errors.New("event_type is empty")
	}
	if err := w.checkTime("event_date_time", ev.Time); err != nil {
		return err
	}
	if err := w.checkTime("created_at", ev.CreatedAt); err != nil {
		return err
	}
	if len(ev.Context) > w.cfg.MaxContextBytes {
		return fmt.Errorf("event_context is %d bytes, over the %d-byte limit", len(ev.Context), w.cfg.MaxContextBytes)
	}
	return nil
}

func (w *Writer) checkTime(col string, t time.Time) error {
	if t.Before(w.minT) || t.After(w.maxT) {
		return fmt.Errorf("%s %s is outside what ClickHouse stores in this column (%s to %s)",
			col, t.UTC().Format(time.RFC3339Nano), w.minT.Format("2006-01-02"), w.maxT.Format("2006-01-02"))
	}
	return nil
}

// Insert writes events in one INSERT. The caller validated them.
func (w *Writer) Insert(ctx context.Context, events []record.Event) error {
	if len(events) == 0 {
		return nil
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
		return fmt.Errorf("insert %d rows into %s: %w", n, w.table, err)
	}
	return nil
}

// ExistingIDs returns which of the events' ids the table already holds. The time
// bounds let ClickHouse prune partitions.
func (w *Writer) ExistingIDs(ctx context.Context, events []record.Event) (map[int64]struct{}, error) {
	found := make(map[int64]struct{})
	if len(events) == 0 {
		return found, nil
	}
	var sb strings.Builder
	minT, maxT := events[0].Time, events[0].Time
	sb.WriteString("SELECT event_id FROM ")
	sb.WriteString(w.table)
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
	sb.WriteString(w.timeLiteral(minT.Truncate(time.Second)))
	sb.WriteString(" AND event_date_time <= ")
	// Whole seconds around the range; on a legacy server the second after
	// its last one would wrap to 1970.
	upper := maxT.Truncate(time.Second).Add(time.Second)
	if upper.After(w.maxT) {
		upper = w.maxT
	}
	sb.WriteString(w.timeLiteral(upper))
	rows, err := w.conn.Query(ctx, sb.String())
	if err != nil {
		return nil, fmt.Errorf("look up %d event ids in %s: %w", len(events), w.table, err)
	}
	defer rows.Close()
	for rows.Next() {
		var id uint64
		if err := rows.Scan(&id); err != nil {
			return nil, fmt.Errorf("scan event id: %w", err)
		}
		found[int64(id)] = struct{}{}
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("look up event ids in %s: %w", w.table, err)
	}
	return found, nil
}

func (w *Writer) timeLiteral(t time.Time) string {
	// Numbers, not date strings: nothing to parse, and no time zone rules.
	if w.legacy {
		return "toDateTime(" + strconv.FormatInt(t.Unix(), 10) + ", 'UTC')"
	}
	return "fromUnixTimestamp64Micro(toInt64(" + strconv.FormatInt(t.UnixMicro(), 10) + "), 'UTC')"
}

// QuoteIdent quotes a ClickHouse identifier with backticks.
func QuoteIdent(s string) string {
	s = strings.ReplaceAll(s, `\`, `\\`)
	return "`" + strings.ReplaceAll(s, "`", "\\`") + "`"
}
