package config

import (
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/outbox-streamer/outbox-streamer/internal/outboxstore"
	"github.com/outbox-streamer/outbox-streamer/sink"
)

// Config is the resolved configuration of the streamer.
type Config struct {
	Environment string
	Debug       bool
	// LogFormat is LOG_FORMAT: auto, console or json (auto: console when
	// stderr is a terminal).
	LogFormat string
	// LogLevel is LOG_LEVEL: debug, info, warn or error; DEBUG forces debug.
	LogLevel string
	// LogLevelExplicit reports whether LOG_LEVEL or DEBUG was given: commands
	// that print for a person log only warnings unless asked for more.
	LogLevelExplicit bool

	// PostgresDSN is DATABASE_URL, or built from the POSTGRES_* parts.
	PostgresDSN string
	pg          struct{ host, port, user, password, db string }

	ClickHouse sink.Config
	ch         struct {
		uri, host, port string
		secure          bool
	}

	// ContextType is CLICKHOUSE_CONTEXT_TYPE, "String" or "JSON": the type of
	// event_context in a new event table (migrations.Config.ContextType).
	ContextType string

	Slot string
	// Streaming, SpillDir, SpillMaxBytes: REPLICATION_STREAMING,
	// STREAM_SPILL_DIR, STREAM_SPILL_MAX_BYTES (see replication.Config).
	Streaming string
	// Binary is REPLICATION_BINARY (see replication.Config.Binary).
	Binary        string
	SpillDir      string
	SpillMaxBytes int64
	// SlotFailover is REPLICATION_SLOT_FAILOVER (see replication.Config).
	SlotFailover string
	// StandbyHold is STANDBY_HOLD: a standby (physical slot or
	// application_name) that must have a commit before its rows are
	// delivered (see internal/standby); empty: off.
	StandbyHold   string
	spillMaxBytes int
	// StreamStaging is STREAM_STAGING: stage streamed transactions in
	// ClickHouse while they run (see sink.StagingTable).
	StreamStaging bool
	// Outbox is OUTBOX_TABLE: the outbox table this instance streams (one
	// instance per outbox; see docs/many-outboxes.md).
	Outbox      outboxstore.Name
	outboxTable string
	// Retention is OUTBOX_RETENTION: processed rows older than it are pruned.
	Retention time.Duration
	// PartitionInterval is OUTBOX_PARTITION_INTERVAL (0: unpartitioned).
	PartitionInterval time.Duration
	Publication       string
	StatusInterval    time.Duration
	TimeZone          *time.Location
	timeZone          string

	BatchSize           int
	BatchTimeout        time.Duration
	ClickHouseBatchSize int
	SweepInterval       time.Duration
	ShutdownTimeout     time.Duration
	RetryMaxWait        time.Duration
	OutageFailAfter     time.Duration
	SlotBusyTimeout     time.Duration

	// BatchMaxBytes is EVENT_BATCH_MAX_BYTES: a batch is also full at about this
	// many bytes (record.Event.Size summed); 0: no byte bound.
	BatchMaxBytes int
	// ClickHouseBatchMaxBytes is CLICKHOUSE_BATCH_MAX_BYTES: a writer merges
	// queued batches into one insert up to about this many bytes; 0: no byte
	// bound. It is at least BatchMaxBytes when both bound.
	ClickHouseBatchMaxBytes int

	MetricsAddr string
	// ProgressInterval is PROGRESS_INTERVAL: the leader's progress line (0: off).
	ProgressInterval time.Duration
	SentryDSN        string
	SentryEnv        string
	OTLPEndpoint     string

	// VerifyInterval and VerifyWindow are VERIFY_INTERVAL (0: off) and
	// VERIFY_WINDOW: the leader's periodic verification.
	VerifyInterval time.Duration
	VerifyWindow   time.Duration

	MaxAttempts    int
	RetryBaseDelay time.Duration
	RetryMaxDelay  time.Duration
}

// Bind registers every setting on src.
func Bind(src *Source, c *Config) {
	src.Group("General")
	src.String(&c.Environment, "ENVIRONMENT", "environment", "dev", "environment name (dev, prod, ...), in logs")
	src.Bool(&c.Debug, "DEBUG", "debug", false, "debug logging: the same as LOG_LEVEL=debug")
	src.String(&c.LogFormat, "LOG_FORMAT", "log-format", "auto", "log format: console (one readable line per entry), json (one JSON object per line), or auto: console when stderr is a terminal, json otherwise")
	src.String(&c.LogLevel, "LOG_LEVEL", "log-level", "info", "least severe log entries written: debug, info, warn or error")

	src.Group("PostgreSQL")
	src.Secret(&c.PostgresDSN, "DATABASE_URL", "database-url", "PostgreSQL connection string; when empty it is built from POSTGRES_*")
	src.String(&c.pg.host, "POSTGRES_HOST", "", "localhost", "PostgreSQL host (when DATABASE_URL is empty)")
	src.String(&c.pg.port, "POSTGRES_PORT", "", "5432", "PostgreSQL port (when DATABASE_URL is empty)")
	src.String(&c.pg.user, "POSTGRES_USER", "", "postgres", "PostgreSQL user (when DATABASE_URL is empty)")
	src.Secret(&c.pg.password, "POSTGRES_PASSWORD", "", "PostgreSQL password (when DATABASE_URL is empty)")
	src.String(&c.pg.db, "POSTGRES_DB", "", "postgres", "PostgreSQL database (when DATABASE_URL is empty)")

	src.Group("ClickHouse")
	src.Secret(&c.ch.uri, "CLICKHOUSE_URI", "clickhouse-uri", "ClickHouse URI (tcp://user:pass@host:9000/db or http://...:8123/db); CLICKHOUSE_* settings override its parts")
	src.String(&c.ch.host, "CLICKHOUSE_HOST", "clickhouse-host", "localhost", "ClickHouse host")
	src.String(&c.ch.port, "CLICKHOUSE_PORT", "clickhouse-port", "", "ClickHouse port (default 9000 for native, 8123 for http)")
	src.String(&c.ClickHouse.User, "CLICKHOUSE_USER", "clickhouse-user", "default", "ClickHouse user")
	src.Secret(&c.ClickHouse.Password, "CLICKHOUSE_PASSWORD", "", "ClickHouse password")
	src.String(&c.ClickHouse.Database, "CLICKHOUSE_SCHEMA", "clickhouse-schema", "default", "ClickHouse database of the event table")
	src.String(&c.ClickHouse.Protocol, "CLICKHOUSE_PROTOCOL", "clickhouse-protocol", "native", "native or http")
	src.Bool(&c.ch.secure, "CLICKHOUSE_SECURE", "clickhouse-secure", false, "connect to ClickHouse with TLS")
	src.String(&c.ClickHouse.Table, "CLICKHOUSE_EVENT_LOG_TABLE_NAME", "table", "event_log", "ClickHouse event table")
	src.String(&c.ClickHouse.Cluster, "CLICKHOUSE_CLUSTER", "clickhouse-cluster", "", "ClickHouse cluster (a <remote_servers> name): migrations create <table>_local ON CLUSTER with Replicated engines and the event table as a Distributed table over it; inserts go through it synchronously with a quorum of every replica; empty: one server")
	src.Duration(&c.ClickHouse.DialTimeout, "CLICKHOUSE_CONNECT_TIMEOUT", "clickhouse-connect-timeout", 30*time.Second, "ClickHouse connect timeout")
	src.Duration(&c.ClickHouse.ReadTimeout, "CLICKHOUSE_SEND_RECEIVE_TIMEOUT", "clickhouse-timeout", 10*time.Second, "ClickHouse send/receive timeout per request")
	src.String(&c.ContextType, "CLICKHOUSE_CONTEXT_TYPE", "clickhouse-context-type", "String", "type of event_context when `migrate up` creates the event table: String, or JSON (ClickHouse 25.3+: queries read event_context.field as a subcolumn); an existing table keeps its type")
	src.String(&c.ClickHouse.Compression, "CLICKHOUSE_COMPRESSION", "clickhouse-compression", "lz4", "how inserts travel over the native protocol: lz4, or none (less CPU in the streamer, more bytes on the link; for a ClickHouse on the same host or a fast network)")
	src.Int(&c.ClickHouse.MaxContextBytes, "EVENT_MAX_CONTEXT_BYTES", "max-context-bytes", 1<<20, 1, "largest event_context delivered; larger events are failed")

	src.Group("Replication")
	src.String(&c.Slot, "REPLICATION_SLOT_NAME", "slot", "outbox_streamer", "logical replication slot (created if missing)")
	src.String(&c.Publication, "PUBLICATION_NAME", "publication", "outbox_publication", "publication carrying inserts into event_outbox")
	src.Duration(&c.SlotBusyTimeout, "SLOT_BUSY_TIMEOUT", "slot-busy-timeout", 30*time.Second, "on start, how long to wait for a slot held by another connection (a previous leader's walsender) before giving up")
	src.Duration(&c.StatusInterval, "STATUS_INTERVAL", "status-interval", time.Second, "how often the acknowledged LSN is reported to PostgreSQL")
	src.String(&c.Streaming, "REPLICATION_STREAMING", "streaming", "auto", "stream in-progress transactions (pgoutput protocol 2): auto (PostgreSQL 14+), on, or off (protocol 1: the server holds a transaction until its commit and spills it to its own disk)")
	src.String(&c.Binary, "REPLICATION_BINARY", "binary", "auto", "values in pgoutput's binary format (binary 'true'): auto (PostgreSQL 14+, when every outbox column's type has a binary decoder), on (refuses otherwise), or off (text)")
	src.String(&c.SlotFailover, "REPLICATION_SLOT_FAILOVER", "slot-failover", "auto", "make the slot a failover slot that PostgreSQL 17+ synchronises to standbys with sync_replication_slots: auto (when synchronized_standby_slots is set on the primary), on (refuses older servers; an existing slot is altered), or off")
	src.String(&c.StandbyHold, "STANDBY_HOLD", "standby-hold", "", "a physical standby, by its replication slot on the primary or its application_name: rows reach ClickHouse only once it has flushed their commit, so a failover to it leaves no event of a lost transaction (synchronized_standby_slots for any PostgreSQL version); empty: off")
	src.String(&c.SpillDir, "STREAM_SPILL_DIR", "spill-dir", "", "where in-progress streamed transactions wait for their commit (emptied when streaming starts; default: a directory per slot, server and database under the temporary directory)")
	src.Int(&c.spillMaxBytes, "STREAM_SPILL_MAX_BYTES", "spill-max-bytes", 4<<30, 0, "bound of STREAM_SPILL_DIR; past it the streamer goes on with protocol 1 until it restarts (0: no bound)")
	src.Bool(&c.StreamStaging, "STREAM_STAGING", "stream-staging", true, "write streamed transactions to ClickHouse's <table>_staging while they run and copy them into the event table with one INSERT ... SELECT at their commit (one server, after migration 2); false: they are inserted from the local spill after their commit")

	src.Group("Outbox table")
	src.String(&c.outboxTable, "OUTBOX_TABLE", "outbox-table", outboxstore.Table, "the outbox table this instance streams, table or schema.table (lower-case names); one instance, slot, publication and event table per outbox")
	src.String(&c.timeZone, "EVENT_TIME_ZONE", "time-zone", "UTC", "time zone of the outbox's TIMESTAMP (without time zone) values")
	src.DurationOrZero(&c.PartitionInterval, "OUTBOX_PARTITION_INTERVAL", "partition-interval", 0, "width of the partitions (e.g. 1d, 1h) when `migrate up` creates event_outbox range-partitioned by created_at; the leader creates them ahead. 0: an unpartitioned table")
	src.DurationOrZero(&c.Retention, "OUTBOX_RETENTION", "retention", 7*24*time.Hour, "processed outbox rows older than this (by created_at) are removed by the leader after each sweep; 0 keeps everything (pending, failed and dead rows always stay)")

	src.Group("Batching")
	src.Int(&c.BatchSize, "EVENT_BATCH_SIZE", "batch-size", 1000, 1, "rows per batch")
	src.Duration(&c.BatchTimeout, "EVENT_BATCH_TIMEOUT", "batch-timeout", 100*time.Millisecond, "a batch is written at the latest this long after its first row; a batch that fills up before it waits up to this long more for the batches behind it, to fill one ClickHouse insert")
	src.Int(&c.BatchMaxBytes, "EVENT_BATCH_MAX_BYTES", "batch-max-bytes", 8<<20, 0, "about the most bytes per batch (the rows' sizes in an insert); a batch is written when it reaches this or EVENT_BATCH_SIZE rows (0: no byte bound)")
	src.Int(&c.ClickHouseBatchSize, "CLICKHOUSE_BATCH_SIZE", "clickhouse-batch-size", 10000, 0, "most rows per ClickHouse insert; a writer that falls behind merges queued batches up to it, and a full batch waits up to EVENT_BATCH_TIMEOUT for the ones behind it (batches are still cut at EVENT_BATCH_SIZE; at least EVENT_BATCH_SIZE); also the rows per sweep round")
	src.Int(&c.ClickHouseBatchMaxBytes, "CLICKHOUSE_BATCH_MAX_BYTES", "clickhouse-batch-max-bytes", 64<<20, 0, "about the most bytes per ClickHouse insert that merges queued batches (0: no byte bound; at least EVENT_BATCH_MAX_BYTES)")

	src.Group("Delivery and retries")
	src.Duration(&c.SweepInterval, "EVENT_PROCESSING_INTERVAL", "sweep-interval", 60*time.Second, "period of the fallback sweep while streaming")
	src.Duration(&c.OutageFailAfter, "CLICKHOUSE_OUTAGE_FAIL_AFTER", "outage-fail-after", 2*time.Minute, "after ClickHouse is unavailable this long, a batch's rows are marked failed and acknowledged; the sweep delivers them later")
	src.Duration(&c.RetryMaxWait, "RETRY_MAX_WAIT", "retry-max-wait", 30*time.Second, "cap of the backoff between retries of a transient error")
	src.Int(&c.MaxAttempts, "EVENT_MAX_ATTEMPTS", "max-attempts", 10, 1, "failed deliveries after which a row becomes a dead letter")
	src.Duration(&c.RetryBaseDelay, "EVENT_RETRY_BASE_DELAY", "retry-base-delay", 30*time.Second, "wait before a failed row is tried again; doubles per attempt")
	src.Duration(&c.RetryMaxDelay, "EVENT_RETRY_MAX_DELAY", "retry-max-delay", time.Hour, "cap of the wait between attempts of a failed row")
	src.Duration(&c.ShutdownTimeout, "SHUTDOWN_TIMEOUT", "shutdown-timeout", 30*time.Second, "bound on the final flush after SIGTERM")

	src.Group("Observability")
	src.Disableable(&c.MetricsAddr, "METRICS_ADDR", "metrics-addr", "127.0.0.1:8187", "address of /metrics, /healthz and /readyz (loopback by default; METRICS_ADDR= or --metrics-addr= disables)")
	src.DurationOrZero(&c.ProgressInterval, "PROGRESS_INTERVAL", "progress-interval", 30*time.Second, "how often the leader logs its progress: rows/s, confirmed LSN, slot lag, pending and failed rows, the oldest undelivered row; \"catching up: N left, ETA\" while more than CLICKHOUSE_BATCH_SIZE rows are pending, then \"caught up\" once; 0 turns it off")
	src.Secret(&c.SentryDSN, "SENTRY_CONFIG_DSN", "sentry-dsn", "send errors to Sentry when set")
	src.String(&c.SentryEnv, "SENTRY_CONFIG_ENVIRONMENT", "sentry-environment", "", "Sentry environment (default: ENVIRONMENT)")
	src.String(&c.OTLPEndpoint, "OTEL_EXPORTER_OTLP_ENDPOINT", "otlp-endpoint", "", "OTLP/HTTP endpoint (e.g. http://otel-collector:4318) for traces and metrics; empty disables")
	src.DurationOrZero(&c.VerifyInterval, "VERIFY_INTERVAL", "verify-interval", 0, "how often the leader compares the outbox's last VERIFY_WINDOW with ClickHouse, as `verify` does, into metrics (verify_match, verify_rows) and logs; 0 turns it off")
	src.Duration(&c.VerifyWindow, "VERIFY_WINDOW", "verify-window", 24*time.Hour, "the range of created_at each periodic verification compares, up to now")

	// The names Sentry's SDKs and ClickHouse users already know.
	src.Alias("SENTRY_CONFIG_DSN", "SENTRY_DSN")
	src.Alias("SENTRY_CONFIG_ENVIRONMENT", "SENTRY_ENVIRONMENT")
	src.Alias("CLICKHOUSE_SCHEMA", "CLICKHOUSE_DATABASE")
}

// Load parses args and the environment into a validated Config.
func Load(fs *flag.FlagSet, args []string, lookupEnv func(string) (string, bool)) (*Config, *Source, error) {
	c := &Config{}
	src := NewSource(fs, lookupEnv)
	Bind(src, c)
	if err := src.Parse(args); err != nil {
		return nil, src, err
	}
	if err := c.finish(src); err != nil {
		return nil, src, err
	}
	return c, src, nil
}

func (c *Config) finish(src *Source) error {
	loc, err := time.LoadLocation(c.timeZone)
	if err != nil {
		return fmt.Errorf("invalid EVENT_TIME_ZONE (--time-zone) %q: not a known time zone", c.timeZone)
	}
	c.TimeZone = loc
	if err := c.finishLogging(src); err != nil {
		return err
	}
	switch strings.ToLower(strings.TrimSpace(c.ContextType)) {
	case "string":
		c.ContextType = "String"
	case "json":
		c.ContextType = "JSON"
	default:
		return fmt.Errorf("invalid CLICKHOUSE_CONTEXT_TYPE (--clickhouse-context-type) %q: want String or JSON", c.ContextType)
	}
	c.SpillMaxBytes = int64(c.spillMaxBytes)
	if c.Outbox, err = outboxstore.ParseName(c.outboxTable); err != nil {
		return fmt.Errorf("invalid OUTBOX_TABLE (--outbox-table) %w", err)
	}
	for _, m := range []struct {
		dst       *string
		env, flag string
	}{
		{&c.Streaming, "REPLICATION_STREAMING", "streaming"},
		{&c.Binary, "REPLICATION_BINARY", "binary"},
		{&c.SlotFailover, "REPLICATION_SLOT_FAILOVER", "slot-failover"},
	} {
		if *m.dst, err = autoOnOff(*m.dst); err != nil {
			return fmt.Errorf("invalid %s (--%s) %w", m.env, m.flag, err)
		}
	}
	if c.SentryEnv == "" {
		c.SentryEnv = c.Environment
	}

	if c.PostgresDSN == "" {
		u := url.URL{Scheme: "postgres", Host: net.JoinHostPort(c.pg.host, c.pg.port), Path: "/" + c.pg.db}
		if c.pg.password != "" {
			u.User = url.UserPassword(c.pg.user, c.pg.password)
		} else {
			u.User = url.User(c.pg.user)
		}
		c.PostgresDSN = u.String()
	}

	if c.ch.uri != "" {
		if err := c.applyClickHouseURI(src); err != nil {
			return err
		}
	}
	switch c.ClickHouse.Compression = strings.ToLower(strings.TrimSpace(c.ClickHouse.Compression)); c.ClickHouse.Compression {
	case "lz4", "none":
	default:
		return fmt.Errorf("invalid CLICKHOUSE_COMPRESSION (--clickhouse-compression) %q: want lz4 or none", c.ClickHouse.Compression)
	}
	c.ClickHouse.Protocol = strings.ToLower(c.ClickHouse.Protocol)
	switch c.ClickHouse.Protocol {
	case "native", "tcp", "clickhouse":
		c.ClickHouse.Protocol = "native"
	case "http", "https":
	default:
		return fmt.Errorf("invalid CLICKHOUSE_PROTOCOL (--clickhouse-protocol) %q: want native or http", c.ClickHouse.Protocol)
	}
	if c.ch.port == "" {
		c.ch.port = "9000"
		if c.ClickHouse.Protocol != "native" {
			c.ch.port = "8123"
		}
	}
	if p, err := strconv.Atoi(c.ch.port); err != nil || p < 1 || p > 65535 {
		return fmt.Errorf("invalid CLICKHOUSE_PORT (--clickhouse-port) %q: want a port number", c.ch.port)
	}
	if c.ch.host == "" {
		return errors.New("invalid CLICKHOUSE_HOST (--clickhouse-host): empty")
	}
	c.ClickHouse.Addr = net.JoinHostPort(c.ch.host, c.ch.port)
	if c.ch.secure || c.ClickHouse.Protocol == "https" {
		c.ClickHouse.TLS = &tls.Config{ServerName: c.ch.host, MinVersion: tls.VersionTLS12}
	}
	if c.ClickHouseBatchSize < c.BatchSize {
		c.ClickHouseBatchSize = c.BatchSize
	}
	// A merged insert holds at least one whole batch, in bytes as in rows.
	if c.BatchMaxBytes > 0 && c.ClickHouseBatchMaxBytes > 0 && c.ClickHouseBatchMaxBytes < c.BatchMaxBytes {
		c.ClickHouseBatchMaxBytes = c.BatchMaxBytes
	}
	return c.ClickHouse.Validate()
}

// finishLogging normalises LOG_FORMAT and LOG_LEVEL; DEBUG wins over
// LOG_LEVEL because it has always meant debug lines.
func (c *Config) finishLogging(src *Source) error {
	switch c.LogFormat = strings.ToLower(strings.TrimSpace(c.LogFormat)); c.LogFormat {
	case "auto", "console", "json":
	default:
		return fmt.Errorf("invalid LOG_FORMAT (--log-format) %q: want auto, console or json", c.LogFormat)
	}
	switch c.LogLevel = strings.ToLower(strings.TrimSpace(c.LogLevel)); c.LogLevel {
	case "debug", "info", "error":
	case "warn", "warning":
		c.LogLevel = "warn"
	default:
		return fmt.Errorf("invalid LOG_LEVEL (--log-level) %q: want debug, info, warn or error", c.LogLevel)
	}
	if c.Debug {
		c.LogLevel = "debug"
	}
	c.LogLevelExplicit = c.Debug || src.Explicit("LOG_LEVEL")
	return nil
}

// applyClickHouseURI fills the ClickHouse settings the user did not give one by one.
func (c *Config) applyClickHouseURI(src *Source) error {
	u, err := url.Parse(c.ch.uri)
	if err != nil || u.Host == "" {
		return errors.New("invalid CLICKHOUSE_URI (--clickhouse-uri): want scheme://user:password@host:port/database")
	}
	set := func(env string, dst *string, v string) {
		if !src.Explicit(env) && v != "" {
			*dst = v
		}
	}
	set("CLICKHOUSE_HOST", &c.ch.host, u.Hostname())
	set("CLICKHOUSE_PORT", &c.ch.port, u.Port())
	set("CLICKHOUSE_PROTOCOL", &c.ClickHouse.Protocol, u.Scheme)
	set("CLICKHOUSE_SCHEMA", &c.ClickHouse.Database, strings.TrimPrefix(u.Path, "/"))
	if u.User != nil {
		set("CLICKHOUSE_USER", &c.ClickHouse.User, u.User.Username())
		if p, ok := u.User.Password(); ok {
			set("CLICKHOUSE_PASSWORD", &c.ClickHouse.Password, p)
		}
	}
	return nil
}

// RedactDSN returns a PostgreSQL connection string fit for logs: host, port, database
// and user, never the password or other parameters. Both forms are read: a URL and
// keyword/value pairs ("host=db port=5433 user=app dbname=shop password=...").
func RedactDSN(dsn string) string {
	u, err := url.Parse(dsn)
	if err != nil || u.Host == "" {
		kv, ok := keywordDSN(dsn)
		if !ok || kv["host"] == "" {
			return "postgres://(unparsed)"
		}
		host := kv["host"]
		if kv["port"] != "" {
			host = net.JoinHostPort(host, kv["port"])
		}
		u = &url.URL{Scheme: "postgres", Host: host}
		if kv["user"] != "" {
			u.User = url.User(kv["user"])
		}
		if kv["dbname"] != "" {
			u.Path = "/" + kv["dbname"]
		}
	}
	user := ""
	if u.User != nil {
		user = u.User.Username() + "@"
	}
	return u.Scheme + "://" + user + u.Host + u.Path
}

// keywordDSN parses libpq's keyword/value form: key=value pairs separated by
// spaces, a value in single quotes when it holds spaces, with \' and \\
// escapes. ok is false when the text is not of that form.
func keywordDSN(dsn string) (map[string]string, bool) {
	kv := map[string]string{}
	s := strings.TrimSpace(dsn)
	for s != "" {
		eq := strings.IndexByte(s, '=')
		if eq <= 0 {
			return nil, false
		}
		key := strings.TrimSpace(s[:eq])
		s = strings.TrimLeft(s[eq+1:], " ")
		var val strings.Builder
		if strings.HasPrefix(s, "'") {
			i, closed := 1, false
			for ; i < len(s); i++ {
				if s[i] == '\\' && i+1 < len(s) {
					i++
					val.WriteByte(s[i])
					continue
				}
				if s[i] == '\'' {
					closed = true
					break
				}
				val.WriteByte(s[i])
			}
			if !closed {
				return nil, false
			}
			s = s[i+1:]
		} else {
			end := strings.IndexAny(s, " \t\n")
			if end < 0 {
				end = len(s)
			}
			val.WriteString(s[:end])
			s = s[end:]
		}
		kv[key] = val.String()
		s = strings.TrimLeft(s, " \t\n")
	}
	return kv, true
}

// autoOnOff reads a three-way switch: auto, on or off, with the usual
// spellings of true and false for on and off.
func autoOnOff(v string) (string, error) {
	switch v = strings.ToLower(strings.TrimSpace(v)); v {
	case "auto", "on", "off":
		return v, nil
	case "true", "1", "yes":
		return "on", nil
	case "false", "0", "no":
		return "off", nil
	}
	return v, fmt.Errorf("%q: want auto, on or off", v)
}
