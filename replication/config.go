// Package replication consumes the outbox's pgoutput replication slot: it checks the
// server's preconditions, creates the slot, receives and decodes the stream, answers
// keepalives, and reports the durable position back to PostgreSQL.
package replication

import (
	"errors"
	"fmt"
	"regexp"
	"time"
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
}

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
	return nil
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
