// Package sink is the one package that talks to ClickHouse: it connects (native
// protocol or HTTP), learns the server's version, validates events against
// what the event table can hold, inserts batches into event_log, looks up
// which event ids it holds, and quotes ClickHouse identifiers and strings.
// Migrations dial through its Connect; no other package writes ClickHouse SQL
// for the streamer.
package sink

import (
	"crypto/tls"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"go.uber.org/zap"
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
	// Compression is how inserts travel over the native protocol
	// (CLICKHOUSE_COMPRESSION): "lz4" (the default) or "none". HTTP sends
	// them uncompressed either way.
	Compression string
}

// Compression methods.
const (
	CompressionLZ4  = "lz4"
	CompressionNone = "none"
)

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
	switch c.Compression {
	case "":
		c.Compression = CompressionLZ4
	case CompressionLZ4, CompressionNone:
	default:
		return fmt.Errorf("CLICKHOUSE_COMPRESSION %q: want lz4 or none", c.Compression)
	}
	return nil
}

// Client is the streamer's connection to ClickHouse's event table: it validates
// and inserts events, stages streamed transactions, looks up and counts what
// the table holds, and reads it for verify.
type Client struct {
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

// Table is the event table's quoted name (database.table).
func (c *Client) Table() string { return c.table }
