package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-streamer/outbox-streamer/internal/config"
	"github.com/outbox-streamer/outbox-streamer/internal/outboxstore"
	"github.com/outbox-streamer/outbox-streamer/internal/verify"
	"github.com/outbox-streamer/outbox-streamer/sink"
)

// cmdVerify is `verify`: does ClickHouse hold every event the outbox still
// holds, once? Exit 0 when everything matches, 1 when something differs.
func cmdVerify(args []string, stdout, stderr io.Writer) error {
	var since, from, until, bucket string
	var maxIDs int
	var asJSON, repair bool
	cfg, _, err := loadConfig("verify", args, stdout, func(fs *flag.FlagSet) {
		fs.StringVar(&since, "since", "", "compare rows created this long ago until --until, e.g. 24h, 7d (default: from the outbox's oldest row)")
		fs.StringVar(&from, "from", "", "compare rows created at or after TIME (RFC 3339, or YYYY-MM-DD[THH:MM[:SS]] in UTC)")
		fs.StringVar(&until, "until", "", "compare rows created before TIME (default now)")
		fs.StringVar(&bucket, "bucket", "1h", "bucket width by created_at, whole seconds; buckets are aligned to UTC (default 1h)")
		fs.IntVar(&maxIDs, "max-ids", 1000, "most ids listed per bucket and kind of difference (default 1000)")
		fs.BoolVar(&asJSON, "json", false, "print JSON")
		fs.BoolVar(&repair, "repair", false, "hand rows missing in ClickHouse to the sweep (it checks ClickHouse first); duplicates are only reported")
	})
	if err != nil {
		return err
	}
	// Arguments first: nothing connects for a command line that cannot run.
	usage := func(format string, a ...any) error {
		return usageError{command: "verify", err: fmt.Errorf(format, a...)}
	}
	now := time.Now()
	vc := verify.Config{Table: cfg.Outbox, TimeZone: cfg.TimeZone, Retention: cfg.Retention, MaxIDs: maxIDs, Now: func() time.Time { return now }}
	if vc.Bucket, err = config.ParseDuration(bucket); err != nil || vc.Bucket < time.Second || vc.Bucket%time.Second != 0 {
		return usage("--bucket %q: want whole seconds, at least 1s, such as 1h, 15m or 1d", bucket)
	}
	if maxIDs < 1 {
		return usage("--max-ids %d: want at least 1", maxIDs)
	}
	if since != "" && from != "" {
		return usage("--since and --from exclude each other")
	}
	if since != "" {
		d, err := config.ParseDuration(since)
		if err != nil || d <= 0 {
			return usage("--since %q: want a positive duration such as 24h or 7d", since)
		}
		vc.From = now.Add(-d)
	}
	if from != "" {
		if vc.From, err = parseTime(from); err != nil {
			return usage("--from %q: %v", from, err)
		}
	}
	if until != "" {
		if vc.Until, err = parseTime(until); err != nil {
			return usage("--until %q: %v", until, err)
		}
	}
	if !vc.From.IsZero() {
		end := vc.Until
		if end.IsZero() {
			end = now
		}
		if _, err := verify.Align(vc.From, end, vc.Bucket); err != nil {
			return usage("%v", err)
		}
	}

	log := newLogger(cfg, forPerson)
	defer log.Sync() //nolint:errcheck // nothing useful to do on a failed flush of stderr
	ctx, _, stop := signalContext(log)
	defer stop()
	pool, err := pgxpool.New(ctx, cfg.PostgresDSN)
	if err != nil {
		return fmt.Errorf("DATABASE_URL: %w", err)
	}
	defer pool.Close()
	ch, err := sink.Open(ctx, cfg.ClickHouse, log)
	if err != nil {
		return err
	}
	defer ch.Close()

	rep, err := verify.Run(ctx, vc, pool, ch)
	if err != nil {
		return err
	}
	if err := warnZoneSkew(ctx, pool, cfg, stderr); err != nil {
		return err
	}
	if repair {
		if err := verify.Repair(ctx, pool, vc.Table, rep, maxIDs); err != nil {
			return err
		}
	}
	if asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(rep); err != nil {
			return err
		}
	} else {
		printVerify(stdout, rep)
		if typ, err := outboxstore.TimeType(ctx, pool, vc.Table); err == nil {
			fmt.Fprintf(stdout, "outbox %s\n", timesRead(typ, cfg.TimeZone))
		}
	}
	if !rep.Match {
		return exitCode(1)
	}
	return nil
}

// warnZoneSkew warns when the newest row's created_at lies in the future
// read in EVENT_TIME_ZONE: the application writes another zone, and a range
// up to now misses the rows written since (a "match" over no rows).
func warnZoneSkew(ctx context.Context, db outboxstore.Reader, cfg *config.Config, stderr io.Writer) error {
	skew, err := outboxstore.ZoneSkew(ctx, db, cfg.Outbox, cfg.TimeZone)
	if err != nil || skew <= zoneSkewShown {
		return err
	}
	fmt.Fprintf(stderr, "outbox-streamer: warning: the newest row's created_at is %s in the future read in EVENT_TIME_ZONE %s: "+
		"set EVENT_TIME_ZONE to the zone the application writes created_at in; this range misses the rows created since\n",
		skew.Round(time.Minute), cfg.TimeZone)
	return nil
}

// parseTime reads RFC 3339, or a date and time without zone as UTC.
func parseTime(s string) (time.Time, error) {
	if t, err := time.Parse(time.RFC3339Nano, s); err == nil {
		return t, nil
	}
	for _, layout := range []string{"2006-01-02T15:04:05", "2006-01-02 15:04:05", "2006-01-02T15:04", "2006-01-02 15:04", "2006-01-02"} {
		if t, err := time.ParseInLocation(layout, s, time.UTC); err == nil {
			return t, nil
		}
	}
	return time.Time{}, errors.New("want RFC 3339 (2026-12-01T00:00:00Z) or YYYY-MM-DD[THH:MM[:SS]] (UTC)")
}

// printVerify writes the report for people: the buckets, then the ids of
// those that differ, then what was out of scope and the verdict.
func printVerify(w io.Writer, rep *verify.Report) {
	const ts = "2006-01-02T15:04:05Z"
	fmt.Fprintf(w, "verify: created_at %s to %s in %s buckets (EVENT_TIME_ZONE %s), %s vs ClickHouse %s\n",
		rep.From.Format(ts), rep.Until.Format(ts), config.FormatDuration(time.Duration(rep.BucketSeconds)*time.Second), rep.TimeZone, rep.OutboxTable, rep.Table)
	if len(rep.Buckets) > 0 {
		tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', tabwriter.AlignRight)
		// The status follows the last cell: left-aligned, the numbers right.
		fmt.Fprintln(tw, "BUCKET (UTC)\tOUTBOX\tCLICKHOUSE\tNOT DELIVERED\t  STATUS")
		for _, b := range rep.Buckets {
			fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t  %s\n", b.Start.Format(ts), b.Outbox, b.ClickHouse, b.Pending+b.Failed+b.Dead, bucketStatus(b))
		}
		tw.Flush()
	}
	for _, b := range rep.Buckets {
		at := b.Start.Format(ts)
		if l := b.Missing; l != nil {
			fmt.Fprintf(w, "%s: missing in ClickHouse (processed in the outbox): %s\n", at, idsText(l.IDs, l.Count, l.Truncated))
		}
		if l := b.Duplicates; l != nil {
			parts := make([]string, len(l.IDs))
			for i, d := range l.IDs {
				parts[i] = fmt.Sprintf("%d (%d rows)", d.ID, d.Copies)
			}
			fmt.Fprintf(w, "%s: in ClickHouse more than once: %s%s\n", at, strings.Join(parts, ", "), moreText(int64(len(l.IDs)), l.Count))
		}
		if l := b.NotInOutbox; l != nil {
			fmt.Fprintf(w, "%s: in ClickHouse, not in the outbox (and not pruned from it): %s\n", at, idsText(l.IDs, l.Count, l.Truncated))
		}
		if l := b.CreatedAtDiffers; l != nil {
			parts := make([]string, len(l.IDs))
			for i, m := range l.IDs {
				parts[i] = fmt.Sprintf("%d (outbox %s, ClickHouse %s)", m.ID, m.OutboxCreatedAt.Format(time.RFC3339Nano), m.ClickHouseCreatedAt.Format(time.RFC3339Nano))
			}
			fmt.Fprintf(w, "%s: created_at differs between the databases (check EVENT_TIME_ZONE): %s%s\n", at, strings.Join(parts, ", "), moreText(int64(len(l.IDs)), l.Count))
		}
	}
	t := rep.Totals
	if t.PrunedRows > 0 {
		fmt.Fprintf(w, "pruned from the outbox (out of scope): %d ClickHouse rows whose outbox rows retention removed\n", t.PrunedRows)
	}
	if t.Pending+t.Failed+t.Dead > 0 || t.InFlight > 0 {
		fmt.Fprintf(w, "not yet delivered (not a difference): %d pending, %d failed, %d dead; %d of them already in ClickHouse (in flight)\n",
			t.Pending, t.Failed, t.Dead, t.InFlight)
	}
	for _, n := range rep.Notes {
		fmt.Fprintf(w, "note: %s\n", n)
	}
	if r := rep.Repair; r != nil {
		fmt.Fprintf(w, "repair: %d missing row(s) handed to the sweep (failed, due now; it checks ClickHouse before inserting): %s\n",
			r.Requeued.Count, idsText(r.Requeued.IDs, r.Requeued.Count, r.Requeued.Truncated))
		if r.Skipped.Count > 0 {
			fmt.Fprintf(w, "repair: %d row(s) no longer processed, left alone: %s\n", r.Skipped.Count, idsText(r.Skipped.IDs, r.Skipped.Count, r.Skipped.Truncated))
		}
		if r.DuplicatesLeft > 0 {
			fmt.Fprintf(w, "repair: %d duplicate(s) reported and left alone\n", r.DuplicatesLeft)
		}
	}
	c := rep.Cost
	fmt.Fprintf(w, "read: outbox %d statements (%d id probes), %d rows; ClickHouse %d queries, %d rows, %s; %.1fs\n",
		c.OutboxStatements, c.OutboxProbes, c.OutboxRows, c.ClickHouseQuery, c.ClickHouseRows, bytesText(int64(c.ClickHouseBytes)), c.Seconds)
	if rep.Match {
		fmt.Fprintf(w, "result: match (%d buckets, %d processed outbox rows)\n", t.Buckets, t.Outbox)
		return
	}
	fmt.Fprintf(w, "result: %d of %d buckets differ: %d missing, %d duplicated, %d not in the outbox, %d with another created_at\n",
		t.Differing, t.Buckets, t.Missing, t.Duplicates, t.NotInOutbox, t.CreatedAtDiffers)
}

func bucketStatus(b verify.Bucket) string {
	var parts []string
	if b.Missing != nil {
		parts = append(parts, fmt.Sprintf("%d missing", b.Missing.Count))
	}
	if b.Duplicates != nil {
		parts = append(parts, fmt.Sprintf("%d duplicated", b.Duplicates.Count))
	}
	if b.NotInOutbox != nil {
		parts = append(parts, fmt.Sprintf("%d not in the outbox", b.NotInOutbox.Count))
	}
	if b.CreatedAtDiffers != nil {
		parts = append(parts, fmt.Sprintf("%d with another created_at", b.CreatedAtDiffers.Count))
	}
	if b.TooLarge {
		parts = append(parts, "checksums only (too many rows to compare ids)")
	}
	if b.Status == verify.StatusDiffers {
		return "DIFFERS: " + strings.Join(parts, ", ")
	}
	var notes []string
	if b.InFlight > 0 {
		notes = append(notes, fmt.Sprintf("%d in flight", b.InFlight))
	}
	if b.PrunedRows > 0 {
		notes = append(notes, fmt.Sprintf("%d pruned, out of scope", b.PrunedRows))
	}
	if len(notes) == 0 {
		return b.Status
	}
	return "match (" + strings.Join(notes, ", ") + ")"
}

func idsText(ids []int64, count int64, truncated bool) string {
	parts := make([]string, len(ids))
	for i, id := range ids {
		parts[i] = fmt.Sprint(id)
	}
	s := strings.Join(parts, ", ")
	if truncated {
		s += moreText(int64(len(ids)), count)
	}
	return s
}

func moreText(shown, count int64) string {
	if count > shown {
		return fmt.Sprintf(" ... and %d more (--max-ids)", count-shown)
	}
	return ""
}
