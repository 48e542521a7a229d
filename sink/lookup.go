package sink

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"go.uber.org/zap"

	"github.com/outbox-streamer/outbox-streamer/internal/fault"
	"github.com/outbox-streamer/outbox-streamer/internal/record"
)

// ExistingIDs returns which of the events' ids the table already holds. The time
// bounds let ClickHouse prune partitions.
func (c *Client) ExistingIDs(ctx context.Context, events []record.Event) (map[int64]struct{}, error) {
	found := make(map[int64]struct{})
	if len(events) == 0 {
		return found, nil
	}
	if err := c.Ready(ctx); err != nil {
		return nil, err
	}
	if ci := c.clusterInfo(); ci != nil {
		return c.clusterExistingIDs(ctx, ci, events)
	}
	c.awaitInsertsDone(ctx)
	q := c.lookupQuery(events, c.table)
	rows, err := c.conn.Query(ctx, q)
	if err != nil {
		c.noteFailure(err)
		return nil, fmt.Errorf("look up %d event ids in %s: %w", len(events), c.table, err)
	}
	defer rows.Close()
	if err := scanIDs(rows, found); err != nil {
		return nil, fmt.Errorf("look up event ids in %s: %w", c.table, err)
	}
	return found, nil
}

// lookupQuery selects which of the events' ids table holds; the time bounds
// let ClickHouse prune partitions.
func (c *Client) lookupQuery(events []record.Event, table string) string {
	_, legacy, _, maxValid := c.version()
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

// settleQuiet is how long the server must run no insert into the table, after
// it failed us, before a lookup trusts that no insert of ours is still to come.
const settleQuiet = time.Second

// noteFailure records a transient failure of the server.
func (c *Client) noteFailure(err error) {
	if err != nil && fault.Retryable(err) {
		c.mu.Lock()
		c.lastFailure = time.Now()
		c.mu.Unlock()
	}
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
func (c *Client) awaitInsertsDone(ctx context.Context) {
	q := "SELECT count() FROM system.processes WHERE position(query, " + quoteString("INSERT INTO "+c.table) + ") = 1"
	running := func(ctx context.Context) (uint64, error) {
		var n uint64
		err := c.conn.QueryRow(ctx, q).Scan(&n)
		return n, err
	}
	if ci := c.clusterInfo(); ci != nil {
		running = ci.runningInserts
	}
	c.mu.Lock()
	needQuiet := c.lastFailure.After(c.settledAt)
	c.mu.Unlock()
	deadline := time.Now().Add(3 * c.cfg.ReadTimeout)
	var quietSince time.Time
	for {
		n, err := running(ctx)
		if err != nil {
			c.noteFailure(err)
			return // the error shows again in the lookup itself
		}
		if n == 0 {
			if !needQuiet {
				return
			}
			if quietSince.IsZero() {
				quietSince = time.Now()
			} else if time.Since(quietSince) >= settleQuiet {
				c.mu.Lock()
				c.settledAt = time.Now()
				c.mu.Unlock()
				return
			}
		} else {
			quietSince = time.Time{}
		}
		if time.Now().After(deadline) {
			c.log.Warn("inserts into the event table still running; looking up ids anyway", zap.Uint64("running", n))
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Count returns the number of rows in the event table (for the demo's
// progress; not for checks of delivery, which need the ids).
func (c *Client) Count(ctx context.Context) (uint64, error) {
	var n uint64
	if err := c.conn.QueryRow(ctx, "SELECT count() FROM "+c.table).Scan(&n); err != nil {
		c.noteFailure(err)
		return 0, fmt.Errorf("count rows in %s: %w", c.table, err)
	}
	return n, nil
}

// DeliveredCeiling returns the highest commit LSN among the rows inserted
// into the event table within the last window (0 when there are none): what
// ClickHouse holds, whatever record of it PostgreSQL kept. inserted_at has a
// skipping index on modern servers (migration 3).
func (c *Client) DeliveredCeiling(ctx context.Context, window time.Duration) (uint64, error) {
	var lsn uint64
	q := fmt.Sprintf("SELECT max(commit_lsn) FROM %s WHERE inserted_at >= now() - INTERVAL %d SECOND", c.table, int64(window/time.Second))
	if err := c.conn.QueryRow(ctx, q).Scan(&lsn); err != nil {
		c.noteFailure(err)
		return 0, fmt.Errorf("read the highest commit LSN in %s: %w", c.table, err)
	}
	return lsn, nil
}
