package sink

// The ClickHouse side of `outbox-streamer verify` (internal/verify): per-bucket
// checksums of the event table by created_at and the ids behind a bucket. Both
// read without FINAL: a ReplacingMergeTree may merge duplicates away some day,
// and until then they are what verify must see.

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
)

// VerifyMixSQL is mix(event_id) of the checksum, the same function
// outboxstore computes in PostgreSQL: ((id mod 2^32) * 1597334677 + id div
// 2^32) mod 4294967291. Every operand stays below 2^63, so UInt64 arithmetic
// on either schema never wraps; the sums of count(), sum(event_id) and
// sum(mix) wrap modulo 2^64, which PostgreSQL reproduces.
const VerifyMixSQL = "((event_id % 4294967296) * 1597334677 + intDiv(event_id, 4294967296)) % 4294967291"

// VerifyRange bounds a verify read of the event table.
type VerifyRange struct {
	// From and Until bound created_at ([From, Until)): whole seconds, as
	// the legacy schema holds seconds only. Zero From and Until: any.
	From, Until time.Time
	// Width is the bucket width (whole seconds): a row's bucket is
	// (created_at - From) / Width.
	Width time.Duration
	// EventFrom and EventUntil bound event_date_time (inclusive), which the
	// table is partitioned and ordered by: they let ClickHouse skip the
	// partitions and granules the outbox's rows cannot be in. Zero: any.
	EventFrom, EventUntil time.Time
}

// BucketSum is the checksum of one bucket of the event table.
type BucketSum struct {
	Bucket          int64
	Count, Sum, Mix uint64
}

// Held is one event id the table holds, with its number of rows (more than
// one: a duplicate) and the earliest created_at among them.
type Held struct {
	ID        int64
	Copies    uint64
	CreatedAt time.Time
}

// ReadStats is what the server reported reading (native protocol only: over
// HTTP the rows and bytes stay 0).
type ReadStats struct {
	Queries     int
	Rows, Bytes uint64
}

// Add adds o to s.
func (s *ReadStats) Add(o ReadStats) {
	s.Queries += o.Queries
	s.Rows += o.Rows
	s.Bytes += o.Bytes
}

// VerifySums returns the checksum of each bucket of r that holds rows, in
// bucket order: one GROUP BY over the range.
func (c *Client) VerifySums(ctx context.Context, r VerifyRange) ([]BucketSum, ReadStats, error) {
	q, err := c.verifySumsSQL(ctx, r)
	if err != nil {
		return nil, ReadStats{}, err
	}
	ctx, stats := withReadStats(ctx)
	rows, err := c.conn.Query(ctx, q)
	if err != nil {
		c.noteFailure(err)
		return nil, stats(), fmt.Errorf("verify: sum buckets of %s: %w", c.table, err)
	}
	defer rows.Close()
	var out []BucketSum
	for rows.Next() {
		var b BucketSum
		if err := rows.Scan(&b.Bucket, &b.Count, &b.Sum, &b.Mix); err != nil {
			return nil, stats(), fmt.Errorf("verify: read bucket sums of %s: %w", c.table, err)
		}
		out = append(out, b)
	}
	if err := rows.Err(); err != nil {
		return nil, stats(), fmt.Errorf("verify: read bucket sums of %s: %w", c.table, err)
	}
	return out, stats(), nil
}

// verifySumsSQL is the statement VerifySums runs.
func (c *Client) verifySumsSQL(ctx context.Context, r VerifyRange) (string, error) {
	if err := c.Ready(ctx); err != nil {
		return "", err
	}
	_, legacy, _, _ := c.version()
	if r.Width < time.Second || r.Width%time.Second != 0 || r.From.IsZero() {
		return "", fmt.Errorf("verify: buckets need a start and a width of whole seconds (got %s)", r.Width)
	}
	var bucket string
	if legacy {
		// DateTime: seconds since 1970.
		bucket = fmt.Sprintf("intDiv(toInt64(toUInt32(created_at)) - %d, %d)", r.From.Unix(), int64(r.Width/time.Second))
	} else {
		bucket = fmt.Sprintf("intDiv(toUnixTimestamp64Micro(created_at) - toInt64(%d), toInt64(%d))", r.From.UnixMicro(), r.Width.Microseconds())
	}
	return "SELECT " + bucket + " AS bucket, count(), sum(event_id), sum(" + VerifyMixSQL + ")" +
		" FROM " + c.table + " WHERE " + c.verifyWhere(legacy, r) +
		" GROUP BY bucket ORDER BY bucket", nil
}

// VerifyIDs calls fn for each event id in r, in id order, with its number of
// rows: the ids behind one bucket. The server sorts; the client holds one row
// at a time.
func (c *Client) VerifyIDs(ctx context.Context, r VerifyRange, fn func(Held) error) (ReadStats, error) {
	if err := c.Ready(ctx); err != nil {
		return ReadStats{}, err
	}
	_, legacy, _, _ := c.version()
	q := "SELECT event_id, count(), min(created_at) FROM " + c.table + " WHERE " + c.verifyWhere(legacy, r) +
		" GROUP BY event_id ORDER BY event_id"
	return c.scanHeld(ctx, q, fn)
}

// VerifyLookup returns which of ids the table holds within r (r's time bounds
// may be zero), with their number of rows, in id order; 10,000 ids per query.
func (c *Client) VerifyLookup(ctx context.Context, ids []int64, r VerifyRange) ([]Held, ReadStats, error) {
	var out []Held
	var total ReadStats
	if len(ids) == 0 {
		return nil, total, nil
	}
	if err := c.Ready(ctx); err != nil {
		return nil, total, err
	}
	_, legacy, _, _ := c.version()
	const chunk = 10000
	for start := 0; start < len(ids); start += chunk {
		part := ids[start:min(start+chunk, len(ids))]
		var sb strings.Builder
		sb.WriteString("SELECT event_id, count(), min(created_at) FROM ")
		sb.WriteString(c.table)
		sb.WriteString(" WHERE event_id IN (")
		for i, id := range part {
			if i > 0 {
				sb.WriteByte(',')
			}
			sb.WriteString(strconv.FormatInt(id, 10))
		}
		sb.WriteString(") AND ")
		sb.WriteString(c.verifyWhere(legacy, r))
		sb.WriteString(" GROUP BY event_id ORDER BY event_id")
		st, err := c.scanHeld(ctx, sb.String(), func(h Held) error { out = append(out, h); return nil })
		total.Add(st)
		if err != nil {
			return nil, total, err
		}
	}
	return out, total, nil
}

func (c *Client) scanHeld(ctx context.Context, q string, fn func(Held) error) (ReadStats, error) {
	ctx, stats := withReadStats(ctx)
	rows, err := c.conn.Query(ctx, q)
	if err != nil {
		c.noteFailure(err)
		return stats(), fmt.Errorf("verify: read event ids of %s: %w", c.table, err)
	}
	defer rows.Close()
	for rows.Next() {
		var id, n uint64
		var at time.Time
		if err := rows.Scan(&id, &n, &at); err != nil {
			return stats(), fmt.Errorf("verify: read event ids of %s: %w", c.table, err)
		}
		if err := fn(Held{ID: int64(id), Copies: n, CreatedAt: at.UTC()}); err != nil {
			return stats(), err
		}
	}
	if err := rows.Err(); err != nil {
		return stats(), fmt.Errorf("verify: read event ids of %s: %w", c.table, err)
	}
	return stats(), nil
}

// verifyWhere is r's condition, with the time bounds clamped to what the
// schema holds (a legacy literal past 2106 would wrap to 1970).
func (c *Client) verifyWhere(legacy bool, r VerifyRange) string {
	minT, maxT := TimeRange(legacy)
	clamp := func(t time.Time) time.Time {
		if t.Before(minT) {
			return minT
		}
		if t.After(maxT) {
			return maxT
		}
		return t
	}
	var conds []string
	if !r.From.IsZero() {
		conds = append(conds, "created_at >= "+timeLiteral(legacy, clamp(r.From)))
	}
	if !r.Until.IsZero() {
		op := " < "
		if r.Until.After(maxT) {
			op = " <= " // the last instant the column holds is inside the range
		}
		conds = append(conds, "created_at"+op+timeLiteral(legacy, clamp(r.Until)))
	}
	if !r.EventFrom.IsZero() {
		conds = append(conds, "event_date_time >= "+timeLiteral(legacy, clamp(r.EventFrom).Truncate(time.Second)))
	}
	if !r.EventUntil.IsZero() {
		// Whole seconds around the bound: the legacy column holds seconds.
		upper := clamp(r.EventUntil)
		if t := upper.Truncate(time.Second); t.Before(upper) {
			upper = clamp(t.Add(time.Second))
		}
		conds = append(conds, "event_date_time <= "+timeLiteral(legacy, upper))
	}
	if len(conds) == 0 {
		return "1"
	}
	return strings.Join(conds, " AND ")
}

// withReadStats makes the server's progress reports add up, for ReadStats.
func withReadStats(ctx context.Context) (context.Context, func() ReadStats) {
	var rows, bytes atomic.Uint64
	ctx = clickhouse.Context(ctx, clickhouse.WithProgress(func(p *clickhouse.Progress) {
		rows.Add(p.Rows)
		bytes.Add(p.Bytes)
	}))
	return ctx, func() ReadStats { return ReadStats{Queries: 1, Rows: rows.Load(), Bytes: bytes.Load()} }
}

// ServerVersion returns the server's version string.
func (c *Client) ServerVersion(ctx context.Context) (string, error) {
	_, v, err := DetectVersion(ctx, c.conn)
	if err != nil {
		c.noteFailure(err)
		return "", fmt.Errorf("read the clickhouse version: %w", err)
	}
	return v, nil
}
