package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"github.com/outbox-streamer/outbox-streamer/internal/config"
	"github.com/outbox-streamer/outbox-streamer/migrations"
)

// cmdMigrate is `migrate up|down|status|force`.
func cmdMigrate(args []string, stdout, stderr io.Writer) error {
	if len(args) > 0 && (args[0] == "-h" || args[0] == "--help") {
		h := helpFor("migrate")
		fmt.Fprintf(stdout, "Usage: %s\n\n%s\n", h.synopsis, h.about)
		return nil
	}
	if len(args) == 0 || (args[0] != "up" && args[0] != "down" && args[0] != "status" && args[0] != "force") {
		return usageError{command: "migrate", err: errors.New("want up, down, status or force")}
	}
	action, rest := args[0], args[1:]
	forceVersion := -1
	if action == "force" && len(rest) > 0 && rest[0] != "" && rest[0][0] != '-' {
		v, err := strconv.Atoi(rest[0])
		if err != nil || v < 0 {
			return usageError{command: "migrate force", err: fmt.Errorf("VERSION %q: want a migration number (0: none applied)", rest[0])}
		}
		forceVersion, rest = v, rest[1:]
	}
	var yes, asJSON, dryRun bool
	var steps int
	var database string
	wait := 30 * time.Second
	cfg, _, err := loadConfig("migrate "+action, rest, stdout, func(fs *flag.FlagSet) {
		fs.DurationVar(&wait, "wait", wait, "keep retrying a database that refuses connections this long (a migrate job may start before PostgreSQL)")
		switch action {
		case "up":
			fs.BoolVar(&dryRun, "dry-run", false, "print the statements migrate up would run on these databases, changing nothing")
		case "down":
			fs.BoolVar(&yes, "yes", false, "really roll back (drops event_outbox / event_log when it undoes their creation)")
			fs.IntVar(&steps, "steps", 1, "how many migrations to roll back in each database")
		case "status":
			fs.BoolVar(&asJSON, "json", false, "print JSON")
		case "force":
			fs.StringVar(&database, "database", "", "the database whose version to force: postgres or clickhouse")
		}
	})
	if err != nil {
		return err
	}
	if action == "force" {
		if forceVersion < 0 {
			return usageError{command: "migrate force", err: errors.New("needs VERSION, e.g. migrate force 1 --database clickhouse")}
		}
		if database != migrations.Postgres && database != migrations.ClickHouse {
			return usageError{command: "migrate force", err: fmt.Errorf("--database %q: want postgres or clickhouse", database)}
		}
	}
	mcfg := migrations.Config{PostgresDSN: cfg.PostgresDSN, Publication: cfg.Publication, Outbox: cfg.Outbox, ClickHouse: cfg.ClickHouse,
		PartitionInterval: cfg.PartitionInterval, TimeZone: cfg.TimeZone, ConnectWait: wait, ContextType: cfg.ContextType,
		Notify: func(msg string) { fmt.Fprintln(stderr, "migrate:", msg) }}
	ctx := context.Background()
	if dryRun {
		return printPlan(ctx, mcfg, cfg.Retention, stdout)
	}
	switch action {
	case "up":
		var plan migrations.PostgresPlan
		if plan, err = migrations.UpReport(ctx, mcfg); err == nil && plan.Adopt {
			fmt.Fprintf(stdout, "postgres: adopted the existing table %s (%d rows; %s): %d statements in one transaction\n",
				cfg.Outbox, plan.Rows, timesRead(plan.TimeType, mcfg.TimeZone), len(plan.Statements))
		}
	case "down":
		if !yes {
			return fmt.Errorf("migrate down rolls back %d migration(s) in PostgreSQL and ClickHouse and can drop the outbox and event tables with their data; add --yes to proceed", steps)
		}
		err = migrations.Down(ctx, mcfg, steps)
	case "force":
		err = migrations.Force(ctx, mcfg, database, forceVersion)
	}
	if err != nil {
		return err
	}
	st, err := migrations.Statuses(ctx, mcfg)
	if err != nil {
		return err
	}
	if asJSON {
		return json.NewEncoder(stdout).Encode(st)
	}
	for _, s := range st {
		fmt.Fprintln(stdout, s)
	}
	if action == "up" {
		layout, err := migrations.DescribeLayout(ctx, mcfg)
		if err != nil {
			return err
		}
		fmt.Fprintln(stdout, layout)
		if err := printRetention(ctx, mcfg, cfg.Retention, stdout); err != nil {
			return err
		}
	}
	return nil
}

// largeTable is the row count from which --dry-run points at building the
// adoption's index beforehand: from about a second of waiting producers
// (5,000,000 rows took 1.9-5.7 s to adopt on a loaded 2-core machine).
const largeTable = 1_000_000

// printPlan is `migrate up --dry-run`: the statements for PostgreSQL (an
// adoption, or the pending migrations) and ClickHouse's pending migrations,
// read without changing anything.
func printPlan(ctx context.Context, mcfg migrations.Config, retention time.Duration, stdout io.Writer) error {
	plan, err := migrations.PlanPostgres(ctx, mcfg)
	if err != nil {
		return err
	}
	switch {
	case plan.Adopt:
		fmt.Fprintf(stdout, "-- postgres: adopt the existing table %s (%d rows; %s), in one transaction\n",
			mcfg.Outbox, plan.Rows, timesRead(plan.TimeType, mcfg.TimeZone))
		fmt.Fprintf(stdout, "BEGIN;\nSET LOCAL lock_timeout = '%dms';\nLOCK TABLE %s IN ACCESS EXCLUSIVE MODE;\n", migrations.AdoptLockTimeout.Milliseconds(), mcfg.Outbox.Ident())
		for _, stmt := range plan.Statements {
			if strings.HasPrefix(stmt, "CREATE INDEX") && plan.Rows >= largeTable {
				fmt.Fprintf(stdout, "-- this reads all %d rows while producers wait; to build it without blocking them first, run\n-- %s (after adding next_attempt_at): docs/migrating-from-celery.md, large tables\n",
					plan.Rows, strings.Replace(stmt, "CREATE INDEX IF NOT EXISTS", "CREATE INDEX CONCURRENTLY", 1))
			}
			fmt.Fprintln(stdout, stmt+";")
		}
		fmt.Fprintln(stdout, "COMMIT;")
	case len(plan.Statements) == 0:
		fmt.Fprintln(stdout, "-- postgres: nothing to do")
	default:
		for _, stmt := range plan.Statements {
			fmt.Fprintln(stdout, "-- postgres: "+stmt)
		}
	}
	ch, err := migrations.PlanClickHouse(ctx, mcfg)
	if err != nil {
		return err
	}
	if len(ch) == 0 {
		fmt.Fprintln(stdout, "-- clickhouse: nothing to do")
	}
	for _, stmt := range ch {
		fmt.Fprintln(stdout, "-- clickhouse: "+stmt)
	}
	return printRetention(ctx, mcfg, retention, stdout)
}

// timesRead says how the streamer reads created_at and event_date_time of
// this type.
func timesRead(typ string, loc *time.Location) string {
	if typ == "timestamp with time zone" {
		return "times are timestamp with time zone, read as instants"
	}
	zone := "UTC"
	if loc != nil {
		zone = loc.String()
	}
	return "times are " + typ + ", read as wall clock in EVENT_TIME_ZONE=" + zone
}

// printRetention says what the first retention pass of `run` will remove.
func printRetention(ctx context.Context, mcfg migrations.Config, retention time.Duration, stdout io.Writer) error {
	if retention <= 0 {
		return nil
	}
	pv, err := migrations.PreviewRetention(ctx, mcfg, retention)
	if err != nil {
		return err
	}
	if pv.Rows == 0 {
		fmt.Fprintf(stdout, "retention (OUTBOX_RETENTION=%s): nothing to remove yet\n", config.FormatDuration(retention))
		return nil
	}
	oldest := ""
	if pv.Oldest != nil {
		oldest = ", the oldest created at " + pv.Oldest.Format("2006-01-02 15:04:05")
	}
	fmt.Fprintf(stdout, "retention (OUTBOX_RETENTION=%s): the first pass of run will delete %d processed rows created before %s%s (set OUTBOX_RETENTION=0 to keep them)\n",
		config.FormatDuration(retention), pv.Rows, pv.Cutoff.Format("2006-01-02 15:04:05"), oldest)
	return nil
}
