package sink

import (
	"context"
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"go.uber.org/zap"

	"github.com/outbox-streamer/outbox-streamer/internal/fault"
)

// Open connects to ClickHouse and detects the server version; an unreachable
// server is an error.
func Open(ctx context.Context, cfg Config, log *zap.Logger) (*Client, error) {
	c, err := OpenLazy(cfg, log)
	if err != nil {
		return nil, err
	}
	if err := c.Ready(ctx); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// OpenLazy returns a client without talking to the server: the streamer
// starts, and reads its slot, while ClickHouse is down (the outbox is the
// buffer). Call Ready before Validate; Insert calls it itself.
func OpenLazy(cfg Config, log *zap.Logger) (*Client, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	conn, err := Connect(cfg)
	if err != nil {
		return nil, err
	}
	return &Client{conn: conn, cfg: cfg, table: QuoteIdent(cfg.Database) + "." + QuoteIdent(cfg.Table), log: log.Named("sink")}, nil
}

// Ready detects the server's version unless known already. Its error says
// which server could not be reached; fault.Retryable tells whether waiting
// may help.
func (c *Client) Ready(ctx context.Context) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.detected {
		return nil
	}
	legacy, ver, err := DetectVersion(ctx, c.conn)
	if err != nil {
		if fault.AuthFailed(err) {
			return &AuthError{Addr: c.cfg.Addr, User: c.cfg.User, Code: fault.ClickHouseCode(err), err: err}
		}
		if fault.Retryable(err) {
			c.lastFailure = time.Now()
		}
		return fmt.Errorf("clickhouse at %s is unreachable (check CLICKHOUSE_HOST/CLICKHOUSE_PORT/CLICKHOUSE_PROTOCOL and credentials): %w", c.cfg.Addr, err)
	}
	if c.cfg.Cluster != "" {
		ci, err := loadCluster(ctx, c.conn, c.cfg, ver)
		if err != nil {
			if fault.Retryable(err) {
				c.lastFailure = time.Now()
			}
			return err
		}
		c.cluster = ci
		c.log.Info("clickhouse cluster", zap.String("cluster", c.cfg.Cluster), zap.Int("shards", ci.shards),
			zap.Int("replicas_per_shard", ci.replicas), zap.Strings("nodes", ci.addrs()), zap.Int("insert_quorum", ci.quorum()))
	}
	c.legacy, c.detected = legacy, true
	c.minT, c.maxT = TimeRange(legacy)
	c.log.Info("connected to clickhouse", zap.String("addr", c.cfg.Addr), zap.String("version", ver), zap.Bool("legacy_schema", legacy))
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
func (c *Client) version() (detected, legacy bool, minT, maxT time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.detected, c.legacy, c.minT, c.maxT
}

// Connect opens a clickhouse-go connection from cfg (without checking it).
func Connect(cfg Config) (driver.Conn, error) {
	conn, err := clickhouse.Open(connectOptions(cfg))
	if err != nil {
		return nil, fmt.Errorf("open clickhouse connection to %s: %w", cfg.Addr, err)
	}
	return conn, nil
}

// connectOptions are clickhouse-go's options for cfg.
func connectOptions(cfg Config) *clickhouse.Options {
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
	if proto == clickhouse.HTTP || cfg.Compression == CompressionNone {
		opts.Compression = nil
	}
	return opts
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
func (c *Client) Close() error {
	c.mu.Lock()
	ci := c.cluster
	c.mu.Unlock()
	if ci != nil {
		ci.close()
	}
	return c.conn.Close()
}
