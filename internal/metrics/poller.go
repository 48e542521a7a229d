package metrics

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/zap"
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

// SlotPoller periodically reads the replication slot's lag and retained WAL and the
// outbox's counts by status from PostgreSQL and sets the gauges. It only reads
// catalog views and the outbox's partial index, so every replica (leader and standby)
// can run one: the standby then still reports a slot nobody streams from.
type SlotPoller struct {
	cfg    PollerConfig
	db     Querier
	m      *Metrics
	log    *zap.Logger
	failed bool
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
	return &SlotPoller{cfg: cfg, db: db, m: m, log: log.Named("slot_poller").With(zap.String("slot", cfg.Slot))}, nil
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
		}
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
	if o, err := p.readOutbox(ctx); err != nil {
		p.m.AddError(StagePoller)
		errs = append(errs, err)
	} else {
		p.m.SetOutbox(o)
	}
	return errors.Join(errs...)
}

// slotQuery reads the slot's position relative to the server's WAL end. The
// differences are float8 because pg_wal_lsn_diff returns numeric.
const slotQuery = `SELECT active,
	pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::float8,
	pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::float8,
	safe_wal_size::float8
FROM pg_replication_slots WHERE slot_name = $1 AND database = current_database()`

func (p *SlotPoller) readSlot(ctx context.Context) (SlotStats, error) {
	s := SlotStats{Slot: p.cfg.Slot, Exists: true}
	err := p.db.QueryRow(ctx, slotQuery, p.cfg.Slot).Scan(&s.Active, &s.LagBytes, &s.RetainedBytes, &s.SafeWALSize)
	if errors.Is(err, pgx.ErrNoRows) {
		return SlotStats{Slot: p.cfg.Slot}, nil
	}
	if err != nil {
		return SlotStats{}, fmt.Errorf("read replication slot %q: %w", p.cfg.Slot, err)
	}
	return s, nil
}

// outboxQuery counts the undelivered rows by status and finds the oldest pending or
// failed one. Its WHERE clause is the predicate of the partial index
// event_outbox_undelivered_idx, so the planner reads only undelivered rows however
// many millions of processed rows the table holds: the cost follows the backlog, not
// the table. created_at holds UTC (see the migration), hence the conversion of now().
const outboxQuery = `SELECT status, count(*)::float8,
	EXTRACT(EPOCH FROM (now() AT TIME ZONE 'UTC') - min(created_at) FILTER (WHERE status IN ('pending', 'failed')))::float8
FROM %s WHERE status <> 'processed' GROUP BY status`

// reltuplesQuery reads the planner's row estimate of the table, kept up to date by
// autovacuum and ANALYZE. It is -1 for a table never vacuumed or analyzed.
const reltuplesQuery = `SELECT reltuples::float8 FROM pg_class WHERE oid = $1::regclass`

func (p *SlotPoller) readOutbox(ctx context.Context) (OutboxStats, error) {
	table := pgx.Identifier{p.cfg.Schema, p.cfg.Table}.Sanitize()
	rows, err := p.db.Query(ctx, fmt.Sprintf(outboxQuery, table))
	if err != nil {
		return OutboxStats{}, fmt.Errorf("count undelivered rows of %s: %w", table, err)
	}
	o := OutboxStats{Rows: map[string]float64{}}
	var undelivered float64
	var oldest float64
	for rows.Next() {
		var status string
		var n float64
		var age *float64
		if err := rows.Scan(&status, &n, &age); err != nil {
			rows.Close()
			return OutboxStats{}, fmt.Errorf("count undelivered rows of %s: %w", table, err)
		}
		o.Rows[status] = n
		undelivered += n
		if age != nil && *age > oldest {
			oldest = *age
		}
	}
	if err := rows.Err(); err != nil {
		return OutboxStats{}, fmt.Errorf("count undelivered rows of %s: %w", table, err)
	}
	o.OldestUndeliveredAge = time.Duration(oldest * float64(time.Second))

	// An exact count of processed rows would scan the whole table on every poll;
	// the estimate minus the exact undelivered count is free and good enough for a
	// dashboard (it lags until autovacuum/ANALYZE refresh reltuples).
	var reltuples float64
	if err := p.db.QueryRow(ctx, reltuplesQuery, table).Scan(&reltuples); err != nil {
		return OutboxStats{}, fmt.Errorf("read row estimate of %s: %w", table, err)
	}
	if reltuples >= 0 {
		o.Rows["processed"] = max(0, reltuples-undelivered)
	}
	return o, nil
}
