package outboxstore

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"time"

	"github.com/jackc/pgerrcode"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/zap"

	"github.com/outbox-streamer/outbox-streamer/internal/fault"
)

// Partition is one range partition of a partitioned outbox.
type Partition struct {
	// Schema and Name are the partition's (the outbox's schema and, for the
	// ones the leader makes, the outbox's name followed by _pDATE).
	Schema   string
	Name     string
	From, To time.Time // created_at bounds, wall clock of the outbox's zone (as UTC values)
	Default  bool
}

// ident is the partition's quoted qualified name.
func (p Partition) ident() string { return pgx.Identifier{p.Schema, p.Name}.Sanitize() }

// Partitioned reports whether table is a partitioned table.
func Partitioned(ctx context.Context, db Reader, table Name) (bool, error) {
	var kind string
	err := db.QueryRow(ctx, `SELECT relkind::text FROM pg_class WHERE oid = to_regclass(`+table.Literal()+`)`).Scan(&kind)
	if errors.Is(err, pgx.ErrNoRows) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("read the outbox's layout: %w", err)
	}
	return kind == "p", nil
}

var boundRE = regexp.MustCompile(`^FOR VALUES FROM \((MINVALUE|'[^']+')\) TO \((MAXVALUE|'[^']+')\)$`)

// minTime and maxTime stand for MINVALUE and MAXVALUE bounds.
var (
	minTime = time.Date(1, 1, 1, 0, 0, 0, 0, time.UTC)
	maxTime = time.Date(9999, 12, 31, 0, 0, 0, 0, time.UTC)
)

// parseBound reads one bound of pg_get_expr(relpartbound).
func parseBound(s string) (time.Time, error) {
	switch s {
	case "MINVALUE":
		return minTime, nil
	case "MAXVALUE":
		return maxTime, nil
	}
	return time.Parse("2006-01-02 15:04:05", strings.Trim(s, "'"))
}

// Partitions lists the partitions of table.
func Partitions(ctx context.Context, db *pgxpool.Pool, table Name) ([]Partition, error) {
	rows, err := db.Query(ctx, `SELECT n.nspname, c.relname, pg_get_expr(c.relpartbound, c.oid)
		FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_namespace n ON n.oid = c.relnamespace
		WHERE i.inhparent = to_regclass(`+table.Literal()+`) ORDER BY c.relname`)
	if err != nil {
		return nil, fmt.Errorf("list outbox partitions: %w", err)
	}
	defer rows.Close()
	var out []Partition
	for rows.Next() {
		var schema, name string
		var boundp *string
		if err := rows.Scan(&schema, &name, &boundp); err != nil {
			return nil, fmt.Errorf("list outbox partitions: %w", err)
		}
		if boundp == nil {
			continue // being detached or dropped as we read the catalog
		}
		bound := *boundp
		if bound == "DEFAULT" {
			out = append(out, Partition{Schema: schema, Name: name, Default: true})
			continue
		}
		m := boundRE.FindStringSubmatch(bound)
		if m == nil {
			continue // not a range over created_at we made; leave it alone
		}
		from, err1 := parseBound(m[1])
		to, err2 := parseBound(m[2])
		if err1 != nil || err2 != nil {
			continue
		}
		out = append(out, Partition{Schema: schema, Name: name, From: from, To: to})
	}
	return out, rows.Err()
}

// wallUTC is t's wall clock in loc, as a UTC value: created_at holds wall
// clock time without a zone.
func wallUTC(t time.Time, loc *time.Location) time.Time {
	t = t.In(loc)
	return time.Date(t.Year(), t.Month(), t.Day(), t.Hour(), t.Minute(), t.Second(), t.Nanosecond(), time.UTC)
}

// partitionSuffix names the partition starting at from after its table:
// event_outbox_p20261201 for whole days, event_outbox_p20261201_1500
// otherwise.
func partitionSuffix(from time.Time, interval time.Duration) string {
	if interval%(24*time.Hour) == 0 {
		return "_p" + from.Format("20060102")
	}
	return "_p" + from.Format("20060102_1504")
}

// EnsurePartitions creates the partitions covering the interval that holds at
// and ahead intervals after it (and behind before it), skipping ranges that
// exist already. Producers never depend on it for correctness — the DEFAULT
// partition takes any row outside the ranges — but rows in the default
// partition stay there: keep the leader running so that partitions exist
// before their rows arrive. A range whose rows already sit in the default
// partition cannot be created (PostgreSQL refuses); it is logged and skipped.
//
// The partitions go into table's schema, named after it, so two partitioned
// outboxes in one schema never reach for the same name.
func EnsurePartitions(ctx context.Context, db *pgxpool.Pool, table Name, interval time.Duration, at time.Time, loc *time.Location, behind, ahead int, log *zap.Logger) ([]string, error) {
	if interval <= 0 {
		return nil, nil
	}
	if loc == nil {
		loc = time.UTC
	}
	table = table.orDefault()
	existing, err := Partitions(ctx, db, table)
	if err != nil {
		return nil, err
	}
	base := wallUTC(at, loc).Truncate(interval)
	var created []string
	for k := -behind; k <= ahead; k++ {
		from := base.Add(time.Duration(k) * interval)
		to := from.Add(interval)
		overlaps := false
		for _, p := range existing {
			if !p.Default && p.From.Before(to) && from.Before(p.To) {
				overlaps = true
				break
			}
		}
		if overlaps {
			continue
		}
		suffix := partitionSuffix(from, interval)
		name := table.Table + suffix
		_, err := db.Exec(ctx, fmt.Sprintf("CREATE TABLE IF NOT EXISTS %s PARTITION OF %s FOR VALUES FROM ('%s') TO ('%s')",
			table.Related(suffix), table.Ident(), from.Format("2006-01-02 15:04:05"), to.Format("2006-01-02 15:04:05")))
		if fault.IsPostgres(err, pgerrcode.InvalidObjectDefinition) {
			continue // overlaps a partition made by hand (e.g. a converted table)
		}
		if fault.IsPostgres(err, pgerrcode.CheckViolation) {
			log.Warn("outbox partition not created: the default partition already holds rows of its range (they stay there)",
				zap.String("partition", name), zap.Time("from", from), zap.Time("to", to))
			continue
		}
		if err != nil {
			return created, fmt.Errorf("create outbox partition %s: %w", name, err)
		}
		created = append(created, name)
	}
	if len(created) > 0 {
		log.Info("created outbox partitions ahead of time", zap.Strings("partitions", created))
	}
	return created, nil
}

// dropLockTimeout bounds how long detaching a partition may wait for its
// lock: DETACH takes an ACCESS EXCLUSIVE lock on the outbox, and while it
// waits behind a long transaction every producer's insert would queue behind
// it. A detach that cannot get the lock in time is tried again next pass.
const dropLockTimeout = time.Second

// DropResult is what dropping old partitions did.
type DropResult struct {
	Dropped []string
	Rows    int64    // rows the dropped partitions held
	Kept    []string // old partitions kept because they hold undelivered rows
}

// dropOldPartitions drops every range partition whose rows are all older than
// cutoff (its upper bound is at or before it) and all processed. A partition
// that still holds pending, failed or dead rows is kept whole; its processed
// rows go row by row (Prune), and it is dropped on the pass after its last
// undelivered row was delivered (or an operator removed the dead letters).
// Detach and drop happen in one transaction that checks the rows again under
// the lock, so a row that became undelivered meanwhile is never dropped.
func (p *Pruner) dropOldPartitions(ctx context.Context, cutoff time.Time) (DropResult, error) {
	var res DropResult
	parts, err := Partitions(ctx, p.pool, p.cfg.Table)
	if err != nil {
		return res, err
	}
	for _, part := range parts {
		if part.Default || part.To.After(cutoff) {
			continue
		}
		ident := part.ident()
		// The partial index over undelivered rows makes this check cheap.
		var undelivered int64
		if err := p.pool.QueryRow(ctx, "SELECT count(*) FROM "+ident+" WHERE status <> 'processed'").Scan(&undelivered); err != nil {
			return res, fmt.Errorf("check outbox partition %s: %w", part.Name, err)
		}
		if undelivered > 0 {
			res.Kept = append(res.Kept, part.Name)
			continue
		}
		var rows int64
		err := pgx.BeginFunc(ctx, p.pool, func(tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, fmt.Sprintf("SET LOCAL lock_timeout = '%dms'", dropLockTimeout.Milliseconds())); err != nil {
				return err
			}
			if _, err := tx.Exec(ctx, "ALTER TABLE "+p.cfg.Table.Ident()+" DETACH PARTITION "+ident); err != nil {
				return err
			}
			if err := tx.QueryRow(ctx, "SELECT count(*) FILTER (WHERE status <> 'processed'), count(*) FROM "+ident).Scan(&undelivered, &rows); err != nil {
				return err
			}
			if undelivered > 0 {
				return errKeep
			}
			_, err := tx.Exec(ctx, "DROP TABLE "+ident)
			return err
		})
		switch {
		case errors.Is(err, errKeep):
			res.Kept = append(res.Kept, part.Name)
		case fault.IsPostgres(err, pgerrcode.LockNotAvailable): // lock_not_available
			p.log.Warn("outbox partition not dropped this pass: its lock was not free within the timeout",
				zap.String("partition", part.Name), zap.Duration("lock_timeout", dropLockTimeout))
		case err != nil:
			return res, fmt.Errorf("drop outbox partition %s: %w", part.Name, err)
		default:
			res.Dropped = append(res.Dropped, part.Name)
			res.Rows += rows
		}
	}
	if len(res.Dropped) > 0 {
		p.log.Info("dropped old outbox partitions", zap.Strings("partitions", res.Dropped), zap.Int64("rows", res.Rows))
	}
	if kept := fmt.Sprint(res.Kept); len(res.Kept) > 0 && kept != p.lastKept {
		// Once per change, not every pass.
		p.lastKept = kept
		p.log.Info("old outbox partitions kept: they hold pending, failed or dead rows (requeue or remove dead letters to let them go)",
			zap.Strings("partitions", res.Kept))
	}
	return res, nil
}

var errKeep = errors.New("partition holds undelivered rows")
