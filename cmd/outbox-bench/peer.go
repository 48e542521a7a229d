package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/outbox-streamer/outbox-streamer/internal/fault"
	"github.com/outbox-streamer/outbox-streamer/sink"
)

// Scenario g: the real peer. ClickHouse's own MaterializedPostgreSQL database
// engine replicates the same outbox on the same servers: it creates its own slot
// and publication, snapshots the table (the initial load) and then follows the
// slot. Its figures stand beside c (drain: paused and resumed on its slot, see
// runPeerDrain), d (live) and e (latency); the snapshot copy of a committed
// backlog is measured too, but compares with nothing of ours.

// peerLatencyMax bounds g's latency producer: the same paced producer as e, run
// for at most this long (e runs LatencyDuration).
const peerLatencyMax = 20 * time.Second

// peerIDMargin is how far below the highest id seen g's latency watcher looks
// again: ids are taken at insert, so with two producer connections a transaction
// with lower ids can commit (and become visible) just after one with higher ids.
const peerIDMargin = 10_000

// peer is a MaterializedPostgreSQL database in ClickHouse replicating e's outbox.
type peer struct {
	e       *dbEnv
	db      string    // ClickHouse database name
	table   string    // quoted db.event_outbox
	created time.Time // when CREATE DATABASE was sent
}

// startPeer creates the peer's database. The engine loads and then streams in the
// background: CREATE DATABASE returns at once.
func startPeer(ctx context.Context, e *dbEnv) (*peer, error) {
	pc, err := pgconn.ParseConfig(e.DSN)
	if err != nil {
		return nil, fmt.Errorf("parse PostgreSQL DSN: %w", err)
	}
	p := &peer{e: e, db: e.CHDB + "_peer"}
	p.table = sink.QuoteIdent(p.db) + "." + sink.QuoteIdent("event_outbox")
	q := fmt.Sprintf("CREATE DATABASE %s ENGINE = MaterializedPostgreSQL(%s, %s, %s, %s) SETTINGS materialized_postgresql_tables_list = 'event_outbox'",
		sink.QuoteIdent(p.db), chString(net.JoinHostPort(pc.Host, strconv.Itoa(int(pc.Port)))), chString(pc.Database), chString(pc.User), chString(pc.Password))
	sctx := clickhouse.Context(ctx, clickhouse.WithSettings(clickhouse.Settings{"allow_experimental_database_materialized_postgresql": 1}))
	p.created = time.Now()
	if err := e.CH.Exec(sctx, q); err != nil {
		return nil, fmt.Errorf("create the MaterializedPostgreSQL database: %w", err)
	}
	return p, nil
}

// chString is s as a ClickHouse string literal.
func chString(s string) string {
	return "'" + strings.NewReplacer(`\`, `\\`, `'`, `\'`).Replace(s) + "'"
}

// drop drops the peer's database and checks that its replication slot went with
// it: a leftover slot pins WAL for the rest of the run. (e.close drops any slot of
// the PostgreSQL database as well, so even a failed drop leaves none behind.)
func (p *peer) drop() error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := p.e.CH.Exec(ctx, "DROP DATABASE IF EXISTS "+sink.QuoteIdent(p.db)+" SYNC"); err != nil {
		return fmt.Errorf("drop the MaterializedPostgreSQL database: %w", err)
	}
	return poll(ctx, 20*time.Second, 50*time.Millisecond, "the peer's replication slot to be dropped with its database", func() (bool, error) {
		var n int
		err := p.e.Pool.QueryRow(ctx, "SELECT count(*) FROM pg_replication_slots WHERE database = $1", p.e.pgName).Scan(&n)
		return n == 0, err
	})
}

// physicalRows is the rows in the active parts of the peer's table: cheap (part
// metadata), and before merges it counts a row replicated twice twice.
func (p *peer) physicalRows(ctx context.Context) (uint64, error) {
	var n uint64
	err := p.e.CH.QueryRow(ctx, "SELECT sum(rows) FROM system.parts WHERE database = ? AND table = 'event_outbox' AND active", p.db).Scan(&n)
	return n, err
}

// count is count() of the peer's table as ClickHouse answers it: the engine reads
// its ReplacingMergeTree(_version) ORDER BY id with FINAL (EXPLAIN shows FINAL: 1
// on a plain SELECT), so a row replicated twice counts once.
func (p *peer) count(ctx context.Context) (uint64, error) {
	var n uint64
	err := p.e.CH.QueryRow(ctx, "SELECT count() FROM "+p.table).Scan(&n)
	return n, err
}

// waitRows waits until the peer shows want rows and returns the time the query
// that first saw them all was issued.
func (p *peer) waitRows(ctx context.Context, want uint64, timeout time.Duration) (time.Time, error) {
	var seen time.Time
	var last uint64
	err := poll(ctx, timeout, 20*time.Millisecond, fmt.Sprintf("%d rows in the peer's table", want), func() (bool, error) {
		// The cheap count first; the FINAL count only once it could be complete.
		n, err := p.physicalRows(ctx)
		if err != nil || n < want {
			last = n
			return false, err
		}
		issued := time.Now()
		c, err := p.count(ctx)
		last = c
		if err == nil && c >= want {
			seen = issued
			return true, nil
		}
		return false, err
	})
	if err != nil {
		return seen, fmt.Errorf("%w (%d there)", err, last)
	}
	return seen, nil
}

// waitReady waits until the peer's table exists in ClickHouse: its initial load
// is done and it follows the slot, which it created before the snapshot.
func (p *peer) waitReady(ctx context.Context, timeout time.Duration) error {
	return poll(ctx, timeout, 20*time.Millisecond, "the peer's table to appear", func() (bool, error) {
		var n uint64
		err := p.e.CH.QueryRow(ctx, "SELECT count() FROM system.tables WHERE database = ? AND name = 'event_outbox'", p.db).Scan(&n)
		return n > 0, err
	})
}

// verify checks the peer's end state the way verifyDelivered checks event_log:
// through the peer's table (read with FINAL by the engine) count() = uniqExact(id)
// = want, and the sum of ids equals PostgreSQL's. It returns the physical rows.
func (p *peer) verify(ctx context.Context, want int64) (uint64, error) {
	var total, sumPG int64
	if err := p.e.Pool.QueryRow(ctx, "SELECT count(*), COALESCE(sum(id), 0) FROM event_outbox").Scan(&total, &sumPG); err != nil {
		return 0, fmt.Errorf("count outbox rows: %w", err)
	}
	var count, uniq uint64
	var sumCH int64
	if err := p.e.CH.QueryRow(ctx, "SELECT count(), uniqExact(id), sum(id) FROM "+p.table).Scan(&count, &uniq, &sumCH); err != nil {
		return 0, fmt.Errorf("count the peer's rows: %w", err)
	}
	physical, err := p.physicalRows(ctx)
	if err != nil {
		return 0, err
	}
	switch {
	case total != want:
		return physical, fmt.Errorf("outbox holds %d rows, want %d", total, want)
	case count != uint64(want) || uniq != uint64(want):
		return physical, fmt.Errorf("the peer's table has count()=%d uniqExact(id)=%d (FINAL), want %d", count, uniq, want)
	case sumCH != sumPG:
		return physical, fmt.Errorf("sum of ids differs: PostgreSQL %d, the peer %d", sumPG, sumCH)
	}
	return physical, nil
}

// peerError adds what the ClickHouse server logged about MaterializedPostgreSQL
// to a failure of the peer: its errors show only in the server's log.
func (b *bench) peerError(err error) error {
	if err == nil || b.srv.CHLog == "" {
		return err
	}
	data, rerr := os.ReadFile(b.srv.CHLog)
	if rerr != nil {
		return err
	}
	var lines []string
	for _, l := range strings.Split(string(data), "\n") {
		// The engine's failed reads while g's drain holds its slot are expected.
		if strings.Contains(l, "is active for PID") {
			continue
		}
		if strings.Contains(l, "PostgreSQL") && (strings.Contains(l, "<Error>") || strings.Contains(l, "<Warning>") || strings.Contains(l, "<Fatal>")) {
			lines = append(lines, l)
		}
	}
	if len(lines) == 0 {
		return fmt.Errorf("%w (the ClickHouse log %s has no PostgreSQL errors)", err, b.srv.CHLog)
	}
	if len(lines) > 10 {
		lines = lines[len(lines)-10:]
	}
	return fmt.Errorf("%w; the ClickHouse log %s says:\n%s", err, b.srv.CHLog, strings.Join(lines, "\n"))
}

// partialError is a scenario whose parts did not all complete: the figures of
// those that did are kept.
type partialError struct{ msg string }

func (e *partialError) Error() string { return e.msg }

func isPartial(err error) bool {
	var p *partialError
	return errors.As(err, &p)
}

// runPeer is scenario g: drain (from the WAL), snapshot copy, live and latency
// with the peer, each on fresh databases. A failed part leaves the others' figures.
func runPeer(ctx context.Context, b *bench) (map[string]float64, error) {
	m := map[string]float64{}
	var errs []string
	for _, part := range []struct {
		name string
		run  func(context.Context, *bench) (map[string]float64, error)
	}{{"drain", runPeerDrain}, {"snapshot", runPeerSnapshot}, {"live", runPeerLive}, {"latency", runPeerLatency}} {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		r, err := part.run(ctx, b)
		if err != nil {
			errs = append(errs, part.name+": "+b.peerError(err).Error())
			continue
		}
		for k, v := range r {
			m[k] = v
		}
	}
	switch {
	case len(errs) == 0:
		return m, nil
	case len(m) == 0:
		return nil, errors.New(strings.Join(errs, "; "))
	}
	return m, &partialError{strings.Join(errs, "; ")}
}

// runPeerDrain is g's drain, set up like c: the peer's database created on the
// empty outbox (its slot is created then, its snapshot copy is empty) and
// replicating, then paused (its slot held, see peerpause.go), c's backlog
// committed and settled, and the peer resumed; timed from the resume until the
// first poll (every 20 ms) that saw every row, so the engine decodes the backlog
// from the WAL as the streamer does in c. The slot is checked to have stayed
// behind the backlog while paused, and to pass it after.
func runPeerDrain(ctx context.Context, b *bench) (_ map[string]float64, err error) {
	e, err := newEnv(ctx, b.srv)
	if err != nil {
		return nil, err
	}
	defer e.close()
	if _, err := e.Pool.Exec(ctx, "CREATE PUBLICATION "+pgx.Identifier{pausePublication}.Sanitize()); err != nil {
		return nil, fmt.Errorf("create the pause publication: %w", err)
	}
	p, err := startPeer(ctx, e)
	if err != nil {
		return nil, err
	}
	defer func() { err = errors.Join(err, p.drop()) }()
	if err := p.waitReplicating(ctx, time.Minute); err != nil {
		return nil, err
	}
	slot, start, _, err := p.slot(ctx)
	if err != nil {
		return nil, err
	}
	hold, err := holdSlot(ctx, e.DSN, slot, start, 30*time.Second)
	if err != nil {
		return nil, err
	}
	held := true
	defer func() {
		if held {
			_ = hold.release()
		}
	}()
	// The position the pause starts from, read once the slot is held (the engine
	// could have moved it between the read above and the hold).
	if _, start, _, err = p.slot(ctx); err != nil {
		return nil, err
	}
	target, err := e.insertBacklog(ctx, b.cfg.Rows, b.cfg.TxSize)
	if err != nil {
		return nil, err
	}
	if err := e.settle(ctx); err != nil {
		return nil, err
	}
	// Still paused: the slot held by the bench and behind the whole backlog, and
	// none of it in the peer.
	_, paused, pid, err := p.slot(ctx)
	if err != nil {
		return nil, err
	}
	if pid != hold.pid {
		return nil, fmt.Errorf("the peer's slot %s is held by pid %d, not by the bench's walsender %d: the pause ended early", slot, pid, hold.pid)
	}
	if paused > start || paused >= target {
		return nil, fmt.Errorf("the peer's slot %s moved while paused: confirmed %s, from %s (backlog ends at %s)", slot, pglogrepl.LSN(paused), pglogrepl.LSN(start), pglogrepl.LSN(target))
	}
	if n, err := p.physicalRows(ctx); err != nil || n != 0 {
		return nil, errors.Join(err, fmt.Errorf("the peer has %d rows while paused, want 0", n))
	}

	meter := &cpuMeter{}
	c0 := meter.sample()
	resumed := time.Now()
	held = false
	if err := hold.release(); err != nil {
		return nil, err
	}
	if err := poll(ctx, 10*time.Second, 2*time.Millisecond, "the peer's slot to be released", func() (bool, error) {
		_, _, pid, err := p.slot(ctx)
		return pid != hold.pid, err
	}); err != nil {
		return nil, err
	}
	if err := p.wake(ctx); err != nil {
		return nil, err
	}
	seen, err := p.waitRows(ctx, uint64(b.cfg.Rows), b.cfg.Timeout)
	if err != nil {
		return nil, err
	}
	use := meter.sample().since(c0)
	physical, err := p.verify(ctx, int64(b.cfg.Rows))
	if err != nil {
		return nil, err
	}
	if err := poll(ctx, time.Minute, 20*time.Millisecond, "the peer's slot confirmed past "+pglogrepl.LSN(target).String(), func() (bool, error) {
		_, c, _, err := p.slot(ctx)
		return c >= target, err
	}); err != nil {
		return nil, err
	}
	b.note("g", use)
	took := seen.Sub(resumed)
	return map[string]float64{
		"rows":           float64(b.cfg.Rows),
		"seconds":        took.Seconds(),
		"rows_per_s":     float64(b.cfg.Rows) / took.Seconds(),
		"physical_rows":  float64(physical),
		"paused_wal_mib": float64(target-paused) / (1 << 20),
	}, nil
}

// runPeerSnapshot is g's snapshot copy (not a target: c decodes the WAL): c's
// backlog committed and settled, then the peer's database created; timed from
// CREATE DATABASE until every row is visible. The engine's initial load copies the
// table from a snapshot and decodes no WAL.
func runPeerSnapshot(ctx context.Context, b *bench) (_ map[string]float64, err error) {
	e, err := newEnv(ctx, b.srv)
	if err != nil {
		return nil, err
	}
	defer e.close()
	if _, err := e.insertBacklog(ctx, b.cfg.Rows, b.cfg.TxSize); err != nil {
		return nil, err
	}
	if err := e.settle(ctx); err != nil {
		return nil, err
	}
	p, err := startPeer(ctx, e)
	if err != nil {
		return nil, err
	}
	defer func() { err = errors.Join(err, p.drop()) }()
	seen, err := p.waitRows(ctx, uint64(b.cfg.Rows), b.cfg.Timeout)
	if err != nil {
		return nil, err
	}
	physical, err := p.verify(ctx, int64(b.cfg.Rows))
	if err != nil {
		return nil, err
	}
	took := seen.Sub(p.created)
	return map[string]float64{
		"snapshot_seconds":       took.Seconds(),
		"snapshot_rows_per_s":    float64(b.cfg.Rows) / took.Seconds(),
		"snapshot_physical_rows": float64(physical),
	}, nil
}

// runPeerLive is g's live part: the peer started on the empty table, then d's
// producer; delivery is timed from the producer's start to the poll that saw the
// last row.
func runPeerLive(ctx context.Context, b *bench) (map[string]float64, error) {
	return withReadyPeer(ctx, b, func(e *dbEnv, p *peer) (map[string]float64, error) {
		return peerLive(ctx, b, e, p)
	})
}

func peerLive(ctx context.Context, b *bench, e *dbEnv, p *peer) (map[string]float64, error) {
	pstart, pend, err := liveProducer(ctx, b, e)
	if err != nil {
		return nil, err
	}
	last, err := p.waitRows(ctx, uint64(b.cfg.Rows), b.cfg.Timeout)
	if err != nil {
		return nil, err
	}
	if _, err := p.verify(ctx, int64(b.cfg.Rows)); err != nil {
		return nil, err
	}
	n := float64(b.cfg.Rows)
	return map[string]float64{
		"live_rows":             n,
		"producer_seconds":      pend.Sub(pstart).Seconds(),
		"producer_rows_per_s":   n / pend.Sub(pstart).Seconds(),
		"delivery_seconds":      last.Sub(pstart).Seconds(),
		"delivery_rows_per_s":   n / last.Sub(pstart).Seconds(),
		"tail_after_producer_s": last.Sub(pend).Seconds(),
	}, nil
}

// runPeerLatency is g's latency part: e's paced producer (same rate, transactions
// and connections, for at most peerLatencyMax) with the peer running; an event's
// latency is from its commit to the first poll of the peer's table that saw it,
// polled like e every LatencyPoll.
func runPeerLatency(ctx context.Context, b *bench) (map[string]float64, error) {
	return withReadyPeer(ctx, b, func(e *dbEnv, p *peer) (map[string]float64, error) {
		return peerLatency(ctx, b, e, p)
	})
}

func peerLatency(ctx context.Context, b *bench, e *dbEnv, p *peer) (map[string]float64, error) {
	w := &chWatcher{e: e, interval: b.cfg.LatencyPoll, seen: map[int64]time.Time{}, margin: peerIDMargin,
		query:    "SELECT toUInt64(id), toUInt64(id) FROM " + p.table + " WHERE id >= ?",
		tolerate: func(err error) bool { return fault.ClickHouseCode(err) == 60 }} // UNKNOWN_TABLE
	wctx, stopWatch := context.WithCancel(ctx)
	watchDone := make(chan struct{})
	go func() { defer close(watchDone); w.run(wctx) }()
	defer func() { stopWatch(); <-watchDone }()

	dur := min(b.cfg.LatencyDuration, peerLatencyMax)
	pstart := time.Now()
	recs, _, err := latencyProducer(ctx, e.Pool, b.cfg.LatencyRate, b.cfg.LatencyTx, b.cfg.LatencyWorkers, dur)
	pend := time.Now()
	if err != nil {
		return nil, fmt.Errorf("latency producer: %w", err)
	}
	if len(recs) == 0 {
		return nil, errors.New("the latency producer committed nothing")
	}
	if _, err := p.waitRows(ctx, uint64(len(recs)), b.cfg.Timeout); err != nil {
		return nil, err
	}
	if err := poll(ctx, time.Minute, 10*time.Millisecond, "the watcher to see every event", func() (bool, error) {
		w.mu.Lock()
		defer w.mu.Unlock()
		return len(w.seen) >= len(recs), w.err
	}); err != nil {
		return nil, err
	}
	stopWatch()
	<-watchDone
	if _, err := p.verify(ctx, int64(len(recs))); err != nil {
		return nil, err
	}
	lat := make([]float64, 0, len(recs))
	for _, r := range recs {
		at, ok := w.seen[r.id]
		if !ok {
			return nil, fmt.Errorf("event %d never seen in the peer's table", r.id)
		}
		lat = append(lat, at.Sub(r.at).Seconds()*1000)
	}
	if len(w.seen) != len(recs) {
		return nil, fmt.Errorf("the watcher saw %d ids for %d committed events", len(w.seen), len(recs))
	}
	sort.Float64s(lat)
	return map[string]float64{
		"latency_events":        float64(len(recs)),
		"latency_seconds":       dur.Seconds(),
		"latency_producer_rate": float64(len(recs)) / pend.Sub(pstart).Seconds(),
		"latency_p50_ms":        percentile(lat, 50),
		"latency_p95_ms":        percentile(lat, 95),
		"latency_p99_ms":        percentile(lat, 99),
		"latency_max_ms":        lat[len(lat)-1],
	}, nil
}

// withReadyPeer runs part on fresh databases with the peer started on the
// empty table and ready, and drops the peer (and its slot) afterwards.
func withReadyPeer(ctx context.Context, b *bench, part func(*dbEnv, *peer) (map[string]float64, error)) (_ map[string]float64, err error) {
	e, err := newEnv(ctx, b.srv)
	if err != nil {
		return nil, err
	}
	defer e.close()
	p, err := startPeer(ctx, e)
	if err != nil {
		return nil, err
	}
	defer func() { err = errors.Join(err, p.drop()) }()
	if err := p.waitReady(ctx, time.Minute); err != nil {
		return nil, err
	}
	return part(e, p)
}
