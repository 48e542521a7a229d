package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"strconv"
	"time"

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
	var yes, asJSON bool
	var steps int
	var database string
	wait := 30 * time.Second
	cfg, _, err := loadConfig("migrate "+action, rest, stdout, func(fs *flag.FlagSet) {
		fs.DurationVar(&wait, "wait", wait, "keep retrying a database that refuses connections this long (a migrate job may start before PostgreSQL)")
		switch action {
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
	switch action {
	case "up":
		err = migrations.Up(ctx, mcfg)
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
	}
	return nil
}
