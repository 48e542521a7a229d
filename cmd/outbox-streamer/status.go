package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"

	"github.com/outbox-streamer/outbox-streamer/checkpoint"
	"github.com/outbox-streamer/outbox-streamer/internal/duration"
	"github.com/outbox-streamer/outbox-streamer/internal/leader"
	"github.com/outbox-streamer/outbox-streamer/internal/metrics"
	"github.com/outbox-streamer/outbox-streamer/internal/outboxstore"
	"github.com/outbox-streamer/outbox-streamer/replication"
)

// slotStatus is what `status` reports.
type slotStatus struct {
	Slot              string `json:"slot"`
	SlotExists        bool   `json:"slot_exists"`
	SlotOtherDatabase string `json:"slot_other_database,omitempty"`
	Active            bool   `json:"active"`
	ActivePID         int32  `json:"active_pid,omitempty"`
	WALStatus         string `json:"wal_status,omitempty"`
	ConfirmedFlush    string `json:"confirmed_flush_lsn,omitempty"`
	CurrentWAL        string `json:"current_wal_lsn"`
	LagBytes          int64  `json:"lag_bytes"`
	RetainedWALBytes  int64  `json:"retained_wal_bytes"`
	SafeWALSize       *int64 `json:"safe_wal_size,omitempty"`
	// Failover, Synced (PostgreSQL 17+), Conflicting (16+) and
	// InvalidationReason (17+) as pg_replication_slots shows them.
	Failover           *bool            `json:"failover,omitempty"`
	Synced             *bool            `json:"synced,omitempty"`
	Conflicting        *bool            `json:"conflicting,omitempty"`
	InvalidationReason string           `json:"invalidation_reason,omitempty"`
	Counts             map[string]int64 `json:"counts"`
	OldestUndelivered  *float64         `json:"oldest_undelivered_age_seconds,omitempty"`
	Leader             string           `json:"leader,omitempty"`
	// RetentionSeconds is OUTBOX_RETENTION (0: keep everything).
	RetentionSeconds float64 `json:"retention_seconds"`
	// OldestProcessed is the age of the oldest processed row still held.
	OldestProcessed *float64 `json:"oldest_processed_age_seconds,omitempty"`
	// TopReasons are the most common reasons of failed and dead rows
	// (`failures` lists them all).
	TopReasons []outboxstore.FailureReason `json:"top_failure_reasons,omitempty"`
	// CreatedAhead is how far the newest row's created_at lies in the future
	// read in EVENT_TIME_ZONE (see outboxstore.ZoneSkew); 0 when it does not.
	CreatedAheadSeconds float64 `json:"newest_created_at_ahead_seconds,omitempty"`
	TimeZone            string  `json:"time_zone"`
	// TimeType is the type of the outbox's times, and TimesRead how the
	// streamer reads them (an adopted outbox may have either type).
	// LeaderView is what the leader last published (metrics.View), and
	// LeaderViewAge its age in seconds.
	LeaderView    json.RawMessage `json:"leader_view,omitempty"`
	LeaderViewAge float64         `json:"leader_view_age_seconds,omitempty"`
	TimeType      string          `json:"time_type"`
	TimesRead     string          `json:"times_read"`
}

// zoneSkewShown is how far ahead created_at may be before status warns:
// clocks of application hosts differ by seconds, time zones by hours.
const zoneSkewShown = 5 * time.Minute

// topReasons is how many reasons `status` shows.
const topReasons = 3

func cmdStatus(args []string, stdout, stderr io.Writer) error {
	var asJSON bool
	var maxLag int64
	var maxAge time.Duration
	cfg, _, err := loadConfig("status", args, stdout, func(fs *flag.FlagSet) {
		fs.BoolVar(&asJSON, "json", false, "print JSON")
		fs.Int64Var(&maxLag, "max-lag", 0, "exit 3 when the slot lags by more than this many bytes (0: no check)")
		fs.Func("max-age", "exit 3 when the oldest undelivered row is older than this: seconds or a duration such as 5m (0: no check)", func(v string) error {
			d, err := duration.Parse(v)
			if err != nil || d < 0 {
				return fmt.Errorf(`want a duration such as "300", "5m" or "1h"`)
			}
			maxAge = d
			return nil
		})
	})
	if err != nil {
		return err
	}
	conn, ctx, done, err := connectPostgres(cfg, 30*time.Second)
	if err != nil {
		return err
	}
	defer done()

	st := slotStatus{Slot: cfg.Slot}
	slot, err := replication.ReadSlot(ctx, conn, cfg.Slot)
	if err != nil {
		return err
	}
	st.CurrentWAL = pglogrepl.LSN(slot.CurrentWAL).String()
	if slot.Foreign {
		// Another database's slot of the same name says nothing about this
		// outbox (it once showed 366 MB of someone else's lag here).
		st.SlotOtherDatabase = slot.Database
		slot = replication.SlotInfo{}
	}
	st.SlotExists, st.Active, st.ActivePID, st.WALStatus = slot.Exists, slot.Active, slot.ActivePID, slot.WALStatus
	if slot.Exists {
		st.ConfirmedFlush = pglogrepl.LSN(slot.ConfirmedFlush).String()
		if slot.LagBytes != nil {
			st.LagBytes = *slot.LagBytes
		}
		if slot.RetainedBytes != nil {
			st.RetainedWALBytes = *slot.RetainedBytes
		}
		st.SafeWALSize = slot.SafeWALSize
		st.Failover, st.Synced, st.Conflicting, st.InvalidationReason = slot.Failover, slot.Synced, slot.Conflicting, slot.InvalidationReason
	}
	if err := conn.QueryRow(ctx, leader.HolderQuery, cfg.Slot).Scan(&st.Leader); err != nil && !errors.Is(err, pgx.ErrNoRows) {
		return fmt.Errorf("read the leader lock: %w", err)
	}
	if v, ok, err := checkpoint.ReadView(ctx, conn, cfg.Slot); err != nil {
		return err
	} else if ok {
		st.LeaderView = json.RawMessage(v.JSON)
		st.LeaderViewAge = v.Age.Seconds()
	}
	if st.Counts, err = outboxstore.CountByStatus(ctx, conn, cfg.Outbox); err != nil {
		return err
	}
	if st.OldestUndelivered, err = outboxstore.OldestUndelivered(ctx, conn, cfg.Outbox, cfg.TimeZone); err != nil {
		return err
	}
	if st.Counts[outboxstore.StatusFailed]+st.Counts[outboxstore.StatusDead] > 0 {
		if st.TopReasons, err = outboxstore.FailureReasons(ctx, conn, cfg.Outbox, topReasons); err != nil {
			return err
		}
	}
	if st.TimeType, err = outboxstore.TimeType(ctx, conn, cfg.Outbox); err != nil {
		return err
	}
	st.TimesRead = timesRead(st.TimeType, cfg.TimeZone)
	st.RetentionSeconds = cfg.Retention.Seconds()
	st.TimeZone = cfg.TimeZone.String()
	skew, err := outboxstore.ZoneSkew(ctx, conn, cfg.Outbox, cfg.TimeZone)
	if err != nil {
		return err
	}
	if skew > zoneSkewShown {
		st.CreatedAheadSeconds = skew.Seconds()
	}
	ages, err := outboxstore.ReadAges(ctx, conn, cfg.Outbox, cfg.TimeZone)
	if err != nil {
		return err
	}
	if ages.OldestProcessed != nil {
		sec := ages.OldestProcessed.Seconds()
		st.OldestProcessed = &sec
	}

	if asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(st); err != nil {
			return err
		}
	} else {
		printStatus(stdout, st)
	}
	over := false
	// A slot that is missing (a typo in --slot, or not created yet) has no
	// lag to compare: a probe that passed on it would pass forever.
	if maxLag > 0 && !st.SlotExists {
		fmt.Fprintf(stderr, "outbox-streamer: slot %q does not exist in this database, so --max-lag cannot pass\n", cfg.Slot)
		over = true
	} else if maxLag > 0 && st.LagBytes > maxLag {
		fmt.Fprintf(stderr, "outbox-streamer: slot %q lags by %d bytes, over --max-lag %d\n", cfg.Slot, st.LagBytes, maxLag)
		over = true
	}
	if maxAge > 0 && st.OldestUndelivered != nil && time.Duration(*st.OldestUndelivered*float64(time.Second)) > maxAge {
		fmt.Fprintf(stderr, "outbox-streamer: oldest undelivered row is %.0fs old, over --max-age %s\n", *st.OldestUndelivered, maxAge)
		over = true
	}
	if over {
		return exitCode(3)
	}
	return nil
}

// printSlotHA prints the failover columns the server has, one line.
func printSlotHA(w io.Writer, st slotStatus) {
	var parts []string
	for _, c := range []struct {
		name string
		v    *bool
	}{{"failover", st.Failover}, {"synced", st.Synced}, {"conflicting", st.Conflicting}} {
		if c.v != nil {
			parts = append(parts, fmt.Sprintf("%s %t", c.name, *c.v))
		}
	}
	if st.InvalidationReason != "" {
		parts = append(parts, "invalidated: "+st.InvalidationReason)
	}
	if len(parts) > 0 {
		fmt.Fprintf(w, "  %s\n", strings.Join(parts, ", "))
	}
}

func printStatus(w io.Writer, st slotStatus) {
	if st.SlotOtherDatabase != "" {
		fmt.Fprintf(w, "slot %s: belongs to database %q, not this outbox's: set REPLICATION_SLOT_NAME to a name unique on the server\n", st.Slot, st.SlotOtherDatabase)
	} else if !st.SlotExists {
		fmt.Fprintf(w, "slot %s: does not exist (created by the first `outbox-streamer run`)\n", st.Slot)
	} else {
		active := "inactive"
		if st.Active {
			active = fmt.Sprintf("active (pid %d)", st.ActivePID)
		}
		fmt.Fprintf(w, "slot %s: %s, wal_status %s\n", st.Slot, active, st.WALStatus)
		fmt.Fprintf(w, "  confirmed flush %s, current WAL %s\n", st.ConfirmedFlush, st.CurrentWAL)
		fmt.Fprintf(w, "  lag %s, retained WAL %s", bytesText(st.LagBytes), bytesText(st.RetainedWALBytes))
		if st.SafeWALSize != nil {
			fmt.Fprintf(w, ", safe_wal_size %s", bytesText(*st.SafeWALSize))
		}
		fmt.Fprintln(w)
		printSlotHA(w, st)
	}
	if st.Leader != "" {
		fmt.Fprintf(w, "leader: %s\n", st.Leader)
		if line := leaderViewLine(st.LeaderView, st.LeaderViewAge); line != "" {
			fmt.Fprintf(w, "  %s\n", line)
		}
	} else {
		fmt.Fprintln(w, "leader: none (no outbox-streamer holds the lock)")
	}
	fmt.Fprintf(w, "outbox: %d pending, %d processed, %d failed, %d dead\n",
		st.Counts["pending"], st.Counts["processed"], st.Counts["failed"], st.Counts["dead"])
	if st.OldestUndelivered != nil {
		fmt.Fprintf(w, "  oldest undelivered row: %s old\n", time.Duration(*st.OldestUndelivered*float64(time.Second)).Round(time.Second))
	}
	for _, r := range st.TopReasons {
		fmt.Fprintf(w, "  %d× %s\n", r.Rows(), clip(r.Reason, reasonWidth))
	}
	if len(st.TopReasons) > 0 {
		fmt.Fprintln(w, "  (outbox-streamer failures: every reason and row)")
	}
	if st.CreatedAheadSeconds > 0 {
		fmt.Fprintf(w, "warning: the newest row's created_at is %s in the future read in EVENT_TIME_ZONE %s: set EVENT_TIME_ZONE to the zone the application writes created_at in (ages, retention and verify ranges are off by the difference)\n",
			time.Duration(st.CreatedAheadSeconds*float64(time.Second)).Round(time.Minute), st.TimeZone)
	}
	if st.TimesRead != "" {
		fmt.Fprintf(w, "  %s\n", st.TimesRead)
	}
	retain := "keep everything (OUTBOX_RETENTION=0)"
	if st.RetentionSeconds > 0 {
		retain = "processed rows removed after " + duration.Format(time.Duration(st.RetentionSeconds*float64(time.Second)))
	}
	fmt.Fprintf(w, "retention: %s", retain)
	if st.OldestProcessed != nil {
		fmt.Fprintf(w, "; oldest processed row %s old", time.Duration(*st.OldestProcessed*float64(time.Second)).Round(time.Second))
	}
	fmt.Fprintln(w)
}

func bytesText(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}

// leaderViewLine is the leader's own view in one line, or "" when there is
// none to show.
func leaderViewLine(raw json.RawMessage, ageSeconds float64) string {
	var v metrics.View
	if len(raw) == 0 || json.Unmarshal(raw, &v) != nil {
		return ""
	}
	line := fmt.Sprintf("its view %s ago: %s, %.0f rows/s, confirmed %s, %.0f delivered by this process",
		time.Duration(ageSeconds*float64(time.Second)).Round(time.Second), v.State, v.RowsPerSecond, v.ConfirmedLSN, v.Delivered)
	if v.ETASeconds != nil {
		line += fmt.Sprintf(", ETA %s", time.Duration(*v.ETASeconds*float64(time.Second)).Round(time.Second))
	}
	if !v.LastBatch.IsZero() {
		line += fmt.Sprintf(", last batch %s ago", time.Since(v.LastBatch).Round(time.Second))
	}
	return line + fmt.Sprintf(", %.0f errors", v.Errors)
}
