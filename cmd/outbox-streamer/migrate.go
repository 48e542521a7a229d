package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"

	"github.com/outbox-streamer/outbox-streamer/migrations"
)

func cmdMigrate(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 || (args[0] != "up" && args[0] != "down" && args[0] != "status") {
		if len(args) > 0 && (args[0] == "-h" || args[0] == "--help") {
			fmt.Fprintln(stdout, "usage: outbox-streamer migrate up|down|status [flags]")
			return nil
		}
		return errors.New("usage: outbox-streamer migrate up|down|status [flags]")
	}
	action := args[0]
	var yes bool
	var steps int
	cfg, _, err := loadConfig("migrate "+action, args[1:], stdout, func(fs *flag.FlagSet) {
		if action == "down" {
			fs.BoolVar(&yes, "yes", false, "really roll back (drops event_outbox / event_log when it undoes their creation)")
			fs.IntVar(&steps, "steps", 1, "how many migrations to roll back in each database")
		}
	})
	if err != nil {
		return err
	}
	mcfg := migrations.Config{PostgresDSN: cfg.PostgresDSN, Publication: cfg.Publication, ClickHouse: cfg.ClickHouse,
		PartitionInterval: cfg.PartitionInterval, TimeZone: cfg.TimeZone}
	ctx := context.Background()
	switch action {
	case "up":
		if err := migrations.Up(ctx, mcfg); err != nil {
			return err
		}
	case "down":
		if !yes {
			return fmt.Errorf("migrate down rolls back %d migration(s) in PostgreSQL and ClickHouse and can drop the outbox and event tables with their data; add --yes to proceed", steps)
		}
		if err := migrations.Down(ctx, mcfg, steps); err != nil {
			return err
		}
	}
	st, err := migrations.Statuses(ctx, mcfg)
	if err != nil {
		return err
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
