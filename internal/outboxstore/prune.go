package outboxstore

// Retention: processed rows are removed from the outbox once they are older
// than the retention, in small batches that hold row locks for milliseconds
// and never touch a row that is not processed (pending, failed and dead rows
// stay, however old).
//
// Deletes are not published (the publication carries inserts only), so
// pruning the outbox never reaches ClickHouse: event_log keeps every event.

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/zap"
)

// PruneConfig tunes pruning.
type PruneConfig struct {
	// Table is the outbox table (OUTBOX_TABLE; zero: event_outbox).
	Table Name
	// Retention is how old (by created_at) a processed row must be to be
	// removed (OUTBOX_RETENTION). Zero or less keeps everything.
	Retention time.Duration
	// BatchRows bounds the rows one statement examines (default 5000): each
	// batch is its own short transaction.
	BatchRows int
	// Pause is slept between batches so that a long prune leaves room to the
	// stream's status updates (default 5 ms).
	Pause time.Duration
	// TimeZone is the zone of the outbox's TIMESTAMP values (default UTC).
	TimeZone *time.Location
	// PartitionInterval is the width of the partitions of a partitioned
	// outbox (OUTBOX_PARTITION_INTERVAL); Maintain creates them ahead.
	PartitionInterval time.Duration
	// PartitionsAhead is how many partitions Maintain keeps ready after the
	// current one (default 3).
	PartitionsAhead int
}

func (c *PruneConfig) defaults() {
	if c.BatchRows <= 0 {
		c.BatchRows = 5000
	}
	if c.Pause <= 0 {
		c.Pause = 5 * time.Millisecond
	}
	if c.TimeZone == nil {
		c.TimeZone = time.UTC
	}
	if c.PartitionsAhead <= 0 {
		c.PartitionsAhead = 3
	}
	c.Table = c.Table.orDefault()
}

// PruneResult is what one pass did (or, dry, would do).
type PruneResult struct {
	Removed int64 // rows removed, row by row or with their partition
	Batches int
	Took    time.Duration
	Cutoff  time.Time // rows created before it were eligible
	// Partitions dropped whole (partitioned outbox), and old ones kept
	// because they hold undelivered rows.
	DroppedPartitions, KeptPartitions []string
}

// Pruner removes old processed rows.
type Pruner struct {
	cfg      PruneConfig
	pool     *pgxpool.Pool
	log      *zap.Logger
	lastKept string // the kept partitions last logged
	// announced is set once the first pass said what it would remove.
	announced bool
}

// NewPruner returns a pruner.
func NewPruner(cfg PruneConfig, pool *pgxpool.Pool, log *zap.Logger) *Pruner {
	cfg.defaults()
	return &Pruner{cfg: cfg, pool: pool, log: log.Named("retention")}
}

// Enabled reports whether a retention is set.
func (p *Pruner) Enabled() bool { return p.cfg.Retention > 0 }

// pruneBatch examines the next BatchRows rows by id and deletes those that are
// processed and created before the cutoff; rows someone holds are skipped
// (SKIP LOCKED). The status is checked again on the locked row, so a row that
// was requeued a moment ago stays. It returns the highest id examined, how many
// rows it removed, and whether every examined row was newer than the cutoff
// (then there is nothing more to prune: ids grow with created_at).
const pruneBatch = `WITH batch AS (
		SELECT id, created_at FROM {outbox} WHERE id > $1 ORDER BY id LIMIT $2),
	victims AS (
		SELECT id FROM {outbox}
		WHERE id = ANY(ARRAY(SELECT id FROM batch)) AND status = 'processed' AND created_at < $3
		FOR UPDATE SKIP LOCKED),
	removed AS (
		DELETE FROM {outbox} o USING victims v WHERE o.id = v.id RETURNING 1)
	SELECT (SELECT max(id) FROM batch), (SELECT count(*) FROM removed),
	       coalesce((SELECT bool_and(created_at >= $3) FROM batch), true)`

// countBatch is pruneBatch without the delete, for --dry-run.
const countBatch = `WITH batch AS (
		SELECT id, status, created_at FROM {outbox} WHERE id > $1 ORDER BY id LIMIT $2)
	SELECT (SELECT max(id) FROM batch),
	       (SELECT count(*) FROM batch WHERE status = 'processed' AND created_at < $3),
	       coalesce((SELECT bool_and(created_at >= $3) FROM batch), true)`

// Prune runs one pass over the rows older than olderThan (the configured
// retention when zero). With dry it only counts. A pass walks the table by
// id from the oldest row: the primary key is the only index it needs, and
// it stops at the first batch that holds only newer rows.
func (p *Pruner) Prune(ctx context.Context, olderThan time.Duration, dry bool) (PruneResult, error) {
	partitioned, err := Partitioned(ctx, p.pool, p.cfg.Table)
	if err != nil {
		return PruneResult{}, err
	}
	return p.prune(ctx, olderThan, dry, partitioned)
}

func (p *Pruner) prune(ctx context.Context, olderThan time.Duration, dry, partitioned bool) (PruneResult, error) {
	if olderThan <= 0 {
		olderThan = p.cfg.Retention
	}
	var res PruneResult
	if olderThan <= 0 {
		return res, nil
	}
	start := time.Now()
	// created_at is a TIMESTAMP holding wall-clock time in the outbox's zone.
	res.Cutoff = start.Add(-olderThan).In(p.cfg.TimeZone)
	cutoff := time.Date(res.Cutoff.Year(), res.Cutoff.Month(), res.Cutoff.Day(), res.Cutoff.Hour(),
		res.Cutoff.Minute(), res.Cutoff.Second(), res.Cutoff.Nanosecond(), time.UTC)
	if partitioned && !dry {
		// Whole partitions first: dropping a table is cheaper than deleting
		// its rows, and leaves no dead tuples to vacuum.
		d, err := p.dropOldPartitions(ctx, cutoff)
		res.DroppedPartitions, res.KeptPartitions, res.Removed = d.Dropped, d.Kept, d.Rows
		if err != nil {
			res.Took = time.Since(start)
			return res, err
		}
	}
	query := p.cfg.Table.sql(pruneBatch)
	if dry {
		query = p.cfg.Table.sql(countBatch)
	}
	last := int64(-1 << 63)
	for {
		var maxID *int64
		var n int64
		var allNewer bool
		if err := p.pool.QueryRow(ctx, query, last, p.cfg.BatchRows, cutoff).Scan(&maxID, &n, &allNewer); err != nil {
			res.Took = time.Since(start)
			return res, fmt.Errorf("prune processed rows older than %s: %w", olderThan, err)
		}
		res.Removed += n
		res.Batches++
		if maxID == nil || allNewer {
			break
		}
		last = *maxID
		select {
		case <-ctx.Done():
			res.Took = time.Since(start)
			return res, ctx.Err()
		case <-time.After(p.cfg.Pause):
		}
	}
	res.Took = time.Since(start)
	if res.Removed > 0 && !dry {
		p.log.Info("pruned processed rows", zap.Int64("rows", res.Removed), zap.Duration("older_than", olderThan),
			zap.Int("batches", res.Batches), zap.Duration("took", res.Took))
	}
	return res, nil
}

// Maintain is the leader's periodic care of the outbox: on a partitioned
// outbox it creates the partitions ahead of time, then it prunes (Prune with
// the configured retention).
func (p *Pruner) Maintain(ctx context.Context) (PruneResult, error) {
	partitioned, err := Partitioned(ctx, p.pool, p.cfg.Table)
	if err != nil {
		return PruneResult{}, err
	}
	if partitioned {
		if p.cfg.PartitionInterval <= 0 {
			p.log.Warn("the outbox is partitioned but OUTBOX_PARTITION_INTERVAL is not set: no partitions are created ahead, new rows go to the default partition",
				zap.Stringer("outbox_table", p.cfg.Table))
		} else if _, err := EnsurePartitions(ctx, p.pool, p.cfg.Table, p.cfg.PartitionInterval, time.Now(), p.cfg.TimeZone, 0, p.cfg.PartitionsAhead, p.log); err != nil {
			return PruneResult{}, err
		}
	}
	if !p.Enabled() {
		return PruneResult{}, nil
	}
	if !p.announced {
		p.announced = true
		p.announce(ctx)
	}
	return p.prune(ctx, 0, false, partitioned)
}

// Ages reads the ages of the oldest rows (see ReadAges).
func (p *Pruner) Ages(ctx context.Context) (Ages, error) {
	return ReadAges(ctx, p.pool, p.cfg.Table, p.cfg.TimeZone)
}

// Ages are the ages of the oldest row and of the oldest processed row (nil
// when there is none), for `status` and the metrics.
type Ages struct {
	OldestRow       *time.Duration
	OldestProcessed *time.Duration
}

// ReadAges reads the ages of table's rows by walking the primary key from the
// start (cheap: the oldest rows come first; only rows not processed are
// skipped).
func ReadAges(ctx context.Context, db Reader, table Name, loc *time.Location) (Ages, error) {
	if loc == nil {
		loc = time.UTC
	}
	var a Ages
	var oldest, processed *time.Time
	err := db.QueryRow(ctx, table.sql(`SELECT (SELECT created_at FROM {outbox} ORDER BY id LIMIT 1),
		(SELECT created_at FROM {outbox} WHERE status = 'processed' ORDER BY id LIMIT 1)`)).Scan(&oldest, &processed)
	if err != nil {
		return a, fmt.Errorf("read the oldest outbox rows: %w", err)
	}
	now := time.Now()
	a.OldestRow, a.OldestProcessed = WallAge(oldest, loc, now), WallAge(processed, loc, now)
	return a, nil
}

// announce logs what the first pass of this process will remove, before it
// does: after `migrate up` adopted another service's outbox, that can be
// most of the table. A failure to count only loses the message.
func (p *Pruner) announce(ctx context.Context) {
	pv, err := p.Preview(ctx)
	if err != nil {
		p.log.Warn("could not count the rows retention will remove", zap.Error(err))
		return
	}
	if pv.Rows == 0 {
		return
	}
	fields := []zap.Field{zap.Int64("rows", pv.Rows), zap.Duration("retention", p.cfg.Retention),
		zap.Time("cutoff", pv.Cutoff), zap.Stringer("outbox_table", p.cfg.Table)}
	if pv.Oldest != nil {
		fields = append(fields, zap.Time("oldest_created_at", *pv.Oldest))
	}
	p.log.Info("retention is about to remove processed rows older than OUTBOX_RETENTION (set OUTBOX_RETENTION=0 to keep them)", fields...)
}

// RetentionPreview is what the next prune would remove.
type RetentionPreview struct {
	Rows   int64     // processed rows created before Cutoff
	Cutoff time.Time // wall clock in the outbox's zone
	// Oldest is created_at of the oldest processed row (by id), nil when
	// there is none.
	Oldest *time.Time
}

// Preview counts what a prune with the configured retention would remove
// now, removing nothing (an outbox adopted from another service may hold
// months of processed rows that the first pass deletes).
func (p *Pruner) Preview(ctx context.Context) (RetentionPreview, error) {
	var pv RetentionPreview
	if !p.Enabled() {
		return pv, nil
	}
	res, err := p.Prune(ctx, 0, true)
	if err != nil {
		return pv, err
	}
	pv.Rows, pv.Cutoff = res.Removed, res.Cutoff
	if err := p.pool.QueryRow(ctx, p.cfg.Table.sql(`SELECT created_at FROM {outbox} WHERE status = 'processed' ORDER BY id LIMIT 1`)).Scan(&pv.Oldest); err != nil && err != pgx.ErrNoRows {
		return pv, fmt.Errorf("read the oldest processed row: %w", err)
	}
	return pv, nil
}
