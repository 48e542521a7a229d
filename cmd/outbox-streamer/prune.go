package main

import (
	"flag"
	"fmt"
	"io"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-streamer/outbox-streamer/internal/config"
	"github.com/outbox-streamer/outbox-streamer/internal/outboxstore"
)

// cmdPrune is `prune [--older-than DUR] [--dry-run]`: one retention pass.
func cmdPrune(args []string, stdout, stderr io.Writer) error {
	var olderThan string
	var dry bool
	cfg, _, err := loadConfig("prune", args, stdout, func(fs *flag.FlagSet) {
		fs.StringVar(&olderThan, "older-than", "", "remove processed rows older than this (default OUTBOX_RETENTION), e.g. 7d, 36h, 90")
		fs.BoolVar(&dry, "dry-run", false, "count what would be removed, remove nothing")
	})
	if err != nil {
		return err
	}
	age := cfg.Retention
	if olderThan != "" {
		if age, err = config.ParseDuration(olderThan); err != nil || age <= 0 {
			return fmt.Errorf("--older-than %q: want a positive duration such as 7d, 36h or 90 (seconds)", olderThan)
		}
	}
	if age <= 0 {
		fmt.Fprintln(stdout, "prune: OUTBOX_RETENTION is 0 (keep everything) and no --older-than given: nothing to do")
		return nil
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
	p := outboxstore.NewPruner(outboxstore.PruneConfig{Table: cfg.Outbox, Retention: age, TimeZone: cfg.TimeZone, PartitionInterval: cfg.PartitionInterval}, pool, log)
	res, err := p.Prune(ctx, age, dry)
	verb := "removed"
	if dry {
		verb = "would remove"
	}
	fmt.Fprintf(stdout, "prune: %s %d processed rows created before %s (older than %s) in %d batches, %s",
		verb, res.Removed, res.Cutoff.UTC().Format(time.RFC3339), age, res.Batches, res.Took.Round(time.Millisecond))
	if len(res.DroppedPartitions) > 0 {
		fmt.Fprintf(stdout, "; dropped partitions %v", res.DroppedPartitions)
	}
	if len(res.KeptPartitions) > 0 {
		fmt.Fprintf(stdout, "; kept old partitions %v (they hold pending, failed or dead rows)", res.KeptPartitions)
	}
	if ages, aerr := p.Ages(ctx); aerr == nil && ages.OldestProcessed != nil {
		fmt.Fprintf(stdout, "; oldest processed row left: %s old", ages.OldestProcessed.Round(time.Second))
	}
	fmt.Fprintln(stdout)
	if err != nil {
		return err
	}
	return nil
}
