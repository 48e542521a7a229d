package standby

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/zap"

	"github.com/outbox-streamer/outbox-streamer/internal/metrics"
)

// WatchConfig tunes Watch.
type WatchConfig struct {
	// Slot is the logical slot the streamer reads. Required.
	Slot string
	// Failover is REPLICATION_SLOT_FAILOVER (auto, the default, on or off): whether the
	// slot should be a failover slot, for the slot_failover_wanted gauge.
	Failover string
	// Interval is the time between two looks (default 1 s).
	Interval time.Duration
	// LogAfter is how long the walsender must be held back before it is
	// logged (default 5 s): a walsender that waits a moment for a healthy
	// standby is normal.
	LogAfter time.Duration
}

// watchQuery reads synchronized_standby_slots (NULL before PostgreSQL 17)
// and whether the walsender of the slot waits for a standby to confirm.
const watchQuery = `SELECT current_setting('synchronized_standby_slots', true),
	COALESCE((SELECT a.wait_event = 'WaitForStandbyConfirmation'
		FROM pg_replication_slots s JOIN pg_stat_activity a ON a.pid = s.active_pid
		WHERE s.slot_name = $1), false)`

// namedSlotsQuery reads the state of the physical slots
// synchronized_standby_slots names; a missing one has no row of its own.
const namedSlotsQuery = `SELECT n, s.slot_name IS NOT NULL, COALESCE(s.active, false), COALESCE(s.restart_lsn::text, '')
	FROM unnest($1::text[]) AS n LEFT JOIN pg_replication_slots s ON s.slot_name = n AND s.slot_type = 'physical'`

// DB runs queries; *pgxpool.Pool implements it.
type DB interface {
	Querier
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
}

// namedSlot is a physical slot synchronized_standby_slots names.
type namedSlot struct {
	name           string
	exists, active bool
	restart        string
}

// watcher is Watch's state between looks.
type watcher struct {
	cfg     WatchConfig
	db      DB
	log     *zap.Logger
	m       *metrics.Metrics
	ep      episode
	prev    string // the named slots' restart positions at the last look
	started bool
}

// Watch looks every Interval, until ctx ends, whether PostgreSQL 17+ holds
// the slot's walsender back for a standby named in the primary's
// synchronized_standby_slots (by design: nothing is decoded past what that
// standby flushed). It logs a warning naming the standbys once per episode
// and when it ends, and sets the standby_confirmation_waiting gauge. At its
// first look it also warns when a named standby is missing or inactive.
// Before PostgreSQL 17 it returns at once.
func Watch(ctx context.Context, cfg WatchConfig, db DB, log *zap.Logger, m *metrics.Metrics) {
	if cfg.Interval <= 0 {
		cfg.Interval = time.Second
	}
	if cfg.LogAfter <= 0 {
		cfg.LogAfter = 5 * time.Second
	}
	w := &watcher{cfg: cfg, db: db, log: log.Named("standby_watch").With(zap.String("slot", cfg.Slot)), m: m}
	w.ep.logAfter = cfg.LogAfter
	t := time.NewTicker(cfg.Interval)
	defer t.Stop()
	for {
		more, err := w.look(ctx)
		if err != nil && ctx.Err() == nil {
			m.AddError(metrics.StageStandby)
			w.log.Debug("look at synchronized_standby_slots failed", zap.Error(err))
		}
		if !more {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// look looks once and reports whether to look again (not before 17).
func (w *watcher) look(ctx context.Context) (bool, error) {
	var setting *string
	var waits bool
	if err := w.db.QueryRow(ctx, watchQuery, w.cfg.Slot).Scan(&setting, &waits); err != nil {
		return true, fmt.Errorf("read synchronized_standby_slots: %w", err)
	}
	if setting == nil {
		return false, nil // before PostgreSQL 17
	}
	names := ParseStandbySlots(*setting)
	w.m.SetFailoverWanted(w.cfg.Slot, w.cfg.Failover == "on" || (w.cfg.Failover != "off" && len(names) > 0))
	if len(names) == 0 {
		w.ep.done(time.Now())
		return true, nil
	}
	slots, err := w.namedSlots(ctx, names)
	if err != nil {
		return true, fmt.Errorf("read the slots of synchronized_standby_slots: %w", err)
	}
	pos, lagging := describe(slots)
	if !w.started {
		w.started = true
		if len(lagging) > 0 {
			w.log.Warn("synchronized_standby_slots names standbys that are missing or not streaming: PostgreSQL holds this slot's changes back until they are back or removed from the setting",
				zap.Strings("standby_slots", lagging))
		}
	}
	// Held back: waiting, and no named standby moved since the last look
	// (a healthy one moves: the walsender waited only a moment).
	stalled := waits && (len(lagging) > 0 || pos == w.prev)
	w.prev = pos
	w.m.SetStandbyConfirmationWait(w.cfg.Slot, stalled)
	now := time.Now()
	if !stalled {
		if logged, took, _ := w.ep.done(now); logged {
			w.log.Info("the walsender no longer waits for synchronized_standby_slots: delivery goes on", zap.Duration("held", took))
		}
		return true, nil
	}
	if w.ep.waiting(now, false) {
		w.log.Warn("PostgreSQL holds this slot's changes back until the standbys of synchronized_standby_slots confirm them (wait event WaitForStandbyConfirmation): delivery stalls until they catch up or are removed from the setting",
			zap.Strings("standby_slots", names), zap.Strings("missing_or_inactive", lagging), zap.Duration("waiting", w.ep.took(now)))
	}
	return true, nil
}

func (w *watcher) namedSlots(ctx context.Context, names []string) ([]namedSlot, error) {
	rows, err := w.db.Query(ctx, namedSlotsQuery, names)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []namedSlot
	for rows.Next() {
		var s namedSlot
		if err := rows.Scan(&s.name, &s.exists, &s.active, &s.restart); err != nil {
			return nil, err
		}
		out = append(out, s)
	}
	return out, rows.Err()
}

// describe returns the named slots' positions as one comparable string and
// the names of those missing or not streaming.
func describe(slots []namedSlot) (pos string, lagging []string) {
	var b strings.Builder
	for _, s := range slots {
		b.WriteString(s.restart)
		b.WriteByte(',')
		if !s.exists || !s.active {
			lagging = append(lagging, s.name)
		}
	}
	return b.String(), lagging
}

// ParseStandbySlots splits synchronized_standby_slots into slot names: a
// comma-separated list, each name possibly double-quoted.
func ParseStandbySlots(setting string) []string {
	var names []string
	for _, part := range strings.Split(setting, ",") {
		n := strings.TrimSpace(part)
		if len(n) >= 2 && n[0] == '"' && n[len(n)-1] == '"' {
			n = strings.ReplaceAll(n[1:len(n)-1], `""`, `"`)
		}
		if n != "" {
			names = append(names, n)
		}
	}
	return names
}
