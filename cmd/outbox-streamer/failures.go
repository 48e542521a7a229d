package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/outbox-streamer/outbox-streamer/internal/outboxstore"
)

// failuresReport is what `failures` prints: the reasons, then the rows.
type failuresReport struct {
	Reasons []outboxstore.FailureReason `json:"reasons"`
	Rows    []outboxstore.FailedRow     `json:"rows"`
}

// cmdFailures answers "why did this row fail?": the failed and dead rows
// grouped by reason, then the most recently failed rows with their attempts
// and next attempt. It only reads.
func cmdFailures(args []string, stdout, stderr io.Writer) error {
	var asJSON bool
	var limit int
	var typ string
	cfg, _, err := loadConfig("failures", args, stdout, func(fs *flag.FlagSet) {
		fs.BoolVar(&asJSON, "json", false, "print JSON")
		fs.IntVar(&limit, "limit", 20, "most rows to list (the reasons are all listed)")
		fs.StringVar(&typ, "type", "", "only rows of this event type")
	})
	if err != nil {
		return err
	}
	if limit < 0 {
		return usageError{command: "failures", err: fmt.Errorf("--limit %d: want 0 or more", limit)}
	}
	conn, ctx, done, err := connectPostgres(cfg, 5*time.Minute)
	if err != nil {
		return err
	}
	defer done()
	var r failuresReport
	if r.Reasons, err = outboxstore.FailureReasons(ctx, conn, cfg.Outbox, 0); err != nil {
		return err
	}
	if r.Rows, err = outboxstore.FailedRows(ctx, conn, cfg.Outbox, typ, limit); err != nil {
		return err
	}
	if asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(r)
	}
	printFailures(stdout, r, time.Now())
	return nil
}

// reasonWidth bounds a reason in the tables; --json has it whole.
const reasonWidth = 160

// printFailures writes the report for a person.
func printFailures(w io.Writer, r failuresReport, now time.Time) {
	if len(r.Reasons) == 0 {
		fmt.Fprintln(w, "no failed or dead rows")
		return
	}
	var failed, dead int64
	tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "FAILED\tDEAD\tOLDEST\tNEWEST\tREASON")
	for _, g := range r.Reasons {
		failed, dead = failed+g.Failed, dead+g.Dead
		fmt.Fprintf(tw, "%d\t%d\t%s\t%s\t%s\n", g.Failed, g.Dead, g.Oldest.Format(time.DateTime), g.Newest.Format(time.DateTime), clip(g.Reason, reasonWidth))
	}
	tw.Flush()
	fmt.Fprintf(w, "%d failed, %d dead, %d reason(s); rows created at OLDEST..NEWEST (EVENT_TIME_ZONE)\n\n", failed, dead, len(r.Reasons))

	tw = tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tTYPE\tSTATUS\tATTEMPTS\tNEXT ATTEMPT\tCREATED\tREASON")
	for _, f := range r.Rows {
		fmt.Fprintf(tw, "%d\t%s\t%s\t%d\t%s\t%s\t%s\n", f.ID, f.Type, f.Status, f.Attempts, nextAttempt(f, now), f.CreatedAt.Format(time.DateTime), clip(f.Reason, reasonWidth))
	}
	tw.Flush()
	fmt.Fprintf(w, "%d most recently failed row(s) shown (--limit); dead rows wait for `outbox-streamer dead-letters requeue`\n", len(r.Rows))
}

// nextAttempt says when the sweep tries a row again.
func nextAttempt(f outboxstore.FailedRow, now time.Time) string {
	switch {
	case f.NextAttempt == nil:
		return "never (dead)"
	case !f.NextAttempt.After(now):
		return "due now"
	}
	return "in " + f.NextAttempt.Sub(now).Round(time.Second).String()
}

// clip shortens s to at most n runes, on one line.
func clip(s string, n int) string {
	s = strings.Join(strings.Fields(s), " ")
	if r := []rune(s); len(r) > n {
		return string(r[:n-1]) + "…"
	}
	return s
}
