// Package replication consumes the outbox's pgoutput replication slot: it checks the
// server's preconditions, creates the slot, receives and decodes the stream, answers
// keepalives, and reports the durable position back to PostgreSQL.
package replication

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// Config describes the slot and publication to stream from.
type Config struct {
	// DSN is the PostgreSQL connection string (DATABASE_URL). The role needs the
	// REPLICATION attribute (or superuser) and UPDATE on the outbox table.
	DSN string
	// Slot is the logical replication slot (REPLICATION_SLOT_NAME, default
	// "outbox_streamer"). It is created with the pgoutput plugin when missing.
	Slot string
	// Publication is the publication carrying inserts into the outbox
	// (PUBLICATION_NAME, default "outbox_publication").
	Publication string
	// Schema and Table name the outbox table (default public.event_outbox).
	Schema, Table string
	// StatusInterval is how often the acknowledged position is reported to the server
	// (default 1 s). Keepalives that request a reply are answered at once regardless.
	StatusInterval time.Duration
	// TimeZone is the zone of TIMESTAMP WITHOUT TIME ZONE values (default UTC).
	TimeZone *time.Location
	// Streaming is REPLICATION_STREAMING: "auto" (the default) streams
	// in-progress transactions (pgoutput protocol 2, streaming on) from
	// PostgreSQL 14 on and uses protocol 1 before; "on" requires it; "off"
	// is protocol 1, where the server holds a transaction until its commit
	// and spills it to its own disk past logical_decoding_work_mem.
	Streaming string
	// Binary is REPLICATION_BINARY: "auto" (the default) asks pgoutput for
	// values in binary format (PostgreSQL 14+, binary 'true': the walsender
	// skips timestamp_out and int8out, the decoder reads fixed-width values)
	// when every outbox column the pipeline reads has a type the decoder
	// reads in binary, and for text otherwise; "on" requires it; "off" is text.
	Binary string
	// SpillDir is where in-progress streamed transactions are kept until
	// they commit (STREAM_SPILL_DIR; default a directory per slot, server and
	// database under the system's temporary directory, see
	// DefaultSpillDir). It is emptied when streaming starts.
	SpillDir string
	// SpillMaxBytes bounds SpillDir (STREAM_SPILL_MAX_BYTES; 0: no bound).
	// Past it the stream ends with ErrSpillFull and the supervisor goes on
	// with protocol 1.
	SpillMaxBytes int64
	// SlotFailover is REPLICATION_SLOT_FAILOVER: whether the slot is a
	// failover slot, which PostgreSQL 17+ synchronises to physical standbys
	// running with sync_replication_slots, so that a promoted standby has
	// it at the position the streamer confirmed. "auto" (the default) makes
	// it one on 17+ when the primary's synchronized_standby_slots names a
	// standby (only then does the primary hold logical decoding back until
	// that standby has the WAL, which a synced slot needs to be usable after
	// a failover); "on" requires 17+ and turns an existing slot into one;
	// "off" creates ordinary slots and leaves existing ones alone.
	SlotFailover string
}

// Streaming modes.
const (
	StreamingAuto = "auto"
	StreamingOn   = "on"
	StreamingOff  = "off"
)

// Binary modes.
const (
	BinaryAuto = "auto"
	BinaryOn   = "on"
	BinaryOff  = "off"
)

// Failover modes of REPLICATION_SLOT_FAILOVER.
const (
	FailoverAuto = "auto"
	FailoverOn   = "on"
	FailoverOff  = "off"
)

var slotName = regexp.MustCompile(`^[a-z0-9_]{1,63}$`)

// Validate checks the configuration and fills defaults.
func (c *Config) Validate() error {
	if c.DSN == "" {
		return errors.New("DATABASE_URL is empty")
	}
	if c.Slot == "" {
		c.Slot = "outbox_streamer"
	}
	if !slotName.MatchString(c.Slot) {
		return fmt.Errorf("REPLICATION_SLOT_NAME %q: PostgreSQL slot names use only lower-case letters, digits and underscores (at most 63)", c.Slot)
	}
	if c.Publication == "" {
		c.Publication = "outbox_publication"
	}
	if c.Schema == "" {
		c.Schema = "public"
	}
	if c.Table == "" {
		c.Table = "event_outbox"
	}
	if c.StatusInterval <= 0 {
		c.StatusInterval = time.Second
	}
	if c.TimeZone == nil {
		c.TimeZone = time.UTC
	}
	for _, m := range []struct {
		dst *string
		env string
	}{{&c.Streaming, "REPLICATION_STREAMING"}, {&c.Binary, "REPLICATION_BINARY"}, {&c.SlotFailover, "REPLICATION_SLOT_FAILOVER"}} {
		switch *m.dst {
		case "":
			*m.dst = "auto"
		case "auto", "on", "off":
		default:
			return fmt.Errorf("%s %q: want auto, on or off", m.env, *m.dst)
		}
	}
	if c.SpillDir == "" {
		c.SpillDir = DefaultSpillDir(c.DSN, c.Slot)
	}
	return nil
}

// DefaultSpillDir is outbox-streamer-spill-<slot>-<hash> under the system's
// temporary directory, the hash taken over the servers (hosts and ports) and
// the database of dsn. Slot names are unique only per server, and the
// spill is emptied when streaming starts: two streamers with one slot name
// on different servers must not share a directory. The password is not
// part of it, so rotating it keeps the directory.
func DefaultSpillDir(dsn, slot string) string {
	key := dsn
	if cfg, err := pgconn.ParseConfig(dsn); err == nil {
		var b strings.Builder
		fmt.Fprintf(&b, "%s:%d", cfg.Host, cfg.Port)
		for _, fb := range cfg.Fallbacks {
			fmt.Fprintf(&b, ",%s:%d", fb.Host, fb.Port)
		}
		fmt.Fprintf(&b, "/%s", cfg.Database)
		key = b.String()
	}
	sum := sha256.Sum256([]byte(key))
	return filepath.Join(os.TempDir(), fmt.Sprintf("outbox-streamer-spill-%s-%x", slot, sum[:6]))
}

// PreconditionError is a server setup problem the operator must fix; Hint says how.
type PreconditionError struct {
	Problem string
	Hint    string
	// SlotInUse marks the one precondition that passes by itself: another
	// connection streaming from the slot.
	SlotInUse bool
}

func (e *PreconditionError) Error() string { return e.Problem + ": " + e.Hint }
