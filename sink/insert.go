package sink

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/fnv"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"

	"github.com/outbox-streamer/outbox-streamer/internal/record"
)

// ErrNotConnected is returned by Validate before the server's version is
// known: which times a row may hold depends on it.
var ErrNotConnected = errors.New("clickhouse version not known yet (not connected)")

// Validate reports why ev cannot be stored faithfully, or nil. ClickHouse would
// silently wrap an out-of-range DateTime, so ranges are checked here.
func (c *Client) Validate(ev *record.Event) error {
	detected, _, minT, maxT := c.version()
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
	if len(ev.Context) > c.cfg.MaxContextBytes {
		return fmt.Errorf("event_context is %d bytes, over the %d-byte limit", len(ev.Context), c.cfg.MaxContextBytes)
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

// Columns of an insert into the event table, in order.
const insertColumns = "event_id, event_type, event_date_time, environment, event_context, metadata_version, created_at, commit_lsn"

// Insert writes events in one INSERT. The caller validated them.
func (c *Client) Insert(ctx context.Context, events []record.Event) error {
	if len(events) == 0 {
		return nil
	}
	if err := c.Ready(ctx); err != nil {
		return err
	}
	_, legacy, _, _ := c.version()
	settings := clickhouse.Settings{}
	if !legacy {
		// A re-sent copy of this insert (after an answer that was lost) is
		// then dropped by the server, whatever of it had been committed.
		settings["insert_deduplication_token"] = DedupToken(events) + "-" + attemptOf(ctx)
	}
	if ci := c.clusterInfo(); ci != nil {
		ci.insertSettings(settings, c.cfg.ReadTimeout)
	}
	if len(settings) > 0 {
		ctx = clickhouse.Context(ctx, clickhouse.WithSettings(settings))
	}
	b, err := c.conn.PrepareBatch(ctx, "INSERT INTO "+c.table+" ("+insertColumns+")")
	if err != nil {
		return fmt.Errorf("prepare insert into %s: %w", c.table, err)
	}
	n := len(events)
	lsns := make([]uint64, n)
	for i := range events {
		lsns[i] = events[i].CommitLSN
	}
	if err := appendColumns(b, append(eventColumnValues(events), lsns), c.table); err != nil {
		return err
	}
	if err := b.Send(); err != nil {
		c.noteFailure(err)
		return fmt.Errorf("insert %d rows into %s: %w", n, c.table, err)
	}
	return nil
}

// eventColumnValues are the columns of events that the event table and its
// staging table share, in insert order: event_id, event_type,
// event_date_time, environment, event_context, metadata_version, created_at.
func eventColumnValues(events []record.Event) []any {
	n := len(events)
	ids := make([]uint64, n)
	types := make([]string, n)
	times := make([]time.Time, n)
	envs := make([]string, n)
	ctxs := make([]string, n)
	versions := make([]int64, n)
	created := make([]time.Time, n)
	for i := range events {
		ev := &events[i]
		ids[i], types[i], times[i], envs[i] = uint64(ev.ID), ev.Type, ev.Time, ev.Environment
		ctxs[i], versions[i], created[i] = ev.Context, ev.MetadataVersion, ev.CreatedAt
	}
	return []any{ids, types, times, envs, ctxs, versions, created}
}

// appendColumns fills b's columns in order, and aborts b when one fails.
func appendColumns(b driver.Batch, cols []any, table string) error {
	for i, c := range cols {
		if err := b.Column(i).Append(c); err != nil {
			_ = b.Abort()
			return fmt.Errorf("build column %d of insert into %s: %w", i, table, err)
		}
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
