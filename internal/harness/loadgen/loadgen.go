// Package loadgen writes synthetic events into the outbox through package
// outbox, at a given rate, in transactions of a given size, some of them
// rolled back on purpose. It is the core of cmd/outbox-loadgen and is meant to
// be driven from Go tests too (benchmarks, chaos tests): Run reports exactly
// how many events it committed, so a test can compare that with what reached
// ClickHouse.
package loadgen

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-streamer/outbox-streamer/outbox"
)

// Config describes a load. The zero value (after Validate's defaults) writes
// transactions of 10 events, one at a time, as fast as possible, until the
// context ends.
type Config struct {
	// Rate is the events per second to write, counting those in rolled-back
	// transactions: it is the load offered to PostgreSQL. 0 means as fast as
	// possible. It is a ceiling: time lost to a slow transaction is not
	// made up with a burst afterwards.
	Rate float64
	// TxSize is the number of events per transaction. Default 10.
	TxSize int
	// RollbackFraction is the share of transactions that are rolled back
	// instead of committed, from 0 to 1 (below 1 when Count is set).
	RollbackFraction float64
	// Connections is the number of transactions in flight at once, each on
	// its own pool connection (the pool's MaxConns should be at least this).
	// Default 1.
	Connections int
	// Duration stops the run after this long; 0 means no limit.
	Duration time.Duration
	// Count stops the run once this many events are committed (the last
	// transaction is made smaller to land on it exactly); 0 means no limit.
	// Rolled-back events do not count.
	Count int64
	// Copy writes each transaction's events with one outbox.AppendBatch
	// (COPY) instead of one outbox.Append per event.
	Copy bool
	// Seed seeds the random choices (event types, which transactions roll
	// back); each connection derives its own generator from it, so a run with
	// one connection is reproducible.
	Seed int64
	// Environment is the events' environment. Default "loadgen".
	Environment string
	// ContextBytes pads each event's context to about this many bytes; 0
	// leaves the context small (about 60 bytes).
	ContextBytes int
	// KeepGoing makes a failed transaction count in Stats and be followed by
	// a short, growing pause instead of ending the run: for chaos tests that
	// take the database away on purpose. Each transaction then also fetches
	// its id (one more round trip), so that a COMMIT whose answer is lost
	// with the connection can be resolved afterwards with txid_status and
	// still be counted exactly.
	KeepGoing bool
	// TxTimeout bounds one transaction. Transactions in flight when the
	// context ends are finished, not abandoned, so that every event is
	// accounted for; this bounds how long that takes. Default 30 s.
	TxTimeout time.Duration
	// ProgressInterval is how often Run calls its progress function.
	// Default 1 s.
	ProgressInterval time.Duration
	// Writer writes the events; nil means the outbox package defaults.
	Writer *outbox.Writer
}

// Validate checks the configuration and fills in defaults.
func (c *Config) Validate() error {
	switch {
	case c.Rate < 0:
		return fmt.Errorf("loadgen: rate %v is negative", c.Rate)
	case c.TxSize < 0:
		return fmt.Errorf("loadgen: tx size %d is negative", c.TxSize)
	case c.RollbackFraction < 0 || c.RollbackFraction > 1:
		return fmt.Errorf("loadgen: rollback fraction %v is outside 0..1", c.RollbackFraction)
	case c.RollbackFraction == 1 && c.Count > 0:
		return errors.New("loadgen: with a rollback fraction of 1 nothing is committed, so the count is never reached")
	case c.Connections < 0:
		return fmt.Errorf("loadgen: connections %d is negative", c.Connections)
	case c.Duration < 0:
		return fmt.Errorf("loadgen: duration %v is negative", c.Duration)
	case c.Count < 0:
		return fmt.Errorf("loadgen: count %d is negative", c.Count)
	case c.ContextBytes < 0:
		return fmt.Errorf("loadgen: context bytes %d is negative", c.ContextBytes)
	}
	if c.TxSize == 0 {
		c.TxSize = 10
	}
	if c.Connections == 0 {
		c.Connections = 1
	}
	if c.Environment == "" {
		c.Environment = "loadgen"
	}
	if c.TxTimeout <= 0 {
		c.TxTimeout = 30 * time.Second
	}
	if c.ProgressInterval <= 0 {
		c.ProgressInterval = time.Second
	}
	if c.Writer == nil {
		c.Writer = outbox.New(outbox.Options{})
	}
	return nil
}

// Stats counts what a run did. Every event written is in exactly one of
// Committed, RolledBack, Failed and InDoubt.
type Stats struct {
	// Committed is the number of events in committed transactions.
	Committed int64
	// CommittedTx is the number of committed transactions.
	CommittedTx int64
	// RolledBack is the number of events in transactions rolled back on
	// purpose (RollbackFraction).
	RolledBack int64
	// RolledBackTx is the number of those transactions.
	RolledBackTx int64
	// Failed is the number of events in transactions that failed and are
	// known not to be committed.
	Failed int64
	// FailedTx is the number of those transactions.
	FailedTx int64
	// InDoubt is the number of events whose COMMIT got no answer (the
	// connection broke) and whose outcome could not be found out (with
	// KeepGoing it is looked up once the database is back, within TxTimeout):
	// they may or may not be committed.
	InDoubt int64
	// Resolved is the number of events whose COMMIT answer was lost but
	// whose outcome txid_status told; they are counted in Committed or
	// Failed as it said.
	Resolved int64
	// Elapsed is the time since the run started.
	Elapsed time.Duration
}

// Rate is the committed events per second over Elapsed.
func (s Stats) Rate() float64 {
	if s.Elapsed <= 0 {
		return 0
	}
	return float64(s.Committed) / s.Elapsed.Seconds()
}

// eventTypes are the types the generator picks from.
var eventTypes = []string{"user.signed_in", "order.created", "order.paid", "payment.failed", "audit.permission_changed"}

// Run writes events into the outbox through pool until cfg.Count events are
// committed, cfg.Duration passes or ctx ends, and returns what it did. It
// calls progress (when not nil) every cfg.ProgressInterval from a single
// goroutine.
//
// When ctx ends, transactions in flight are finished (within cfg.TxTimeout)
// and Run returns nil: stopping is not an error. A failed transaction ends the
// run with its error, unless cfg.KeepGoing.
func Run(ctx context.Context, pool *pgxpool.Pool, cfg Config, progress func(Stats)) (Stats, error) {
	if err := cfg.Validate(); err != nil {
		return Stats{}, err
	}
	if cfg.Duration > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, cfg.Duration)
		defer cancel()
	}
	// A worker's fatal error stops the others.
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)

	g := &generator{cfg: cfg, pool: pool, remaining: cfg.Count, start: time.Now()}
	if cfg.ContextBytes > 0 {
		g.pad = strings.Repeat("x", cfg.ContextBytes)
	}
	var wg sync.WaitGroup
	errs := make([]error, cfg.Connections)
	for w := range cfg.Connections {
		wg.Go(func() {
			if err := g.worker(ctx, w); err != nil {
				errs[w] = err
				cancel(err)
			}
		})
	}
	done := make(chan struct{})
	go func() {
		wg.Wait()
		close(done)
	}()

	tick := time.NewTicker(cfg.ProgressInterval)
	defer tick.Stop()
	for running := true; running; {
		select {
		case <-done:
			running = false
		case <-tick.C:
			if progress != nil {
				progress(g.stats())
			}
		}
	}
	return g.stats(), errors.Join(errs...)
}

// generator is the state the workers share.
type generator struct {
	cfg   Config
	pool  *pgxpool.Pool
	pad   string
	start time.Time

	// mu guards remaining (events still to commit, with Count) and
	// nextSlot (when the next transaction may start, with Rate).
	mu        sync.Mutex
	remaining int64
	nextSlot  time.Time

	committed, committedTx   atomic.Int64
	rolledBack, rolledBackTx atomic.Int64
	failed, failedTx         atomic.Int64
	inDoubt, resolved        atomic.Int64
}

func (g *generator) stats() Stats {
	return Stats{
		Committed:    g.committed.Load(),
		CommittedTx:  g.committedTx.Load(),
		RolledBack:   g.rolledBack.Load(),
		RolledBackTx: g.rolledBackTx.Load(),
		Failed:       g.failed.Load(),
		FailedTx:     g.failedTx.Load(),
		InDoubt:      g.inDoubt.Load(),
		Resolved:     g.resolved.Load(),
		Elapsed:      time.Since(g.start),
	}
}

// reserve claims up to n of the events still to commit and returns how many
// it got; 0 means the count is reached. Without a Count it grants n.
// Reserving before the transaction, rather than counting after, is what makes
// concurrent workers land on Count exactly.
func (g *generator) reserve(n int) int {
	if g.cfg.Count == 0 {
		return n
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	n = int(min(int64(n), g.remaining))
	g.remaining -= int64(n)
	return n
}

// release returns a reservation whose transaction did not commit.
func (g *generator) release(n int) {
	if g.cfg.Count == 0 {
		return
	}
	g.mu.Lock()
	g.remaining += int64(n)
	g.mu.Unlock()
}

// countReached reports whether nothing is left to commit.
func (g *generator) countReached() bool {
	if g.cfg.Count == 0 {
		return false
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.remaining == 0
}

// pace waits for the turn of a transaction of n events under cfg.Rate. The
// slots form one schedule shared by all workers; a slot in the past is moved
// to now, so the rate is never exceeded to catch up.
func (g *generator) pace(ctx context.Context, n int) error {
	if g.cfg.Rate <= 0 {
		return ctx.Err()
	}
	g.mu.Lock()
	now := time.Now()
	if g.nextSlot.Before(now) {
		g.nextSlot = now
	}
	at := g.nextSlot
	g.nextSlot = at.Add(time.Duration(float64(n) / g.cfg.Rate * float64(time.Second)))
	g.mu.Unlock()
	return sleep(ctx, time.Until(at))
}

// sleep waits for d or until ctx ends.
func sleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// worker runs transactions one after another until the run ends.
func (g *generator) worker(ctx context.Context, w int) error {
	rng := rand.New(rand.NewPCG(uint64(g.cfg.Seed), uint64(w)))
	var seq int64
	backoff := time.Duration(0)
	for ctx.Err() == nil {
		rollback := rng.Float64() < g.cfg.RollbackFraction
		n := g.cfg.TxSize
		if rollback {
			// Rollbacks only accompany commits still to come.
			if g.countReached() {
				return nil
			}
		} else if n = g.reserve(n); n == 0 {
			return nil
		}
		if err := g.pace(ctx, n); err != nil {
			if !rollback {
				g.release(n)
			}
			return nil // the run is over
		}
		err := g.transaction(ctx, rng, w, &seq, n, rollback)
		if err == nil {
			backoff = 0
			continue
		}
		if !g.cfg.KeepGoing {
			return err
		}
		// Pause before the next attempt so that a database that is down is
		// not hammered; the pause grows to at most 2 s.
		backoff = min(max(2*backoff, 50*time.Millisecond), 2*time.Second)
		_ = sleep(ctx, backoff)
	}
	return nil
}

// transaction writes n events in one transaction and commits it or, with
// rollback, rolls it back, counting the outcome.
func (g *generator) transaction(ctx context.Context, rng *rand.Rand, w int, seq *int64, n int, rollback bool) error {
	// The transaction is finished even when ctx ends meanwhile: cancelling it
	// half-way would leave a COMMIT whose outcome is unknown, and the counts
	// must be exact for tests that compare them with ClickHouse.
	txCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), g.cfg.TxTimeout)
	defer cancel()

	evs := make([]outbox.Event, n)
	now := time.Now()
	for i := range evs {
		*seq++
		evs[i] = outbox.Event{
			Type:        eventTypes[rng.IntN(len(eventTypes))],
			Time:        now,
			Environment: g.cfg.Environment,
			Context: payload{
				Worker:   w,
				Seq:      *seq,
				UserID:   rng.IntN(100000),
				Rollback: rollback,
				Pad:      g.pad,
			},
		}
	}

	fail := func(err error) error {
		if !rollback {
			g.release(n)
		}
		g.failed.Add(int64(n))
		g.failedTx.Add(1)
		return err
	}
	tx, err := g.pool.Begin(txCtx)
	if err != nil {
		return fail(fmt.Errorf("loadgen: begin: %w", err))
	}
	var xid int64
	if g.cfg.KeepGoing {
		if err := tx.QueryRow(txCtx, "SELECT txid_current()").Scan(&xid); err != nil {
			_ = tx.Rollback(txCtx)
			return fail(fmt.Errorf("loadgen: txid_current: %w", err))
		}
	}
	if err := g.write(txCtx, tx, evs); err != nil {
		_ = tx.Rollback(txCtx)
		return fail(err)
	}
	if rollback {
		if err := tx.Rollback(txCtx); err != nil {
			// A rollback that fails still leaves nothing committed.
			return fail(fmt.Errorf("loadgen: roll back: %w", err))
		}
		g.rolledBack.Add(int64(n))
		g.rolledBackTx.Add(1)
		return nil
	}
	if err := tx.Commit(txCtx); err != nil {
		if commitRefused(err) {
			return fail(fmt.Errorf("loadgen: commit: %w", err))
		}
		// No answer: the COMMIT may have been applied.
		switch status := g.txStatus(ctx, xid); status {
		case "committed":
			g.resolved.Add(int64(n))
			g.committed.Add(int64(n))
			g.committedTx.Add(1)
			return fmt.Errorf("loadgen: commit (answer lost, but txid_status says committed): %w", err)
		case "aborted":
			g.resolved.Add(int64(n))
			return fail(fmt.Errorf("loadgen: commit (answer lost, txid_status says aborted): %w", err))
		}
		// The reservation is not returned, so Count is never overshot.
		g.inDoubt.Add(int64(n))
		return fmt.Errorf("loadgen: commit (outcome unknown): %w", err)
	}
	g.committed.Add(int64(n))
	g.committedTx.Add(1)
	return nil
}

// commitRefused reports whether a failed COMMIT is known to have rolled the
// transaction back: the server answered with an ERROR (a serialization
// failure, a deferred constraint), or pgx found the transaction already
// aborted. A FATAL (the server shutting down) or a broken connection says
// nothing about whether the commit record was written.
func commitRefused(err error) bool {
	if errors.Is(err, pgx.ErrTxCommitRollback) {
		return true
	}
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) {
		return false
	}
	severity := pgErr.SeverityUnlocalized
	if severity == "" {
		severity = pgErr.Severity
	}
	return severity == "ERROR"
}

// txStatus asks PostgreSQL, on a new connection, whether transaction xid
// committed: "committed", "aborted", or "" when xid is 0 (not fetched) or
// the answer cannot be had within TxTimeout. It retries while the database is
// unreachable (a restart) and while the old backend is still finishing.
func (g *generator) txStatus(ctx context.Context, xid int64) string {
	if xid == 0 {
		return ""
	}
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), g.cfg.TxTimeout)
	defer cancel()
	for pause := 50 * time.Millisecond; ; pause = min(2*pause, time.Second) {
		var status *string
		err := g.pool.QueryRow(rctx, "SELECT txid_status($1)", xid).Scan(&status)
		if err == nil && status != nil && *status != "in progress" {
			return *status
		}
		if err == nil && status == nil {
			return "" // too old to be known: cannot happen within TxTimeout
		}
		if sleep(rctx, pause) != nil {
			return ""
		}
	}
}

// write appends the events to tx.
func (g *generator) write(ctx context.Context, tx pgx.Tx, evs []outbox.Event) error {
	if g.cfg.Copy {
		if _, err := g.cfg.Writer.AppendBatch(ctx, tx, evs); err != nil {
			return fmt.Errorf("loadgen: %w", err)
		}
		return nil
	}
	for i := range evs {
		if _, err := g.cfg.Writer.Append(ctx, tx, evs[i]); err != nil {
			return fmt.Errorf("loadgen: %w", err)
		}
	}
	return nil
}

// payload is a generated event's context. Rollback marks events written in
// a transaction meant to roll back, so that a test can prove none arrived.
type payload struct {
	Worker   int    `json:"worker"`
	Seq      int64  `json:"seq"`
	UserID   int    `json:"user_id"`
	Rollback bool   `json:"rollback,omitempty"`
	Pad      string `json:"pad,omitempty"`
}
