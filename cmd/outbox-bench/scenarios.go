package main

import (
	"context"
	"fmt"
	"os"
	"sort"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/loadgen"
)

const stopTimeout = 2 * time.Minute

// startStreaming starts the binary on e and waits until it streams from the slot
// (creating the slot if it does not exist yet).
func (b *bench) startStreaming(ctx context.Context, e *dbEnv, key string, extra ...string) (*streamer, error) {
	s, err := startStreamer(b.cfg.Streamer, e.streamerEnv(extra...), b.logPath(key))
	if err != nil {
		return nil, err
	}
	e.watch = s.err
	if err := e.waitActive(ctx, time.Minute); err != nil {
		_ = s.Stop(stopTimeout)
		return nil, err
	}
	return s, nil
}

// runDrain is scenario c: the slot is created by a first start of the streamer on
// the empty table (then stopped), the backlog is committed, and a second start is
// timed from launch until every row is in ClickHouse and processed; the slot's
// confirmed LSN passing the last commit is waited for (and reported) separately,
// because the streamer reports it only every STATUS_INTERVAL.
func runDrain(ctx context.Context, b *bench, key string, extra ...string) (map[string]float64, error) {
	return runDrainWith(ctx, b, key, false, extra...)
}

// runBackfill is scenario h: the same backlog committed before the replication
// slot exists, then the binary's first start timed the same way. It creates the
// slot, backfills (marks the rows the slot will never carry for the sweep) and
// the sweep delivers them.
func runBackfill(ctx context.Context, b *bench) (map[string]float64, error) {
	return runDrainWith(ctx, b, "h", true)
}

// runDrainWith is runDrain; with backfill the slot does not exist when the timed
// start begins (no first start), so the whole backlog goes through the backfill
// and the sweep instead of the stream.
func runDrainWith(ctx context.Context, b *bench, key string, backfill bool, extra ...string) (map[string]float64, error) {
	e, err := newEnv(ctx, b.srv)
	if err != nil {
		return nil, err
	}
	defer e.close()
	if !backfill {
		s, err := b.startStreaming(ctx, e, key, extra...)
		if err != nil {
			return nil, err
		}
		// Stopped before its ClickHouse client finished connecting, the
		// binary exits with a reply unread, the kernel resets the connection
		// and this chDB build's server aborts (see main's startServers).
		if err := poll(ctx, time.Minute, 10*time.Millisecond, "the streamer's ClickHouse connection", func() (bool, error) {
			_, ok := s.loggedAt("connected to clickhouse")
			return ok, e.checkWatch()
		}); err != nil {
			_ = s.Stop(stopTimeout)
			return nil, err
		}
		e.watch = nil
		if err := s.Stop(stopTimeout); err != nil {
			return nil, err
		}
	}
	target, err := e.insertBacklog(ctx, b.cfg.Rows, b.cfg.TxSize)
	if err != nil {
		return nil, err
	}
	if err := e.settle(ctx); err != nil {
		return nil, err
	}
	if backfill {
		exists, err := e.slotExists(ctx)
		if err != nil {
			return nil, err
		}
		if exists {
			return nil, fmt.Errorf("replication slot %s exists before the backfill start", e.Slot)
		}
	}

	meter := &cpuMeter{}
	c0 := meter.sample()
	s, err := startStreamer(b.cfg.Streamer, e.streamerEnv(extra...), b.logPath(key))
	if err != nil {
		return nil, err
	}
	defer s.Stop(stopTimeout) //nolint:errcheck // stopped explicitly below; this is for early returns
	meter.streamerPID = s.Pid()
	e.watch = s.err
	if err := e.waitCH(ctx, uint64(b.cfg.Rows), b.cfg.Timeout); err != nil {
		return nil, err
	}
	if err := e.waitProcessed(ctx, b.cfg.Timeout); err != nil {
		return nil, err
	}
	use := meter.sample().since(c0)
	if err := e.waitConfirmed(ctx, target, b.cfg.Timeout); err != nil {
		return nil, err
	}
	ackedAt := time.Now()
	done, err := e.lastProcessed(ctx)
	if err != nil {
		return nil, err
	}
	_, hwm, _ := s.memStatus()
	var backfilled float64
	var backfillDone time.Time
	if backfill {
		// The rows must have gone the backfill's way: the binary's own count of
		// the rows it backfilled (the stream never carried them), in its
		// metrics a moment after its last page commits; read before the
		// binary stops.
		var ok bool
		backfilled, backfillDone, ok = s.backfilled()
		for wait := time.Now().Add(10 * time.Second); !ok && time.Now().Before(wait); {
			time.Sleep(50 * time.Millisecond)
			backfilled, backfillDone, ok = s.backfilled()
		}
		if !ok {
			return nil, fmt.Errorf("the streamer's metrics at %s show no finished backfill; log %s", s.metricsAddr, s.logPath)
		}
		if int(backfilled) != b.cfg.Rows {
			return nil, fmt.Errorf("the streamer backfilled %.0f rows, want %d; log %s", backfilled, b.cfg.Rows, s.logPath)
		}
	}
	verr, err := e.stopAndVerify(ctx, s, int64(b.cfg.Rows))
	if err != nil {
		return nil, err
	}
	took := done.Sub(s.Started)
	if took <= 0 {
		return nil, fmt.Errorf("last row processed at %s, before the streamer started at %s", done, s.Started)
	}
	b.note(key, use)
	m := map[string]float64{
		"rows":             float64(b.cfg.Rows),
		"seconds":          took.Seconds(),
		"rows_per_s":       float64(b.cfg.Rows) / took.Seconds(),
		"ack_after_done_s": ackedAt.Sub(done).Seconds(),
		"peak_rss_mib":     float64(hwm) / (1 << 20),
	}
	if n, err := e.chInserts(ctx); err == nil && n > 0 {
		m["ch_inserts"] = float64(n)
		m["rows_per_insert"] = float64(b.cfg.Rows) / float64(n)
	}
	if at, ok := s.streamingAt(); ok {
		m["startup_s"] = at.Sub(s.Started).Seconds()
		if d := done.Sub(at); d > 0 {
			m["rows_per_s_from_streaming"] = float64(b.cfg.Rows) / d.Seconds()
		}
	}
	if backfill {
		m["backfilled_rows"] = backfilled
		m["backfill_done_s"] = backfillDone.Sub(s.Started).Seconds()
	}
	return m, verr
}

// stopAndVerify stops the streamer and checks what it delivered. An error it
// returns voids the run; verr (rows left unprocessed, the delivery itself
// complete) keeps the run's figures and is reported beside them.
func (e *dbEnv) stopAndVerify(ctx context.Context, s *streamer, rows int64) (verr, err error) {
	e.watch = nil
	if err := s.Stop(stopTimeout); err != nil {
		return nil, err
	}
	verr = e.verifyDelivered(ctx, rows, nil)
	if verr != nil && !isUnprocessed(verr) {
		return nil, verr
	}
	return verr, nil
}

// liveProducer is d's producer (also the peer's live load): Rows events by
// COPY in transactions of TxSize, as fast as it goes; it returns when it
// started and ended.
func liveProducer(ctx context.Context, b *bench, e *dbEnv) (start, end time.Time, err error) {
	start = time.Now()
	st, err := loadgen.Run(ctx, e.Pool, loadgen.Config{
		Copy: true, TxSize: b.cfg.TxSize, Rate: 0, Count: int64(b.cfg.Rows), Connections: b.cfg.LiveConns,
		Seed: 1, Environment: "bench",
	}, nil)
	end = time.Now()
	if err != nil {
		return start, end, fmt.Errorf("producer: %w", err)
	}
	if st.Committed != int64(b.cfg.Rows) {
		return start, end, fmt.Errorf("producer committed %d events, want %d", st.Committed, b.cfg.Rows)
	}
	return start, end, nil
}

// runLive is scenario d: the streamer runs while loadgen commits Rows events as
// fast as it can (COPY, transactions of TxSize, LiveConns connections).
func runLive(ctx context.Context, b *bench) (map[string]float64, error) {
	e, err := newEnv(ctx, b.srv)
	if err != nil {
		return nil, err
	}
	defer e.close()
	s, err := b.startStreaming(ctx, e, "d")
	if err != nil {
		return nil, err
	}
	defer s.Stop(stopTimeout) //nolint:errcheck // stopped explicitly below; this is for early returns
	meter := &cpuMeter{streamerPID: s.Pid()}
	c0 := meter.sample()
	pstart, pend, err := liveProducer(ctx, b, e)
	if err != nil {
		return nil, err
	}
	target, err := e.currentWAL(ctx)
	if err != nil {
		return nil, err
	}
	if err := e.waitCH(ctx, uint64(b.cfg.Rows), b.cfg.Timeout); err != nil {
		return nil, err
	}
	use := meter.sample().since(c0)
	if err := e.waitConfirmed(ctx, target, b.cfg.Timeout); err != nil {
		return nil, err
	}
	last, err := e.lastInserted(ctx)
	if err != nil {
		return nil, err
	}
	verr, err := e.stopAndVerify(ctx, s, int64(b.cfg.Rows))
	if err != nil {
		return nil, err
	}
	b.note("d", use)
	n := float64(b.cfg.Rows)
	inserts, _ := e.chInserts(ctx)
	return map[string]float64{
		"ch_inserts":            float64(inserts),
		"rows":                  n,
		"producer_seconds":      pend.Sub(pstart).Seconds(),
		"producer_rows_per_s":   n / pend.Sub(pstart).Seconds(),
		"delivery_seconds":      last.Sub(pstart).Seconds(),
		"delivery_rows_per_s":   n / last.Sub(pstart).Seconds(),
		"tail_after_producer_s": last.Sub(pend).Seconds(),
	}, verr
}

// commitRec is a committed event and when its transaction's COMMIT returned.
type commitRec struct {
	id int64
	at time.Time
}

// latencySQL inserts $3 events in one statement, which is its own transaction
// (autocommit): the statement's result arriving means the commit is done.
const latencySQL = `INSERT INTO event_outbox (event_type, event_date_time, environment, event_context, metadata_version)
	SELECT 'latency.probe', now() AT TIME ZONE 'UTC', 'bench',
	       jsonb_build_object('worker', $1::int, 'seq', $2::bigint + g, 'user_id', (($2::bigint + g) * 7919) % 100000), 1
	FROM generate_series(1, $3::int) AS g
	RETURNING id`

// latencyProducer commits transactions of txSize events at rate events/s for dur,
// from workers connections sharing one schedule, and records each event's commit
// time (when the statement's result arrived). lateMax is how far behind schedule
// the producer fell at worst.
func latencyProducer(ctx context.Context, pool *pgxpool.Pool, rate float64, txSize, workers int, dur time.Duration) (recs []commitRec, lateMax time.Duration, err error) {
	var (
		mu   sync.Mutex
		next = time.Now()
		end  = next.Add(dur)
		step = time.Duration(float64(txSize) / rate * float64(time.Second))
		seq  int64
		wg   sync.WaitGroup
		errs = make([]error, workers)
		out  = make([][]commitRec, workers)
	)
	for w := range workers {
		wg.Go(func() {
			for ctx.Err() == nil {
				mu.Lock()
				at := next
				next = next.Add(step)
				first := seq
				seq += int64(txSize)
				mu.Unlock()
				if !at.Before(end) {
					return
				}
				if d := time.Until(at); d > 0 {
					time.Sleep(d)
				} else {
					mu.Lock()
					lateMax = max(lateMax, -d)
					mu.Unlock()
				}
				rows, err := pool.Query(ctx, latencySQL, w, first, txSize)
				if err != nil {
					errs[w] = err
					return
				}
				var ids []int64
				for rows.Next() {
					var id int64
					if err := rows.Scan(&id); err != nil {
						errs[w] = err
						rows.Close()
						return
					}
					ids = append(ids, id)
				}
				rows.Close()
				committed := time.Now()
				if err := rows.Err(); err != nil {
					errs[w] = err
					return
				}
				for _, id := range ids {
					out[w] = append(out[w], commitRec{id: id, at: committed})
				}
			}
		})
	}
	wg.Wait()
	for w := range workers {
		if errs[w] != nil {
			return nil, lateMax, errs[w]
		}
		recs = append(recs, out[w]...)
	}
	return recs, lateMax, nil
}

// chWatcher polls ClickHouse for newly visible events and records when each was
// first seen. The writer inserts batches one after another in commit order, so a
// poll for commit_lsn >= the highest seen so far returns everything new (and the
// few already-seen rows of a transaction split across two inserts).
//
// query, when set, replaces that poll: it selects (id, key) rows whose key is at
// least its one parameter, the highest key seen minus margin (for a table whose key
// is not in commit order but close to it).
type chWatcher struct {
	e        *dbEnv
	interval time.Duration
	query    string
	margin   uint64
	// tolerate, when set, names errors after which polling goes on (the
	// peer's engine swaps its table while it settles: UNKNOWN_TABLE).
	tolerate func(error) bool
	mu       sync.Mutex
	seen     map[int64]time.Time
	polls    int
	slowest  time.Duration
	err      error
}

func (w *chWatcher) run(ctx context.Context) {
	var maxKey uint64
	query := w.query
	if query == "" {
		query = "SELECT event_id, commit_lsn FROM " + w.e.Table + " WHERE commit_lsn >= ?"
	}
	t := time.NewTicker(w.interval)
	defer t.Stop()
	for {
		issued := time.Now()
		rows, err := w.e.CH.Query(ctx, query, maxKey-min(maxKey, w.margin))
		if err != nil && w.tolerate != nil && w.tolerate(err) && ctx.Err() == nil {
			select { // not visible this time: the events are seen by a later poll
			case <-ctx.Done():
				return
			case <-t.C:
				continue
			}
		}
		if err != nil {
			if ctx.Err() == nil {
				w.mu.Lock()
				w.err = err
				w.mu.Unlock()
			}
			return
		}
		w.mu.Lock()
		for rows.Next() {
			var id, key uint64
			if err := rows.Scan(&id, &key); err != nil {
				w.err = err
				break
			}
			if _, ok := w.seen[int64(id)]; !ok {
				w.seen[int64(id)] = issued
			}
			maxKey = max(maxKey, key)
		}
		w.polls++
		w.slowest = max(w.slowest, time.Since(issued))
		w.mu.Unlock()
		rows.Close()
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// runLatency is scenario e: a paced producer while the streamer runs. An event's
// latency is measured from the time its COMMIT returned to the producer to
//   - the first poll of ClickHouse (every LatencyPoll) that saw it: the time the
//     poll was issued, so never earlier than the row became visible and at most one
//     interval plus a query later (the table's figures), and
//   - ClickHouse's inserted_at, now64(6) of the INSERT that carried it, which is
//     when that INSERT query started — before its data was even sent, so it misses
//     the insert's own duration (a lower bound).
//
// Both clocks are this machine's.
func runLatency(ctx context.Context, b *bench) (map[string]float64, error) {
	return runLatencyWith(ctx, b, "e", false)
}

// runLatencyRetention is scenario er: e with OUTBOX_RETENTION=10s and the sweep
// (which prunes after each pass) every 2 s, to show what pruning costs the stream
// and what it saves in table size.
func runLatencyRetention(ctx context.Context, b *bench) (map[string]float64, error) {
	return runLatencyWith(ctx, b, "er", true, "OUTBOX_RETENTION=10s", "EVENT_PROCESSING_INTERVAL=2")
}

func runLatencyWith(ctx context.Context, b *bench, key string, pruned bool, extra ...string) (map[string]float64, error) {
	e, err := newEnv(ctx, b.srv)
	if err != nil {
		return nil, err
	}
	defer e.close()
	s, err := b.startStreaming(ctx, e, key, extra...)
	if err != nil {
		return nil, err
	}
	defer s.Stop(stopTimeout) //nolint:errcheck // stopped explicitly below; this is for early returns
	w := &chWatcher{e: e, interval: b.cfg.LatencyPoll, seen: map[int64]time.Time{}}
	wctx, stopWatch := context.WithCancel(ctx)
	watchDone := make(chan struct{})
	go func() { defer close(watchDone); w.run(wctx) }()
	defer func() { stopWatch(); <-watchDone }()

	meter := &cpuMeter{streamerPID: s.Pid()}
	c0 := meter.sample()
	pstart := time.Now()
	recs, lateMax, err := latencyProducer(ctx, e.Pool, b.cfg.LatencyRate, b.cfg.LatencyTx, b.cfg.LatencyWorkers, b.cfg.LatencyDuration)
	pend := time.Now()
	if err != nil {
		return nil, fmt.Errorf("latency producer: %w", err)
	}
	target, err := e.currentWAL(ctx)
	if err != nil {
		return nil, err
	}
	if err := e.waitCH(ctx, uint64(len(recs)), b.cfg.Timeout); err != nil {
		return nil, err
	}
	use := meter.sample().since(c0)
	if err := poll(ctx, time.Minute, 10*time.Millisecond, "the watcher to see every event", func() (bool, error) {
		w.mu.Lock()
		defer w.mu.Unlock()
		return len(w.seen) >= len(recs), w.err
	}); err != nil {
		return nil, err
	}
	stopWatch()
	<-watchDone
	if err := e.waitConfirmed(ctx, target, b.cfg.Timeout); err != nil {
		return nil, err
	}
	e.watch = nil
	if err := s.Stop(stopTimeout); err != nil {
		return nil, err
	}
	committed := make(map[int64]time.Time, len(recs))
	for _, r := range recs {
		committed[r.id] = r.at
	}
	// The outbox's size at the end of the load (heap, indexes, TOAST).
	var outboxBytes, outboxRows int64
	if err := e.Pool.QueryRow(ctx, "SELECT pg_total_relation_size('event_outbox'), (SELECT count(*) FROM event_outbox)").Scan(&outboxBytes, &outboxRows); err != nil {
		return nil, err
	}
	var verr error
	if pruned {
		// The outbox let pruned rows go: check ClickHouse alone (every event
		// once; the loop below checks each id was committed).
		var c, u uint64
		if err := e.CH.QueryRow(ctx, "SELECT count(), uniqExact(event_id) FROM "+e.Table).Scan(&c, &u); err != nil {
			return nil, err
		}
		if c != uint64(len(recs)) || u != c {
			return nil, fmt.Errorf("ClickHouse holds count=%d uniq=%d, want %d events once", c, u, len(recs))
		}
	} else if verr = e.verifyDelivered(ctx, int64(len(recs)), committed); verr != nil && !isUnprocessed(verr) {
		return nil, verr
	}
	rows, err := e.CH.Query(ctx, "SELECT event_id, inserted_at FROM "+e.Table)
	if err != nil {
		return nil, err
	}
	seenLat := make([]float64, 0, len(recs))
	insLat := make([]float64, 0, len(recs))
	for rows.Next() {
		var id uint64
		var at time.Time
		if err := rows.Scan(&id, &at); err != nil {
			rows.Close()
			return nil, err
		}
		c, ok := committed[int64(id)]
		if !ok {
			rows.Close()
			return nil, fmt.Errorf("event %d in ClickHouse was not committed by the producer", id)
		}
		insLat = append(insLat, at.Sub(c).Seconds()*1000)
		seenLat = append(seenLat, w.seen[int64(id)].Sub(c).Seconds()*1000)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, err
	}
	if len(insLat) != len(recs) {
		return nil, fmt.Errorf("%d latencies for %d events", len(insLat), len(recs))
	}
	inserts, err := e.chInserts(ctx)
	if err != nil {
		return nil, err
	}
	sort.Float64s(seenLat)
	sort.Float64s(insLat)
	b.note(key, use)
	return map[string]float64{
		"outbox_mib":           float64(outboxBytes) / (1 << 20),
		"outbox_rows":          float64(outboxRows),
		"events":               float64(len(recs)),
		"producer_rate":        float64(len(recs)) / pend.Sub(pstart).Seconds(),
		"producer_late_max_ms": lateMax.Seconds() * 1000,
		"p50_ms":               percentile(seenLat, 50),
		"p95_ms":               percentile(seenLat, 95),
		"p99_ms":               percentile(seenLat, 99),
		"max_ms":               seenLat[len(seenLat)-1],
		"min_ms":               seenLat[0],
		"inserted_at_p50_ms":   percentile(insLat, 50),
		"inserted_at_p95_ms":   percentile(insLat, 95),
		"inserted_at_p99_ms":   percentile(insLat, 99),
		"inserted_at_max_ms":   insLat[len(insLat)-1],
		"poll_interval_ms":     b.cfg.LatencyPoll.Seconds() * 1000,
		"polls":                float64(w.polls),
		"slowest_poll_ms":      w.slowest.Seconds() * 1000,
		"ch_inserts":           float64(inserts),
		"rows_per_insert":      float64(len(recs)) / float64(max(inserts, 1)),
	}, verr
}

// percentile is the nearest-rank percentile of sorted values.
func percentile(sorted []float64, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	rank := int(float64(len(sorted))*p/100+0.999999) - 1
	return sorted[min(max(rank, 0), len(sorted)-1)]
}

// runMemory is scenario f: the streamer's peak resident set (VmHWM) through one
// transaction of BigTx rows, committed while it streams, and how long after its
// commit the whole transaction was in ClickHouse (ch_visible_s) and processed in
// the outbox (delivery_seconds).
//
// f streams the transaction before its commit (protocol 2, the default on
// PostgreSQL 14+); f1 is the same with REPLICATION_STREAMING=off (protocol 1).
// Both report what PostgreSQL spilled to its own disk and streamed
// (pg_stat_replication_slots) and the streamer's own spill at its largest.
func runMemory(ctx context.Context, b *bench, key string, extra ...string) (map[string]float64, error) {
	e, err := newEnv(ctx, b.srv)
	if err != nil {
		return nil, err
	}
	defer e.close()
	s, spillDir, cleanup, err := b.startWithSpill(ctx, e, key, extra...)
	if err != nil {
		return nil, err
	}
	defer cleanup()
	idleRSS, _, err := s.memStatus()
	if err != nil {
		return nil, err
	}
	smp := sampleStreamer(s, spillDir)
	meter := &cpuMeter{streamerPID: s.Pid()}
	c0 := meter.sample()
	t0 := time.Now()
	if _, err := e.Pool.Exec(ctx, backlogSQL, b.cfg.BigTx, 0); err != nil {
		smp.finish()
		return nil, fmt.Errorf("insert the big transaction: %w", err)
	}
	committed := time.Now()
	target, err := e.currentWAL(ctx)
	var visible time.Time
	if err == nil {
		// waitCH returns after the count that saw the last row came back (polls
		// every 20 ms): an upper bound of when the transaction was all visible.
		err = e.waitCH(ctx, uint64(b.cfg.BigTx), b.cfg.Timeout)
		visible = time.Now()
	}
	if err == nil {
		err = e.waitConfirmed(ctx, target, b.cfg.Timeout)
	}
	smp.finish()
	if err != nil {
		return nil, err
	}
	use := meter.sample().since(c0)
	last, err := e.lastProcessed(ctx)
	if err != nil {
		return nil, err
	}
	_, hwm, err := s.memStatus()
	if err != nil {
		return nil, err
	}
	// The walsender reports its counters after each decoded transaction.
	spillBytes, streamBytes, err := e.slotStreamStats(ctx)
	if err != nil {
		return nil, err
	}
	verr, err := e.stopAndVerify(ctx, s, int64(b.cfg.BigTx))
	if err != nil {
		return nil, err
	}
	b.note(key, use)
	inserts, _ := e.chInserts(ctx)
	const mib = 1 << 20
	return map[string]float64{
		"rows":                float64(b.cfg.BigTx),
		"peak_rss_mib":        float64(hwm) / mib,
		"sampled_max_rss_mib": float64(smp.maxRSS) / mib,
		"idle_rss_mib":        float64(idleRSS) / mib,
		"insert_seconds":      committed.Sub(t0).Seconds(),
		"delivery_seconds":    last.Sub(committed).Seconds(),
		"ch_visible_s":        visible.Sub(committed).Seconds(),
		"ch_inserts":          float64(inserts),
		"pg_spill_mib":        float64(spillBytes) / mib,
		"pg_stream_mib":       float64(streamBytes) / mib,
		"local_spill_mib":     float64(smp.maxSpill) / mib,
	}, verr
}

// startWithSpill starts the binary on e with STREAM_SPILL_DIR in a directory
// of its own, so that the spill's size can be sampled; cleanup stops the
// binary (for early returns; callers stop it themselves) and removes the
// directory.
func (b *bench) startWithSpill(ctx context.Context, e *dbEnv, key string, extra ...string) (*streamer, string, func(), error) {
	dir, err := os.MkdirTemp("", "outbox-bench-spill-")
	if err != nil {
		return nil, "", nil, err
	}
	s, err := b.startStreaming(ctx, e, key, append([]string{"STREAM_SPILL_DIR=" + dir}, extra...)...)
	if err != nil {
		os.RemoveAll(dir)
		return nil, "", nil, err
	}
	return s, dir, func() { _ = s.Stop(stopTimeout); os.RemoveAll(dir) }, nil
}

// streamerSampler records, every 50 ms until finish, the streamer's largest
// resident set (current and VmHWM) and its spill directory's largest size.
type streamerSampler struct {
	maxRSS, maxHWM, maxSpill int64
	stop, done               chan struct{}
}

func sampleStreamer(s *streamer, spillDir string) *streamerSampler {
	p := &streamerSampler{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(p.done)
		t := time.NewTicker(50 * time.Millisecond)
		defer t.Stop()
		for {
			if rss, hwm, err := s.memStatus(); err == nil {
				p.maxRSS, p.maxHWM = max(p.maxRSS, rss), max(p.maxHWM, hwm)
			}
			p.maxSpill = max(p.maxSpill, dirBytes(spillDir))
			select {
			case <-p.stop:
				return
			case <-t.C:
			}
		}
	}()
	return p
}

// finish stops the sampling; the maxima may be read after it.
func (p *streamerSampler) finish() {
	close(p.stop)
	<-p.done
}

// slotStreamStats reads what PostgreSQL spilled to its own disk and streamed
// before commit for e's slot (pg_stat_replication_slots; the walsender
// reports after each decoded transaction).
func (e *dbEnv) slotStreamStats(ctx context.Context) (spillBytes, streamBytes int64, err error) {
	err = e.Pool.QueryRow(ctx, `SELECT spill_bytes, stream_bytes FROM pg_stat_replication_slots WHERE slot_name = $1`, e.Slot).
		Scan(&spillBytes, &streamBytes)
	if err != nil {
		err = fmt.Errorf("read pg_stat_replication_slots: %w", err)
	}
	return spillBytes, streamBytes, err
}

// dirBytes is the size of the files directly in dir (0 when it is missing).
func dirBytes(dir string) int64 {
	entries, _ := os.ReadDir(dir)
	var n int64
	for _, en := range entries {
		if info, err := en.Info(); err == nil && !info.IsDir() {
			n += info.Size()
		}
	}
	return n
}

// runMixed is scenario m (protocol 2, the default) and m1 (protocol 1): a
// paced producer of small transactions (e's, at MixedRate events/s for
// LatencyDuration) with one transaction of MixedBigTx rows committed in the
// middle. It reports what the big transaction cost the primary (spill and
// stream bytes) and the streamer (peak RSS, its spill at its largest), how
// long after its commit it was all in ClickHouse, and the small events'
// latency (commit to inserted_at, a lower bound) over the whole run: with
// protocol 1 the walsender decodes the big transaction at its commit, and
// every small one behind it waits.
func runMixed(ctx context.Context, b *bench, key string, extra ...string) (map[string]float64, error) {
	e, err := newEnv(ctx, b.srv)
	if err != nil {
		return nil, err
	}
	defer e.close()
	s, spillDir, cleanup, err := b.startWithSpill(ctx, e, key, extra...)
	if err != nil {
		return nil, err
	}
	defer cleanup()
	smp := sampleStreamer(s, spillDir)
	type produced struct {
		recs []commitRec
		err  error
	}
	small := make(chan produced, 1)
	go func() {
		recs, _, err := latencyProducer(ctx, e.Pool, b.cfg.MixedRate, b.cfg.LatencyTx, b.cfg.LatencyWorkers, b.cfg.LatencyDuration)
		small <- produced{recs, err}
	}()
	// The big transaction in the middle of the small ones.
	time.Sleep(b.cfg.LatencyDuration / 4)
	if _, err := e.Pool.Exec(ctx, backlogSQL, b.cfg.MixedBigTx, 0); err != nil {
		smp.finish()
		return nil, fmt.Errorf("insert the big transaction: %w", err)
	}
	committed := time.Now()
	var bigVisible time.Duration
	err = poll(ctx, b.cfg.Timeout, 20*time.Millisecond, "the big transaction in ClickHouse", func() (bool, error) {
		var n uint64
		if err := e.CH.QueryRow(ctx, "SELECT count() FROM "+e.Table+" WHERE event_type != 'latency.probe'").Scan(&n); err != nil {
			return false, err
		}
		bigVisible = time.Since(committed)
		return n >= uint64(b.cfg.MixedBigTx), nil
	})
	p := <-small
	if err == nil {
		err = p.err
	}
	if err == nil {
		err = e.waitCH(ctx, uint64(b.cfg.MixedBigTx+len(p.recs)), b.cfg.Timeout)
	}
	smp.finish()
	if err != nil {
		return nil, err
	}
	spillBytes, streamBytes, err := e.slotStreamStats(ctx)
	if err != nil {
		return nil, err
	}
	verr, err := e.stopAndVerify(ctx, s, int64(b.cfg.MixedBigTx+len(p.recs)))
	if err != nil {
		return nil, err
	}
	committedAt := make(map[int64]time.Time, len(p.recs))
	for _, r := range p.recs {
		committedAt[r.id] = r.at
	}
	rows, err := e.CH.Query(ctx, "SELECT event_id, inserted_at FROM "+e.Table+" WHERE event_type = 'latency.probe'")
	if err != nil {
		return nil, err
	}
	var lat []float64
	for rows.Next() {
		var id uint64
		var at time.Time
		if err := rows.Scan(&id, &at); err != nil {
			rows.Close()
			return nil, err
		}
		if c, ok := committedAt[int64(id)]; ok {
			lat = append(lat, at.Sub(c).Seconds()*1000)
		}
	}
	rows.Close()
	sort.Float64s(lat)
	const mib = 1 << 20
	return map[string]float64{
		"small_events":     float64(len(lat)),
		"big_rows":         float64(b.cfg.MixedBigTx),
		"big_ch_visible_s": bigVisible.Seconds(),
		"small_p50_ms":     percentile(lat, 50),
		"small_p99_ms":     percentile(lat, 99),
		"small_max_ms":     percentile(lat, 100),
		"peak_rss_mib":     float64(smp.maxHWM) / mib,
		"pg_spill_mib":     float64(spillBytes) / mib,
		"pg_stream_mib":    float64(streamBytes) / mib,
		"local_spill_mib":  float64(smp.maxSpill) / mib,
	}, verr
}
