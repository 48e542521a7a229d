// Package sweep is the polling fallback: it delivers outbox rows the replication
// stream did not (rows marked failed, and rows older than the slot that a backfill
// marked), with SELECT ... FOR UPDATE SKIP LOCKED so that several sweepers never take
// the same row.
package sweep

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/zap"

	"github.com/outbox-streamer/outbox-streamer/internal/fault"
	"github.com/outbox-streamer/outbox-streamer/internal/outboxstore"
	"github.com/outbox-streamer/outbox-streamer/internal/record"
)

// Sink is where the sweep delivers (implemented by *sink.Writer).
type Sink interface {
	Ready(ctx context.Context) error
	Validate(ev *record.Event) error
	Insert(ctx context.Context, events []record.Event) error
	ExistingIDs(ctx context.Context, events []record.Event) (map[int64]struct{}, error)
}

// Config tunes a sweep.
type Config struct {
	// BatchSize is the rows locked and delivered per round (EVENT_BATCH_SIZE).
	BatchSize int
	// TimeZone is the zone of the outbox's TIMESTAMP values (default UTC).
	TimeZone *time.Location
	// ProgressEvery is how often a long sweep logs its progress (default 10 s).
	ProgressEvery time.Duration
	// Slot is the replication slot the stream reads. When set, each sweep
	// also rescues stranded pending rows (see rescueStranded); empty
	// disables that.
	Slot string
}

// Result summarises a sweep.
type Result struct {
	Delivered      int64 // inserted into ClickHouse and marked processed
	AlreadyPresent int64 // found in ClickHouse (an earlier attempt got there) and marked processed
	Failed         int64 // still failed, to be retried later
	Dead           int64 // became dead letters in this sweep
	Rescued        int64 // pending rows the stream had passed, handed to this sweep
	Rounds         int
	Took           time.Duration
}

// Add returns the sum of two results.
func (r Result) Add(o Result) Result {
	return Result{Delivered: r.Delivered + o.Delivered, AlreadyPresent: r.AlreadyPresent + o.AlreadyPresent,
		Failed: r.Failed + o.Failed, Dead: r.Dead + o.Dead, Rescued: r.Rescued + o.Rescued,
		Rounds: r.Rounds + o.Rounds, Took: r.Took + o.Took}
}

// Sweeper delivers due failed rows.
type Sweeper struct {
	cfg   Config
	pool  *pgxpool.Pool
	sink  Sink
	store *outboxstore.Store
	log   *zap.Logger
	mark  *streamMark // taken by the last sweep, for the next one's rescue
}

// New returns a sweeper.
func New(cfg Config, pool *pgxpool.Pool, s Sink, store *outboxstore.Store, log *zap.Logger) *Sweeper {
	if cfg.BatchSize <= 0 {
		cfg.BatchSize = 1000
	}
	if cfg.TimeZone == nil {
		cfg.TimeZone = time.UTC
	}
	if cfg.ProgressEvery <= 0 {
		cfg.ProgressEvery = 10 * time.Second
	}
	return &Sweeper{cfg: cfg, pool: pool, sink: s, store: store, log: log.Named("sweep")}
}

// ErrUnavailable is returned when ClickHouse is unavailable: the sweep stops, the rows
// it held stay failed and untouched, and the next sweep tries again.
var ErrUnavailable = errors.New("clickhouse unavailable")

// Run sweeps until no due failed row is left (or ctx ends).
func (s *Sweeper) Run(ctx context.Context) (Result, error) {
	var res Result
	start := time.Now()
	if err := s.rescueStranded(ctx, &res); err != nil {
		// Only the safety net is late; due failed rows still go.
		s.log.Warn("rescue of stranded pending rows failed; next sweep tries again", zap.Error(err))
	}
	if err := s.sink.Ready(ctx); err != nil {
		res.Took = time.Since(start)
		return res, s.unavailable(err)
	}
	lastLog := start
	for ctx.Err() == nil {
		n, err := s.round(ctx, &res)
		if err != nil {
			res.Took = time.Since(start)
			return res, err
		}
		if n == 0 {
			break
		}
		res.Rounds++
		if time.Since(lastLog) >= s.cfg.ProgressEvery {
			done := res.Delivered + res.AlreadyPresent
			s.log.Info("sweep progress", zap.Int64("delivered", done), zap.Int64("failed", res.Failed),
				zap.Int64("dead", res.Dead), zap.Float64("rows_per_second", float64(done)/time.Since(start).Seconds()))
			lastLog = time.Now()
		}
	}
	res.Took = time.Since(start)
	if res.Rounds > 0 {
		s.log.Info("sweep finished", zap.Int64("delivered", res.Delivered), zap.Int64("already_present", res.AlreadyPresent),
			zap.Int64("failed", res.Failed), zap.Int64("dead", res.Dead), zap.Duration("took", res.Took))
	}
	return res, ctx.Err()
}

// round locks one batch of due rows, delivers them and commits their new status. A
// crash after the ClickHouse insert but before the commit leaves the rows failed; the
// next round finds them in ClickHouse and only marks them processed.
func (s *Sweeper) round(ctx context.Context, res *Result) (int, error) {
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		return 0, fmt.Errorf("sweep: begin: %w", err)
	}
	defer tx.Rollback(context.Background()) //nolint:errcheck // after Commit this is a no-op

	// A failed row without next_attempt_at (inserted so by hand or by an
	// older tool) is due now, not never.
	rows, err := tx.Query(ctx, `SELECT id, event_type, event_date_time, environment, event_context::text,
			metadata_version, created_at, attempts
		FROM event_outbox
		WHERE status = 'failed' AND (next_attempt_at IS NULL OR next_attempt_at <= now())
		ORDER BY next_attempt_at NULLS FIRST, id
		LIMIT $1
		FOR UPDATE SKIP LOCKED`, s.cfg.BatchSize)
	if err != nil {
		return 0, fmt.Errorf("sweep: select due rows: %w", err)
	}
	var events []record.Event
	attempts := map[int64]int{}
	for rows.Next() {
		ev, n, err := s.scanRow(rows)
		if err != nil {
			rows.Close()
			return 0, err
		}
		attempts[ev.ID] = n
		events = append(events, ev)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return 0, fmt.Errorf("sweep: read rows: %w", err)
	}
	if len(events) == 0 {
		return 0, nil
	}

	var valid []record.Event
	var failures []outboxstore.Failure
	for i := range events {
		if err := s.sink.Validate(&events[i]); err != nil {
			failures = append(failures, outboxstore.Failure{ID: events[i].ID, Reason: "invalid event: " + err.Error()})
			continue
		}
		valid = append(valid, events[i])
	}
	present, err := s.sink.ExistingIDs(ctx, valid)
	if err != nil {
		return 0, s.unavailable(err)
	}
	var toInsert []record.Event
	var done []int64
	for i := range valid {
		done = append(done, valid[i].ID)
		if _, ok := present[valid[i].ID]; !ok {
			toInsert = append(toInsert, valid[i])
		}
	}
	inserted := len(toInsert)
	if err := s.sink.Insert(ctx, toInsert); err != nil {
		if !fault.Splittable(err) {
			return 0, s.unavailable(err)
		}
		// Isolate the rows the server rejects one by one: the sweep is not the hot
		// path, and its batches hold only the rows that failed before. A refusal
		// caused by the insert's own size or spread (too many parts, memory)
		// passes for small inserts; a row refused so even alone counts an
		// attempt like any bad row, so it ends as a dead letter, never a loop.
		inserted, done = 0, done[:0]
		for i := range valid {
			if _, ok := present[valid[i].ID]; ok {
				done = append(done, valid[i].ID)
				continue
			}
			if err := s.sink.Insert(ctx, valid[i:i+1]); err != nil {
				if !fault.Splittable(err) {
					return 0, s.unavailable(err)
				}
				failures = append(failures, outboxstore.Failure{ID: valid[i].ID, Reason: "clickhouse rejected the event: " + err.Error()})
				continue
			}
			inserted++
			done = append(done, valid[i].ID)
		}
	}
	store := s.store.WithTx(tx)
	// The rows are locked by this transaction: none can vanish.
	if _, err := store.MarkProcessed(ctx, outboxstore.RefsOf(done)); err != nil {
		return 0, err
	}
	if _, err := store.MarkFailed(ctx, failures); err != nil {
		return 0, err
	}
	if err := tx.Commit(ctx); err != nil {
		return 0, fmt.Errorf("sweep: commit: %w", err)
	}
	res.Delivered += int64(inserted)
	res.AlreadyPresent += int64(len(done) - inserted)
	max := s.store.Retry().MaxAttempts
	for _, f := range failures {
		if attempts[f.ID]+1 >= max {
			res.Dead++
		} else {
			res.Failed++
		}
		s.log.Warn("event not delivered", zap.Int64("event_id", f.ID), zap.String("reason", f.Reason))
	}
	return len(events), nil
}

// scanRow reads one due row. Values Go cannot represent (a timestamp of
// 'infinity', a NULL where the table had none) do not fail the sweep: the
// event carries the problem, so the row becomes failed or dead with it and
// the rows behind it go on.
func (s *Sweeper) scanRow(rows pgx.Rows) (record.Event, int, error) {
	var (
		ev             record.Event
		typ, env, ectx pgtype.Text
		at, created    pgtype.Timestamp
		version, n     pgtype.Int8
	)
	if err := rows.Scan(&ev.ID, &typ, &at, &env, &ectx, &version, &created, &n); err != nil {
		return ev, 0, fmt.Errorf("sweep: read row: %w", err)
	}
	ev.Type, ev.Environment, ev.Context, ev.MetadataVersion = typ.String, env.String, ectx.String, version.Int64
	var problems []string
	for _, c := range []struct {
		name string
		v    pgtype.Timestamp
		dst  *time.Time
	}{{"event_date_time", at, &ev.Time}, {"created_at", created, &ev.CreatedAt}} {
		switch {
		case !c.v.Valid:
			problems = append(problems, c.name+" is NULL")
		case c.v.InfinityModifier == pgtype.Infinity:
			problems = append(problems, c.name+" is infinity, which ClickHouse cannot hold")
		case c.v.InfinityModifier == pgtype.NegativeInfinity:
			problems = append(problems, c.name+" is -infinity, which ClickHouse cannot hold")
		default:
			*c.dst = inZone(c.v.Time, s.cfg.TimeZone)
		}
	}
	if !typ.Valid {
		problems = append(problems, "event_type is NULL")
	}
	if !ectx.Valid {
		ev.Context = "{}"
	}
	ev.Problem = strings.Join(problems, "; ")
	return ev, int(n.Int64), nil
}

func (s *Sweeper) unavailable(err error) error {
	if fault.Retryable(err) {
		return fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	return fmt.Errorf("sweep: %w", err)
}

// inZone reinterprets a TIMESTAMP (read as UTC wall clock) in loc.
func inZone(t time.Time, loc *time.Location) time.Time {
	if loc == time.UTC {
		return t
	}
	return time.Date(t.Year(), t.Month(), t.Day(), t.Hour(), t.Minute(), t.Second(), t.Nanosecond(), loc).UTC()
}

// Backfill marks the pending rows visible in snapshot — exactly the rows committed
// before the replication slot was created, which the slot will never carry — as
// failed and due now, so the sweep delivers them. Rows of an earlier slot that may
// already be in ClickHouse are safe: the sweep checks ClickHouse before inserting.
func Backfill(ctx context.Context, pool *pgxpool.Pool, snapshot string, store *outboxstore.Store, log *zap.Logger) (int64, error) {
	tx, err := pool.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly})
	if err != nil {
		return 0, fmt.Errorf("backfill: begin: %w", err)
	}
	defer tx.Rollback(context.Background()) //nolint:errcheck // read-only
	if _, err := tx.Exec(ctx, "SET TRANSACTION SNAPSHOT "+quoteLiteral(snapshot)); err != nil {
		return 0, fmt.Errorf("backfill: import the slot's snapshot %q: %w", snapshot, err)
	}
	var total int64
	last := int64(-1 << 63)
	for {
		rows, err := tx.Query(ctx, `SELECT id FROM event_outbox WHERE status = 'pending' AND id > $1 ORDER BY id LIMIT 10000`, last)
		if err != nil {
			return total, fmt.Errorf("backfill: read pending rows: %w", err)
		}
		ids, err := pgx.CollectRows(rows, pgx.RowTo[int64])
		if err != nil {
			return total, fmt.Errorf("backfill: read pending rows: %w", err)
		}
		if len(ids) == 0 {
			return total, nil
		}
		if err := store.MarkBackfill(ctx, ids); err != nil {
			return total, err
		}
		total += int64(len(ids))
		last = ids[len(ids)-1]
		log.Info("backfill progress", zap.Int64("rows", total))
	}
}

func quoteLiteral(s string) string {
	out := []byte{'\''}
	for i := 0; i < len(s); i++ {
		if s[i] == '\'' {
			out = append(out, '\'')
		}
		out = append(out, s[i])
	}
	return string(append(out, '\''))
}
