package metrics

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/zap"

	"github.com/outbox-streamer/outbox-streamer/internal/outboxstore"
	"github.com/outbox-streamer/outbox-streamer/replication"
)

// Querier runs queries; *pgxpool.Pool, *pgx.Conn and pgx.Tx implement it.
type Querier interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// PollerConfig tunes the SlotPoller.
type PollerConfig struct {
	// Slot is the replication slot to watch (REPLICATION_SLOT_NAME). Required.
	Slot string
	// Schema and Table name the outbox table (default public.event_outbox).
	Schema, Table string
	// TimeZone is the zone of the outbox's TIMESTAMP values (EVENT_TIME_ZONE;
	// nil: UTC), for the oldest undelivered row's age.
	TimeZone *time.Location
	// Interval is the time between polls (default 10 s).
	Interval time.Duration
	// Timeout bounds one poll's queries (default 5 s), so a stuck server cannot pile
	// polls up.
	Timeout time.Duration
}

// Validate checks the configuration and fills defaults.
func (c *PollerConfig) Validate() error {
	if c.Slot == "" {
		return errors.New("slot poller: slot name is empty")
	}
	if c.Schema == "" {
		c.Schema = "public"
	}
	if c.Table == "" {
		c.Table = "event_outbox"
	}
	if c.Interval <= 0 {
		c.Interval = 10 * time.Second
	}
	if c.Timeout <= 0 {
		c.Timeout = 5 * time.Second
	}
	return nil
}

// SlotPoller periodically reads the replication slot's lag, retained WAL and WAL
// status, the server's WAL position and max_slot_wal_keep_size, and the outbox's
// counts by status from PostgreSQL and sets the gauges. It only reads
// catalog views and the outbox's partial index, so every replica (leader and standby)
// can run one: the standby then still reports a slot nobody streams from.
type SlotPoller struct {
	cfg    PollerConfig
	db     Querier
	m      *Metrics
	log    *zap.Logger
	failed bool
	now    chan struct{} // PollNow's request
}

// NewSlotPoller returns a poller reading through db into m.
func NewSlotPoller(cfg PollerConfig, db Querier, m *Metrics, log *zap.Logger) (*SlotPoller, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if db == nil {
		return nil, errors.New("slot poller: no database")
	}
	if log == nil {
		log = zap.NewNop()
	}
	return &SlotPoller{cfg: cfg, db: db, m: m, log: log.Named("slot_poller").With(zap.String("slot", cfg.Slot)),
		now: make(chan struct{}, 1)}, nil
}

// Run polls at once and then every Interval until ctx ends, and returns nil. Failed
// polls are counted (errors_total{stage="slot_poller"}) and logged, never fatal:
// monitoring must not stop the pipeline.
func (p *SlotPoller) Run(ctx context.Context) error {
	t := time.NewTicker(p.cfg.Interval)
	defer t.Stop()
	for {
		p.pollAndLog(ctx)
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		case <-p.now:
		}
	}
}

// PollNow asks Run to poll at once (when streaming starts: the slot's state
// changed, and the gauges should not wait for the next interval).
func (p *SlotPoller) PollNow() {
	select {
	case p.now <- struct{}{}:
	default: // a poll is requested already
	}
}

func (p *SlotPoller) pollAndLog(ctx context.Context) {
	err := p.Poll(ctx)
	switch {
	case err != nil && ctx.Err() != nil:
		// Shutting down: the cancelled query is not a problem to report.
	case err != nil && !p.failed:
		// Log the first failure of a series at warning level and the rest at debug,
		// so a database that is down for an hour does not flood the logs (the
		// counter still counts every one).
		p.failed = true
		p.log.Warn("reading slot and outbox state failed; will keep trying", zap.Duration("interval", p.cfg.Interval), zap.Error(err))
	case err != nil:
		p.log.Debug("reading slot and outbox state failed again", zap.Error(err))
	case p.failed:
		p.failed = false
		p.log.Info("reading slot and outbox state works again")
	}
}

// Poll reads the state once and sets the gauges. It returns the errors of the parts
// that failed; the parts that worked are still recorded.
func (p *SlotPoller) Poll(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, p.cfg.Timeout)
	defer cancel()
	var errs []error
	if s, err := p.readSlot(ctx); err != nil {
		p.m.AddError(StagePoller)
		errs = append(errs, err)
	} else {
		p.m.SetSlot(s)
	}
	if keep, err := p.readWALKeepSize(ctx); err != nil {
		p.m.AddError(StagePoller)
		errs = append(errs, err)
	} else {
		p.m.SetWALKeepSize(keep)
	}
	if o, err := p.readOutbox(ctx); err != nil {
		p.m.AddError(StagePoller)
		errs = append(errs, err)
	} else {
		p.m.SetOutbox(o)
	}
	return errors.Join(errs...)
}

func (p *SlotPoller) readSlot(ctx context.Context) (SlotStats, error) {
	slot, err := replication.ReadSlot(ctx, p.db, p.cfg.Slot)
	if err != nil {
		return SlotStats{}, err
	}
	pos := float64(slot.CurrentWAL)
	if !slot.Exists || slot.Foreign {
		return SlotStats{Slot: p.cfg.Slot, WALPosition: &pos}, nil
	}
	return SlotStats{Slot: p.cfg.Slot, Exists: true, Active: slot.Active,
		LagBytes: asFloat(slot.LagBytes), RetainedBytes: asFloat(slot.RetainedBytes), SafeWALSize: asFloat(slot.SafeWALSize),
		WALStatus: slot.WALStatus, WALPosition: &pos, Failover: boolAsFloat(slot.Failover), Conflicting: boolAsFloat(slot.Conflicting)}, nil
}

// boolAsFloat is 1 or 0, nil for nil.
func boolAsFloat(b *bool) *float64 {
	if b == nil {
		return nil
	}
	f := boolFloat(*b)
	return &f
}

// walKeepSizeQuery reads max_slot_wal_keep_size in bytes. current_setting gives
// the value as SHOW prints it, with its unit ("4GB", "1500MB", "-1"), which
// pg_size_bytes converts, -1 (unlimited) included; the setting's base unit (MB in
// pg_settings) never enters. missing_ok makes it NULL before PostgreSQL 13.
const walKeepSizeQuery = `SELECT pg_size_bytes(current_setting('max_slot_wal_keep_size', true))`

// readWALKeepSize returns max_slot_wal_keep_size in bytes (-1: unlimited), nil
// when the server has no such setting.
func (p *SlotPoller) readWALKeepSize(ctx context.Context) (*float64, error) {
	var n *int64
	if err := p.db.QueryRow(ctx, walKeepSizeQuery).Scan(&n); err != nil {
		return nil, fmt.Errorf("read max_slot_wal_keep_size: %w", err)
	}
	return asFloat(n), nil
}

func asFloat(n *int64) *float64 {
	if n == nil {
		return nil
	}
	f := float64(*n)
	return &f
}

func (p *SlotPoller) readOutbox(ctx context.Context) (OutboxStats, error) {
	b, err := outboxstore.ReadBacklog(ctx, p.db, outboxstore.Name{Schema: p.cfg.Schema, Table: p.cfg.Table}, p.cfg.TimeZone)
	if err != nil {
		return OutboxStats{}, err
	}
	return OutboxStats{Rows: b.Rows, OldestUndeliveredAge: b.OldestUndelivered}, nil
}
