package verify_test

import (
	"context"
	"fmt"
	"math/big"
	"os"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/fixture"
	"github.com/outbox-streamer/outbox-streamer/internal/harness/testenv"
	"github.com/outbox-streamer/outbox-streamer/internal/outboxstore"
	"github.com/outbox-streamer/outbox-streamer/internal/record"
	"github.com/outbox-streamer/outbox-streamer/internal/sweep"
	"github.com/outbox-streamer/outbox-streamer/internal/verify"
	"github.com/outbox-streamer/outbox-streamer/sink"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// verifyFixture is one test's databases, a ClickHouse writer on them and the
// outbox's time zone.
type verifyFixture struct {
	e   *fixture.Env
	w   *sink.Client
	loc *time.Location
}

func newFixture(t *testing.T, srv testenv.CHServer, loc *time.Location) *verifyFixture {
	t.Helper()
	e := fixture.New(t, srv)
	w, err := sink.Open(context.Background(), e.Sink, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { w.Close() })
	if loc == nil {
		loc = time.UTC
	}
	return &verifyFixture{e: e, w: w, loc: loc}
}

// ev is an outbox row to set up: created_at and event_date_time as the
// table holds them (wall clock in the fixture's zone, UTC-located), its
// status, and how many rows ClickHouse gets for it.
type ev struct {
	created, at time.Time
	status      string
	copies      int
}

// wall is a wall clock value as the outbox holds it.
func wall(y int, mo time.Month, d, h, mi, s, us int) time.Time {
	return time.Date(y, mo, d, h, mi, s, us*1000, time.UTC)
}

// instant reads a wall clock value in loc, as the streamer does.
func instant(w time.Time, loc *time.Location) time.Time {
	return time.Date(w.Year(), w.Month(), w.Day(), w.Hour(), w.Minute(), w.Second(), w.Nanosecond(), loc).UTC()
}

// put inserts the rows into the outbox and, converted as the streamer
// converts them, into ClickHouse through the sink; it returns their ids.
func (f *verifyFixture) put(t *testing.T, evs []ev) []int64 {
	t.Helper()
	ctx := context.Background()
	ids := make([]int64, len(evs))
	f.e.InsertTx(t, func(tx pgx.Tx) error {
		for i, e := range evs {
			if err := tx.QueryRow(ctx, `INSERT INTO event_outbox (event_type, event_date_time, created_at, status)
				VALUES ('verify.test', $1, $2, $3) RETURNING id`, e.at, e.created, e.status).Scan(&ids[i]); err != nil {
				return err
			}
		}
		return nil
	})
	for copy := 1; ; copy++ {
		var batch []record.Event
		for i, e := range evs {
			if e.copies >= copy {
				batch = append(batch, record.Event{ID: ids[i], Type: "verify.test", Time: instant(e.at, f.loc), Context: "{}",
					MetadataVersion: 1, CreatedAt: instant(e.created, f.loc)})
			}
		}
		if len(batch) == 0 {
			return ids
		}
		// A new attempt per copy: the server must not drop the second one
		// as a retry of the first.
		if err := f.w.Insert(sink.WithInsertAttempt(ctx, sink.NewAttempt()), batch); err != nil {
			t.Fatal(err)
		}
	}
}

// series is n processed rows, one every step from start, each in ClickHouse once.
func series(start time.Time, step time.Duration, n int) []ev {
	out := make([]ev, n)
	for i := range out {
		at := start.Add(time.Duration(i) * step)
		out[i] = ev{created: at, at: at, status: "processed", copies: 1}
	}
	return out
}

func (f *verifyFixture) verify(t *testing.T, cfg verify.Config) *verify.Report {
	t.Helper()
	cfg.TimeZone = f.loc
	rep, err := verify.Run(context.Background(), cfg, f.e.Pool, f.w)
	if err != nil {
		t.Fatalf("verify: %v%s", err, testenv.CrashNote())
	}
	return rep
}

// deleteFromClickHouse deletes an event from the event table (a mutation,
// which needs merges running: they are stopped again afterwards).
func (f *verifyFixture) deleteFromClickHouse(t *testing.T, id int64) {
	t.Helper()
	ctx := context.Background()
	if err := f.e.CHConn.Exec(ctx, "SYSTEM START MERGES "+f.e.Table); err != nil {
		t.Fatal(err)
	}
	if err := f.e.CHConn.Exec(ctx, fmt.Sprintf("ALTER TABLE %s DELETE WHERE event_id = %d", f.e.Table, id)); err != nil {
		t.Fatal(err)
	}
	fixture.WaitFor(t, time.Minute, fmt.Sprintf("event %d deleted from ClickHouse", id), func() bool {
		var n uint64
		if err := f.e.CHConn.QueryRow(ctx, fmt.Sprintf("SELECT count() FROM %s WHERE event_id = %d", f.e.Table, id)).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n == 0
	})
	f.e.StopMerges(t)
}

func (f *verifyFixture) copies(t *testing.T, id int64) uint64 {
	t.Helper()
	var n uint64
	if err := f.e.CHConn.QueryRow(context.Background(), fmt.Sprintf("SELECT count() FROM %s WHERE event_id = %d", f.e.Table, id)).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// bucketAt finds the report's bucket starting at start.
func bucketAt(t *testing.T, rep *verify.Report, start time.Time) verify.Bucket {
	t.Helper()
	for _, b := range rep.Buckets {
		if b.Start.Equal(start) {
			return b
		}
	}
	t.Fatalf("no bucket at %s in %+v", start, rep.Buckets)
	return verify.Bucket{}
}

func missingIDs(rep *verify.Report) []int64 {
	var ids []int64
	for _, b := range rep.Buckets {
		if b.Missing != nil {
			ids = append(ids, b.Missing.IDs...)
		}
	}
	return ids
}

// TestCleanAfterStreaming: events streamed by the real pipeline verify clean
// (every bucket's checksums equal) on both ClickHouse versions.
func TestCleanAfterStreaming(t *testing.T) {
	for _, srv := range testenv.ClickHouseServers(t) {
		t.Run(srv.Name, func(t *testing.T) {
			f := newFixture(t, srv, nil)
			f.e.StartPipeline(t)
			for range 3 {
				f.e.Insert(t, 700, false)
			}
			f.e.AssertExactlyDelivered(t, time.Minute, f.e.CurrentWAL(t))
			rep := f.verify(t, verify.Config{})
			if !rep.Match || rep.Totals.Outbox != 2100 || rep.Totals.ClickHouse != 2100 || rep.Totals.Differing != 0 {
				t.Fatalf("verify after streaming: %+v", rep.Totals)
			}
			for _, b := range rep.Buckets {
				if b.Status != verify.StatusMatch || b.IDsCompared {
					t.Errorf("bucket %s: %s (ids compared %v)", b.Start, b.Status, b.IDsCompared)
				}
			}
			if rep.Cost.OutboxStatements == 0 || rep.Cost.ClickHouseQuery != 1 {
				t.Errorf("cost %+v: want outbox statements and one ClickHouse query", rep.Cost)
			}
		})
	}
}

func sweepOnce(t *testing.T, f *verifyFixture) sweep.Result {
	t.Helper()
	log := zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel))
	s := sweep.New(sweep.Config{BatchSize: 100, TimeZone: f.loc}, f.e.Pool, f.w, outboxstore.New(f.e.Pool, outboxstore.RetryConfig{}), log)
	res, err := s.Run(context.Background())
	if err != nil {
		t.Fatalf("sweep: %v", err)
	}
	return res
}

// TestMissingRowReportedAndRepaired: a row deleted from ClickHouse is
// reported with its id in its bucket; --repair hands it to the sweep, which
// delivers it exactly once, and verify is clean again.
func TestMissingRowReportedAndRepaired(t *testing.T) {
	for _, srv := range testenv.ClickHouseServers(t) {
		t.Run(srv.Name, func(t *testing.T) {
			f := newFixture(t, srv, nil)
			start := wall(2026, 11, 5, 10, 0, 0, 0)
			ids := f.put(t, series(start, 36*time.Second, 300)) // three hours
			gone := ids[150]                                    // 11:30
			f.deleteFromClickHouse(t, gone)
			cfg := verify.Config{From: start, Until: start.Add(3 * time.Hour)}

			rep := f.verify(t, cfg)
			if rep.Match || rep.Totals.Differing != 1 || rep.Totals.Missing != 1 || !reflect.DeepEqual(missingIDs(rep), []int64{gone}) {
				t.Fatalf("verify after a delete in ClickHouse: match %v, totals %+v, missing %v", rep.Match, rep.Totals, missingIDs(rep))
			}
			if b := bucketAt(t, rep, start.Add(time.Hour)); b.Status != verify.StatusDiffers || b.Outbox != 100 || b.ClickHouse != 99 {
				t.Fatalf("bucket of the deleted row: %+v", b)
			}
			for _, h := range []time.Duration{0, 2 * time.Hour} {
				if b := bucketAt(t, rep, start.Add(h)); b.Status != verify.StatusMatch {
					t.Errorf("bucket %s: %s", b.Start, b.Status)
				}
			}

			if err := verify.Repair(context.Background(), f.e.Pool, outboxstore.Name{}, rep, 10); err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(rep.Repair.Requeued.IDs, []int64{gone}) || rep.Repair.Skipped.Count != 0 {
				t.Fatalf("repair: %+v", rep.Repair)
			}
			var status, reason string
			var attempts int
			var due bool
			if err := f.e.Pool.QueryRow(context.Background(), `SELECT status, attempts, last_error, next_attempt_at <= now() FROM event_outbox WHERE id = $1`, gone).
				Scan(&status, &attempts, &reason, &due); err != nil {
				t.Fatal(err)
			}
			if status != "failed" || attempts != 0 || reason != outboxstore.MissingReason || !due {
				t.Fatalf("repaired row: status %s, attempts %d, last_error %q, due %v", status, attempts, reason, due)
			}
			// The other rows are untouched: still processed.
			if c := f.e.StatusCounts(t); c["processed"] != 299 || c["failed"] != 1 {
				t.Fatalf("statuses after repair: %v", c)
			}

			if res := sweepOnce(t, f); res.Delivered != 1 || res.AlreadyPresent != 0 {
				t.Fatalf("sweep after repair: %+v, want the one row delivered", res)
			}
			if res := sweepOnce(t, f); res.Delivered+res.AlreadyPresent != 0 {
				t.Fatalf("second sweep: %+v, want nothing to do", res)
			}
			if n := f.copies(t, gone); n != 1 {
				t.Fatalf("ClickHouse holds %d rows of event %d after the sweep, want 1", n, gone)
			}
			if rep := f.verify(t, cfg); !rep.Match || rep.Totals.Outbox != 300 || rep.Totals.ClickHouse != 300 {
				t.Fatalf("verify after repair and sweep: match %v, %+v", rep.Match, rep.Totals)
			}
		})
	}
}

// TestRepairDoesNotDuplicate: a repair of a row that ClickHouse holds after
// all (here: inserted back between verify and the sweep) ends with one row,
// because the sweep looks the row up first.
func TestRepairDoesNotDuplicate(t *testing.T) {
	f := newFixture(t, testenv.ModernClickHouse(t), nil)
	start := wall(2026, 11, 5, 10, 0, 0, 0)
	ids := f.put(t, series(start, time.Minute, 30))
	f.deleteFromClickHouse(t, ids[3])
	rep := f.verify(t, verify.Config{From: start, Until: start.Add(time.Hour)})
	if err := verify.Repair(context.Background(), f.e.Pool, outboxstore.Name{}, rep, 10); err != nil {
		t.Fatal(err)
	}
	if rep.Repair.Requeued.Count != 1 {
		t.Fatalf("repair: %+v", rep.Repair)
	}
	at := start.Add(3 * time.Minute)
	if err := f.w.Insert(context.Background(), []record.Event{{ID: ids[3], Type: "verify.test", Time: at, Context: "{}", MetadataVersion: 1, CreatedAt: at}}); err != nil {
		t.Fatal(err)
	}
	if res := sweepOnce(t, f); res.AlreadyPresent != 1 || res.Delivered != 0 {
		t.Fatalf("sweep: %+v, want the row found present", res)
	}
	if n := f.copies(t, ids[3]); n != 1 {
		t.Fatalf("ClickHouse holds %d rows of the event, want 1", n)
	}
}

// TestDuplicateReportedAndLeftAlone: a row ClickHouse holds twice is
// reported, and --repair leaves it (and the outbox row) as it is.
func TestDuplicateReportedAndLeftAlone(t *testing.T) {
	for _, srv := range testenv.ClickHouseServers(t) {
		t.Run(srv.Name, func(t *testing.T) {
			f := newFixture(t, srv, nil)
			start := wall(2026, 11, 5, 10, 0, 0, 0)
			evs := series(start, time.Minute, 120)
			evs[70].copies = 2
			ids := f.put(t, evs)
			cfg := verify.Config{From: start, Until: start.Add(2 * time.Hour)}
			rep := f.verify(t, cfg)
			b := bucketAt(t, rep, start.Add(time.Hour))
			if rep.Match || b.Status != verify.StatusDiffers || b.Duplicates == nil ||
				!reflect.DeepEqual(b.Duplicates.IDs, []verify.Duplicate{{ID: ids[70], Copies: 2, Status: "processed"}}) ||
				b.Outbox != 60 || b.ClickHouse != 61 || b.Missing != nil || b.NotInOutbox != nil {
				t.Fatalf("verify with a duplicate: match %v, bucket %+v", rep.Match, b)
			}
			if err := verify.Repair(context.Background(), f.e.Pool, outboxstore.Name{}, rep, 10); err != nil {
				t.Fatal(err)
			}
			if rep.Repair.Requeued.Count != 0 || rep.Repair.DuplicatesLeft != 1 {
				t.Fatalf("repair: %+v", rep.Repair)
			}
			if n := f.copies(t, ids[70]); n != 2 {
				t.Fatalf("ClickHouse holds %d rows of the duplicated event after repair, want both left alone", n)
			}
			if c := f.e.StatusCounts(t); c["processed"] != 120 {
				t.Fatalf("statuses after repair: %v", c)
			}
		})
	}
}

// TestBucketBoundaries: rows at month boundaries (the UTC one, which is also
// ClickHouse's partition boundary, and the zone's own), at a DST gap and in
// the repeated hour, with EVENT_TIME_ZONE not UTC: each lands in the bucket of
// the instant the streamer stored, both databases agree, and a row deleted at
// the boundary is reported in the right bucket.
func TestBucketBoundaries(t *testing.T) {
	for _, zone := range []string{"Europe/Berlin", "America/New_York"} {
		loc, err := time.LoadLocation(zone)
		if err != nil {
			t.Fatal(err)
		}
		for _, srv := range testenv.ClickHouseServers(t) {
			t.Run(zone+"/"+srv.Name, func(t *testing.T) {
				f := newFixture(t, srv, loc)
				utcMonth := wallUTC(time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC), loc)
				// Not in created_at order: the bucket's id window misses rows
				// that the range's aggregate counted, and the range's is read.
				walls := []time.Time{
					wall(2026, 2, 28, 23, 59, 59, 999999), // the zone's month boundary
					wall(2026, 3, 1, 0, 0, 0, 0),
					utcMonth.Add(-time.Microsecond), // the UTC month boundary (and ClickHouse's partitions)
					utcMonth,
					wall(2026, 3, 8, 2, 30, 0, 0),   // New York's DST gap: PostgreSQL's AT TIME ZONE and Go disagree
					wall(2026, 3, 29, 2, 30, 0, 0),  // Berlin's
					wall(2026, 10, 25, 2, 30, 0, 0), // Berlin's repeated hour
					wall(2026, 11, 1, 1, 30, 0, 0),  // New York's
					wall(2026, 12, 31, 23, 30, 0, 0),
					wall(2027, 1, 1, 0, 30, 0, 0),
				}
				var evs []ev
				want := map[int64]uint64{} // bucket start (Unix seconds) -> rows
				for _, w := range walls {
					evs = append(evs, ev{created: w, at: w, status: "processed", copies: 1})
					// ClickHouse 18.16 holds seconds; buckets are whole hours.
					want[instant(w, loc).Truncate(time.Hour).Unix()]++
				}
				ids := f.put(t, evs)
				cfg := verify.Config{From: time.Date(2026, 2, 27, 0, 0, 0, 0, time.UTC), Until: time.Date(2027, 1, 2, 0, 0, 0, 0, time.UTC)}
				rep := f.verify(t, cfg)
				got := map[int64]uint64{}
				for _, b := range rep.Buckets {
					got[b.Start.Unix()] = b.Outbox
					if b.ClickHouse != b.Outbox || b.Status != verify.StatusMatch {
						t.Errorf("bucket %s: outbox %d, ClickHouse %d, %s", b.Start, b.Outbox, b.ClickHouse, b.Status)
					}
				}
				if !rep.Match || !reflect.DeepEqual(got, want) {
					t.Fatalf("buckets %v, want %v (match %v)", got, want, rep.Match)
				}

				// The first row of March in UTC, deleted in ClickHouse: missing
				// in the bucket at 2026-03-01T00:00Z, nowhere else.
				f.deleteFromClickHouse(t, ids[3])
				rep = f.verify(t, cfg)
				b := bucketAt(t, rep, time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC))
				if rep.Totals.Differing != 1 || b.Missing == nil || !reflect.DeepEqual(b.Missing.IDs, []int64{ids[3]}) {
					t.Fatalf("after deleting event %d: totals %+v, bucket %+v", ids[3], rep.Totals, b)
				}
			})
		}
	}
}

func wallUTC(t time.Time, loc *time.Location) time.Time {
	t = t.In(loc)
	return time.Date(t.Year(), t.Month(), t.Day(), t.Hour(), t.Minute(), t.Second(), t.Nanosecond(), time.UTC)
}

// TestInstantsAsTheStreamerReadsThem: the outbox side converts created_at to
// instants exactly as Go's time.Date does (the streamer's conversion), in
// zones with DST gaps, repeated hours and half-hour shifts, where PostgreSQL's
// own AT TIME ZONE differs.
func TestInstantsAsTheStreamerReadsThem(t *testing.T) {
	e := fixture.New(t, testenv.ModernClickHouse(t))
	ctx := context.Background()
	// Every 10 minutes through 2018 and 2026 (São Paulo still had DST in 2018).
	if _, err := e.Pool.Exec(ctx, `INSERT INTO event_outbox (event_type, event_date_time, created_at, status)
		SELECT 't', w, w, 'processed' FROM (
			SELECT generate_series('2018-01-01'::timestamp, '2019-01-01', interval '10 minutes') AS w
			UNION ALL SELECT generate_series('2026-01-01'::timestamp, '2027-01-01', interval '10 minutes')) s`); err != nil {
		t.Fatal(err)
	}
	b, err := outboxstore.ReadVerifyBounds(ctx, e.Pool, outboxstore.Name{})
	if err != nil {
		t.Fatal(err)
	}
	rows, err := e.Pool.Query(ctx, `SELECT id, created_at FROM event_outbox`)
	if err != nil {
		t.Fatal(err)
	}
	walls := map[int64]time.Time{}
	for rows.Next() {
		var id int64
		var w time.Time
		if err := rows.Scan(&id, &w); err != nil {
			t.Fatal(err)
		}
		walls[id] = w
	}
	if rows.Err() != nil {
		t.Fatal(rows.Err())
	}
	for _, zone := range []string{"America/New_York", "America/Sao_Paulo", "Europe/Berlin", "Australia/Lord_Howe", "Asia/Kolkata"} {
		loc, err := time.LoadLocation(zone)
		if err != nil {
			t.Fatal(err)
		}
		for _, year := range []int{2018, 2026} {
			scan := outboxstore.VerifyScan{From: time.Date(year, 1, 2, 0, 0, 0, 0, time.UTC), Until: time.Date(year, 12, 31, 0, 0, 0, 0, time.UTC),
				Width: time.Hour, Loc: loc, LoID: b.MinID, ChunkRows: 20000}
			var n, bad int
			_, err := outboxstore.VerifyRows(ctx, e.Pool, scan, func(r outboxstore.VerifyRow) {
				n++
				if want := instant(walls[r.ID], loc); !want.Equal(r.CreatedAt) && bad < 5 {
					bad++
					t.Errorf("%s: created_at %s placed at %s, the streamer stores %s", zone, walls[r.ID], r.CreatedAt, want)
				}
			})
			if err != nil {
				t.Fatal(err)
			}
			if n < 50000 {
				t.Fatalf("%s %d: %d rows read, want the year's", zone, year, n)
			}
		}
	}
}

// TestPrunedRowsOutOfScope: ClickHouse rows whose outbox rows retention
// removed are named out of scope, not missing or extra; a row deleted from
// the outbox by hand is reported as in ClickHouse only; and a processed row an
// old bucket still holds is still checked.
func TestPrunedRowsOutOfScope(t *testing.T) {
	for _, srv := range testenv.ClickHouseServers(t) {
		t.Run(srv.Name, func(t *testing.T) {
			f := newFixture(t, srv, nil)
			ctx := context.Background()
			now := time.Now().UTC()
			old := wallUTC(now.Add(-10*24*time.Hour), time.UTC).Truncate(time.Hour)
			oldRows := series(old, time.Minute, 50)
			oldRows = append(oldRows,
				ev{created: old.Add(55 * time.Minute), at: old, status: "failed"},            // never delivered: stays
				ev{created: old.Add(56 * time.Minute), at: old, status: "failed", copies: 0}, // processed after the prune, lost by ClickHouse
			)
			oldIDs := f.put(t, oldRows)
			recent := wallUTC(now.Add(-3*time.Hour), time.UTC).Truncate(time.Hour)
			recentIDs := f.put(t, series(recent, time.Minute, 90))

			p := outboxstore.NewPruner(outboxstore.PruneConfig{Retention: 7 * 24 * time.Hour}, f.e.Pool, zap.NewNop())
			if res, err := p.Prune(ctx, 0, false); err != nil || res.Removed != 50 {
				t.Fatalf("prune: %+v, %v", res, err)
			}
			lost := oldIDs[51]
			if _, err := f.e.Pool.Exec(ctx, `UPDATE event_outbox SET status = 'processed' WHERE id = $1`, lost); err != nil {
				t.Fatal(err)
			}
			byHand := recentIDs[40]
			if _, err := f.e.Pool.Exec(ctx, `DELETE FROM event_outbox WHERE id = $1`, byHand); err != nil {
				t.Fatal(err)
			}

			for _, retention := range []time.Duration{7 * 24 * time.Hour, 0} {
				rep := f.verify(t, verify.Config{From: old.Add(-time.Hour), Until: now.Add(time.Hour), Retention: retention})
				ob := bucketAt(t, rep, old)
				if ob.PrunedRows != 50 || ob.Status != verify.StatusDiffers || ob.Missing == nil || !reflect.DeepEqual(ob.Missing.IDs, []int64{lost}) ||
					ob.NotInOutbox != nil || ob.Failed != 1 {
					t.Errorf("retention %s: old bucket %+v (missing %v)", retention, ob, ob.Missing)
				}
				var extra []int64
				for _, b := range rep.Buckets {
					if b.NotInOutbox != nil {
						extra = append(extra, b.NotInOutbox.IDs...)
					}
				}
				if rep.Match || rep.Totals.PrunedRows != 50 || !slices.Equal(extra, []int64{byHand}) || rep.Totals.Missing != 1 || rep.Totals.Differing != 2 {
					t.Errorf("retention %s: match %v, totals %+v, not in the outbox %v", retention, rep.Match, rep.Totals, extra)
				}
			}
		})
	}
}

// TestNotYetDelivered: pending, failed and dead rows are counted, not
// missing; a pending row ClickHouse holds already is in flight.
func TestNotYetDelivered(t *testing.T) {
	f := newFixture(t, testenv.ModernClickHouse(t), nil)
	start := wall(2026, 11, 5, 10, 0, 0, 0)
	evs := series(start, time.Minute, 20)
	evs[3].status, evs[3].copies = "pending", 0
	evs[4].status, evs[4].copies = "pending", 1 // delivered, status update to come
	evs[5].status, evs[5].copies = "failed", 0
	evs[6].status, evs[6].copies = "dead", 0
	f.put(t, evs)
	rep := f.verify(t, verify.Config{From: start, Until: start.Add(time.Hour)})
	b := bucketAt(t, rep, start)
	if !rep.Match || b.Status != verify.StatusExplained || b.Outbox != 16 || b.ClickHouse != 17 ||
		b.Pending != 2 || b.Failed != 1 || b.Dead != 1 || b.InFlight != 1 || b.Missing != nil {
		t.Fatalf("verify with undelivered rows: match %v, bucket %+v", rep.Match, b)
	}
}

// TestEmptyOutbox: nothing to compare is a match, and ClickHouse is not read.
func TestEmptyOutbox(t *testing.T) {
	f := newFixture(t, testenv.ModernClickHouse(t), nil)
	rep := f.verify(t, verify.Config{})
	if !rep.Match || len(rep.Notes) != 1 || rep.Cost.ClickHouseQuery != 0 {
		t.Fatalf("verify of an empty outbox: %+v", rep)
	}
}

// TestDocsChecksumSQL: the statements docs/verify.md gives auditors compute,
// on PostgreSQL and both ClickHouse versions, the checksums verify compares.
func TestDocsChecksumSQL(t *testing.T) {
	doc, err := os.ReadFile("../../docs/verify.md")
	if err != nil {
		t.Fatal(err)
	}
	blocks := map[string]string{}
	for _, part := range strings.Split(string(doc), "```sql\n")[1:] {
		q, _, _ := strings.Cut(part, "```")
		first, _, _ := strings.Cut(q, "\n")
		blocks[first] = strings.TrimSuffix(strings.TrimSpace(q), ";")
	}
	pgSQL := blocks["-- PostgreSQL: the outbox's processed rows"]
	if pgSQL == "" || len(blocks) != 3 {
		t.Fatalf("docs/verify.md: want three sql blocks (PostgreSQL, ClickHouse 22.x, 18.16), found %d", len(blocks))
	}
	for _, srv := range testenv.ClickHouseServers(t) {
		t.Run(srv.Name, func(t *testing.T) {
			chSQL := blocks["-- ClickHouse 22.x and newer (DateTime64)"]
			if srv.Legacy {
				chSQL = blocks["-- ClickHouse 18.16 (DateTime)"]
			}
			f := newFixture(t, srv, nil)
			start := wall(2026, 11, 5, 10, 0, 0, 0) // the documents' range
			evs := series(start, 36*time.Second, 300)
			evs[20].copies = 2
			evs[250].copies = 0
			evs[7].status = "pending"
			f.put(t, evs)
			rep := f.verify(t, verify.Config{From: start, Until: start.Add(3 * time.Hour)})
			ctx := context.Background()

			rows, err := f.e.Pool.Query(ctx, pgSQL)
			if err != nil {
				t.Fatal(err)
			}
			n := 0
			for rows.Next() {
				var at time.Time
				var count int64
				var sum, mix pgtype.Numeric
				if err := rows.Scan(&at, &count, &sum, &mix); err != nil {
					t.Fatal(err)
				}
				got := verify.Checksum{Count: uint64(count), Sum: numericU64(t, sum), Mix: numericU64(t, mix)}
				if want := bucketAt(t, rep, at).OutboxChecksum; got != want {
					t.Errorf("PostgreSQL by hand, bucket %s: %+v, verify: %+v", at, got, want)
				}
				n++
			}
			if rows.Err() != nil || n != 3 {
				t.Fatalf("PostgreSQL by hand: %d buckets, %v", n, rows.Err())
			}

			chRows, err := f.e.CHConn.Query(ctx, chSQL)
			if err != nil {
				t.Fatal(err)
			}
			defer chRows.Close()
			n = 0
			for chRows.Next() {
				var at time.Time
				var got verify.Checksum
				if err := chRows.Scan(&at, &got.Count, &got.Sum, &got.Mix); err != nil {
					t.Fatal(err)
				}
				if want := bucketAt(t, rep, at.UTC()).ClickHouseChecksum; got != want {
					t.Errorf("ClickHouse by hand, bucket %s: %+v, verify: %+v", at, got, want)
				}
				n++
			}
			if chRows.Err() != nil || n != 3 {
				t.Fatalf("ClickHouse by hand: %d buckets, %v", n, chRows.Err())
			}
		})
	}
}

// numericU64 is an integral numeric below 2^64.
func numericU64(t *testing.T, n pgtype.Numeric) uint64 {
	t.Helper()
	v := new(big.Int).Set(n.Int)
	v.Mul(v, new(big.Int).Exp(big.NewInt(10), big.NewInt(int64(n.Exp)), nil))
	if n.Exp < 0 || !v.IsUint64() {
		t.Fatalf("numeric %v·10^%d is not an integer below 2^64", n.Int, n.Exp)
	}
	return v.Uint64()
}

// TestPartitionedOutbox: the same on an outbox range-partitioned by
// created_at (the rows here land in the DEFAULT partition and in ones the
// test creates for them).
func TestPartitionedOutbox(t *testing.T) {
	srv := testenv.ModernClickHouse(t)
	e := fixture.NewPartitioned(t, srv, time.Hour)
	ctx := context.Background()
	if _, err := e.Pool.Exec(ctx, `CREATE TABLE event_outbox_p20261105_1000 PARTITION OF event_outbox
		FOR VALUES FROM ('2026-11-05 10:00:00') TO ('2026-11-05 11:00:00')`); err != nil {
		t.Fatal(err)
	}
	w, err := sink.Open(ctx, e.Sink, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { w.Close() })
	f := &verifyFixture{e: e, w: w, loc: time.UTC}
	start := wall(2026, 11, 5, 10, 0, 0, 0)
	ids := f.put(t, series(start, time.Minute, 120))
	cfg := verify.Config{From: start, Until: start.Add(2 * time.Hour)}
	if rep := f.verify(t, cfg); !rep.Match || rep.Totals.Outbox != 120 {
		t.Fatalf("partitioned outbox: match %v, %+v", rep.Match, rep.Totals)
	}
	f.deleteFromClickHouse(t, ids[90])
	if rep := f.verify(t, cfg); rep.Match || !reflect.DeepEqual(missingIDs(rep), []int64{ids[90]}) {
		t.Fatalf("partitioned outbox after a delete: match %v, missing %v", rep.Match, missingIDs(rep))
	}
}

// TestPhantomEventsReported: events ClickHouse holds and the outbox never did
// (after a failover, the business transaction of a delivered event may not
// exist on the new primary) are reported whatever their event_date_time —
// far outside the outbox rows' span, inside a bucket with outbox rows and in
// one without any — on both ClickHouse versions.
func TestPhantomEventsReported(t *testing.T) {
	for _, srv := range testenv.ClickHouseServers(t) {
		t.Run(srv.Name, func(t *testing.T) {
			f := newFixture(t, srv, nil)
			start := wall(2026, 11, 5, 10, 0, 0, 0)
			ids := f.put(t, series(start, time.Minute, 120))
			far := wall(2019, 3, 1, 0, 0, 0, 0)
			phantoms := []record.Event{
				{ID: ids[119] + 1000, Type: "phantom", Time: far, CreatedAt: start.Add(30 * time.Minute), Context: "{}", MetadataVersion: 1},
				{ID: ids[119] + 1001, Type: "phantom", Time: far, CreatedAt: start.Add(150 * time.Minute), Context: "{}", MetadataVersion: 1},
			}
			if err := f.w.Insert(context.Background(), phantoms); err != nil {
				t.Fatal(err)
			}
			rep := f.verify(t, verify.Config{From: start, Until: start.Add(3 * time.Hour)})
			var got []int64
			for _, b := range rep.Buckets {
				if b.NotInOutbox != nil {
					got = append(got, b.NotInOutbox.IDs...)
				}
			}
			want := []int64{phantoms[0].ID, phantoms[1].ID}
			if rep.Match || !reflect.DeepEqual(got, want) {
				t.Fatalf("verify with two phantom events: match %v, not in the outbox %v, want %v; buckets %+v", rep.Match, got, want, rep.Buckets)
			}
			// A range whose only rows are in ClickHouse differs too.
			rep = f.verify(t, verify.Config{From: start.Add(2 * time.Hour), Until: start.Add(3 * time.Hour)})
			if rep.Match {
				t.Fatalf("verify of a range holding only a phantom event: match, notes %v", rep.Notes)
			}
		})
	}
}
