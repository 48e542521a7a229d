// Package standby keeps delivery from running ahead of a physical standby.
// Hold (STANDBY_HOLD) waits, before rows become visible in ClickHouse, until
// a named standby has flushed their commit: the guarantee PostgreSQL 17's
// synchronized_standby_slots gives logical decoding, for every version.
// Watch reports when PostgreSQL 17+ itself holds the slot's walsender back
// for a standby named in synchronized_standby_slots.
package standby

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"go.uber.org/zap"

	"github.com/outbox-streamer/outbox-streamer/internal/metrics"
)

// Querier runs a query of one row; *pgxpool.Pool implements it.
type Querier interface {
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// Config tunes a Hold.
type Config struct {
	// Name is STANDBY_HOLD: the standby's physical replication slot on the
	// primary (its primary_slot_name), or else its application_name in
	// pg_stat_replication. Required.
	Name string
	// Interval is the least time between two reads of the standby's
	// position (default 20 ms): one read serves every batch it covers.
	Interval time.Duration
	// LogAfter is how long a wait lasts before it is logged (default 5 s).
	LogAfter time.Duration
}

func (c *Config) fill() {
	if c.Interval <= 0 {
		c.Interval = 20 * time.Millisecond
	}
	if c.LogAfter <= 0 {
		c.LogAfter = 5 * time.Second
	}
}

// kind is how the standby is found.
type kind uint8

const (
	bySlot            kind = iota + 1 // a physical slot: its restart_lsn is what the standby flushed
	byApplicationName                 // pg_stat_replication.flush_lsn
)

func (k kind) String() string {
	if k == bySlot {
		return "physical slot"
	}
	return "application_name"
}

// positionQuery reads, in one statement, the primary's WAL insert position
// (past the end of every commit so far) and both places a standby's flushed
// position can be read. A physical slot's restart_lsn is the flush position
// its standby last reported; it is NULL until one connected. flush_lsn is
// NULL for a role without pg_read_all_stats (or pg_monitor).
const positionQuery = `SELECT pg_current_wal_insert_lsn()::text,
	EXISTS (SELECT FROM pg_replication_slots WHERE slot_name = $1 AND slot_type = 'physical'),
	(SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = $1 AND slot_type = 'physical'),
	EXISTS (SELECT FROM pg_stat_replication WHERE application_name = $1),
	(SELECT max(flush_lsn)::text FROM pg_stat_replication WHERE application_name = $1)`

// reading is one read of positionQuery.
type reading struct {
	current           uint64 // the primary's WAL insert position
	slot, app         bool   // the slot exists; a standby of that name is connected
	slotFlush, appLSN uint64 // their positions (0: NULL)
	appLSNNull        bool
	at                time.Time
}

// flushed is what the standby of kind k has flushed, and whether it exists.
func (r reading) flushed(k kind) (uint64, bool) {
	if k == bySlot {
		return r.slotFlush, r.slot
	}
	return r.appLSN, r.app
}

// Hold waits until a named standby has flushed a WAL position. It is safe
// for concurrent use: waiters take turns, and a read fresh enough serves
// them all.
type Hold struct {
	cfg  Config
	db   Querier
	kind kind
	log  *zap.Logger
	m    *metrics.Metrics

	mu   sync.Mutex
	last reading
	ep   episode
}

// Open finds the standby cfg.Name names, by its physical slot first and
// else by its application_name, and fails with a clear error when the
// primary has neither (or hides the standby's position from this role).
func Open(ctx context.Context, cfg Config, db Querier, log *zap.Logger, m *metrics.Metrics) (*Hold, error) {
	if cfg.Name == "" {
		return nil, errors.New("standby hold: no standby named")
	}
	cfg.fill()
	h := &Hold{cfg: cfg, db: db, log: log.Named("standby_hold").With(zap.String("standby", cfg.Name)), m: m}
	h.ep.logAfter = cfg.LogAfter
	r, err := h.read(ctx)
	if err != nil {
		return nil, err
	}
	switch {
	case r.slot:
		h.kind = bySlot
	case r.app && r.appLSNNull:
		return nil, fmt.Errorf("STANDBY_HOLD=%q: pg_stat_replication hides the standby's flush_lsn from this role: grant it pg_monitor (or pg_read_all_stats), or name the standby's physical slot instead", cfg.Name)
	case r.app:
		h.kind = byApplicationName
	default:
		return nil, fmt.Errorf("STANDBY_HOLD=%q: the primary has no physical replication slot of that name and no connected standby with that application_name (pg_stat_replication): name the standby's primary_slot_name, or the application_name of its primary_conninfo", cfg.Name)
	}
	h.last = r
	flushed, _ := r.flushed(h.kind)
	h.log.Info("delivery waits until the standby has flushed each commit (STANDBY_HOLD)", zap.Stringer("found_by", h.kind),
		zap.String("standby_flushed", pglogrepl.LSN(flushed).String()))
	h.publish(r)
	return h, nil
}

func (h *Hold) read(ctx context.Context) (reading, error) {
	var cur string
	var slotLSN, appLSN *string
	var r reading
	if err := h.db.QueryRow(ctx, positionQuery, h.cfg.Name).Scan(&cur, &r.slot, &slotLSN, &r.app, &appLSN); err != nil {
		return reading{}, fmt.Errorf("read the position of standby %q: %w", h.cfg.Name, err)
	}
	var err error
	if r.current, err = parseLSN(&cur); err != nil {
		return reading{}, err
	}
	if r.slotFlush, err = parseLSN(slotLSN); err != nil {
		return reading{}, err
	}
	if r.appLSN, err = parseLSN(appLSN); err != nil {
		return reading{}, err
	}
	r.appLSNNull = appLSN == nil
	r.at = time.Now()
	return r, nil
}

func parseLSN(s *string) (uint64, error) {
	if s == nil {
		return 0, nil
	}
	lsn, err := pglogrepl.ParseLSN(*s)
	if err != nil {
		return 0, fmt.Errorf("parse LSN %q: %w", *s, err)
	}
	return uint64(lsn), nil
}

// Wait returns once the standby has flushed the WAL up to lsn, the end of
// the highest commit record about to be delivered. Zero means that end is
// not known: Wait then reads the primary's WAL insert position and waits for
// that, which is past every commit so far. It holds on while the standby is
// gone or its position cannot be read (that is logged), and returns only
// ctx's error.
func (h *Hold) Wait(ctx context.Context, lsn uint64) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	target, fresh := lsn, lsn == 0
	for {
		if !fresh {
			if flushed, ok := h.last.flushed(h.kind); ok && reached(flushed, target) {
				h.endEpisode()
				h.publish(h.last)
				return nil
			}
		}
		wait := h.cfg.Interval - time.Since(h.last.at)
		if fresh || wait <= 0 {
			wait = h.cfg.Interval
			r, err := h.read(ctx)
			if err != nil && ctx.Err() != nil {
				return ctx.Err()
			}
			if err == nil {
				if fresh {
					target, fresh = r.current, false
				}
				h.last = r
				flushed, ok := r.flushed(h.kind)
				if ok && reached(flushed, target) {
					continue
				}
				h.waiting(target, flushed, ok, nil)
				h.publish(r)
			} else {
				h.m.AddError(metrics.StageStandby)
				h.waiting(target, 0, true, err)
				h.publish(h.last)
			}
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		}
	}
}

// reached reports whether a standby that flushed up to flushed has the WAL
// up to target (an LSN is the position after the last byte it covers).
func reached(flushed, target uint64) bool { return flushed >= target }

// waiting logs an unfinished wait once it lasted LogAfter, once per episode.
func (h *Hold) waiting(target, flushed uint64, found bool, err error) {
	if !h.ep.waiting(time.Now(), !found) {
		return
	}
	fields := []zap.Field{zap.Stringer("found_by", h.kind), zap.String("needs", pglogrepl.LSN(target).String()),
		zap.Duration("waiting", h.ep.took(time.Now()))}
	switch {
	case err != nil:
		h.log.Warn("delivery held: the standby's position cannot be read; retrying", append(fields, zap.Error(err))...)
	case !found:
		h.log.Error("delivery held: the standby named by STANDBY_HOLD is gone (no such physical slot or connected standby); nothing reaches ClickHouse until it is back or STANDBY_HOLD is changed", fields...)
	default:
		h.log.Warn("delivery held: waiting for the standby to flush the commit", append(fields,
			zap.String("standby_flushed", pglogrepl.LSN(flushed).String()), zap.Uint64("behind_bytes", target-min(flushed, target)))...)
	}
}

func (h *Hold) endEpisode() {
	if logged, took, missing := h.ep.done(time.Now()); logged {
		msg := "the standby caught up: delivery goes on"
		if missing {
			msg = "the standby is back: delivery goes on"
		}
		h.log.Info(msg, zap.Duration("held", took))
	}
}

// publish sets the gauges from a reading. Waiting means held for LogAfter
// or longer: the moments every batch waits for a healthy standby would make
// the gauge flicker.
func (h *Hold) publish(r reading) {
	waiting := h.ep.took(time.Now()) >= h.cfg.LogAfter
	flushed, ok := r.flushed(h.kind)
	var behind *float64
	if ok && flushed != 0 {
		b := float64(r.current - min(flushed, r.current))
		behind = &b
	}
	h.m.SetStandbyHold(h.cfg.Name, waiting, behind)
}

// episode decides when a wait is logged: once it lasted logAfter, once per
// episode, and its end only if its start was logged. A standby that goes
// missing during a logged wait is logged again, as such.
type episode struct {
	logAfter      time.Duration
	since         time.Time // zero: no wait under way
	logged        bool
	loggedMissing bool
}

// waiting notes a wait not over at now (missing: the standby is gone) and
// reports whether to log it now.
func (e *episode) waiting(now time.Time, missing bool) bool {
	if e.since.IsZero() {
		e.since = now
	}
	if now.Sub(e.since) < e.logAfter {
		return false
	}
	switch {
	case !e.logged:
		e.logged, e.loggedMissing = true, missing
		return true
	case missing && !e.loggedMissing:
		e.loggedMissing = true
		return true
	}
	return false
}

// took is how long the episode has lasted at now.
func (e *episode) took(now time.Time) time.Duration {
	if e.since.IsZero() {
		return 0
	}
	return now.Sub(e.since)
}

// done ends the episode and reports whether its end is to be logged, how
// long it lasted, and whether the standby had been missing.
func (e *episode) done(now time.Time) (logged bool, took time.Duration, missing bool) {
	logged, took, missing = e.logged, e.took(now), e.loggedMissing
	*e = episode{logAfter: e.logAfter}
	return logged, took, missing
}
