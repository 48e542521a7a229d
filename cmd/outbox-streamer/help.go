package main

import (
	"fmt"
	"io"
	"strings"

	"github.com/outbox-streamer/outbox-streamer/internal/config"
)

// commandHelp is what `COMMAND --help` prints: a synopsis, one paragraph, and
// only the settings the command reads (settings is nil for all of them).
type commandHelp struct {
	synopsis string
	about    string
	settings []string // groups (config.Bind's headings) or environment names
}

// general are the settings every command that connects reads.
var general = []string{"General", "PostgreSQL"}

var commands = map[string]commandHelp{
	"run": {
		synopsis: "outbox-streamer run [--sweep] [settings]",
		about: "Streams inserts into event_outbox from the replication slot into ClickHouse until SIGTERM;\n" +
			"one leader per slot, other instances wait as hot standbys. --sweep delivers the due failed\n" +
			"rows once, prints a summary and exits.",
	},
	"migrate": {
		synopsis: "outbox-streamer migrate up|down|status|force [flags] [settings]",
		about:    "Applies, rolls back, shows or forces the migrations of both databases (see migrate ACTION --help).",
		settings: append(general[:len(general):len(general)], "ClickHouse", "PUBLICATION_NAME", "OUTBOX_PARTITION_INTERVAL", "EVENT_TIME_ZONE"),
	},
	"migrate up": {
		synopsis: "outbox-streamer migrate up [--dry-run] [--wait DUR] [settings]",
		about: "Applies every pending migration to PostgreSQL, then ClickHouse, and prints both versions.\n" +
			"An existing outbox table (the earlier service's) is adopted in one transaction: see\n" +
			"docs/migrating-from-celery.md. --dry-run prints the statements it would run and changes nothing.",
	},
	"migrate down": {
		synopsis: "outbox-streamer migrate down --yes [--steps N] [--wait DUR] [settings]",
		about:    "Rolls back the last N migrations in both databases; can drop event_outbox and event_log with their data.",
	},
	"migrate status": {
		synopsis: "outbox-streamer migrate status [--json] [--wait DUR] [settings]",
		about:    "Prints each database's migration version, and whether it is up to date, pending or dirty; it only reads, creating nothing.",
	},
	"migrate force": {
		synopsis: "outbox-streamer migrate force VERSION --database postgres|clickhouse [settings]",
		about: "Records VERSION as the database's migration state and clears its dirty flag, running nothing:\n" +
			"the way out after a migration failed half-way and you repaired the schema by hand. 0 means none applied.",
	},
	"status": {
		synopsis: "outbox-streamer status [--json] [--max-lag BYTES] [--max-age DUR] [settings]",
		about:    "Shows the slot (lag, retained WAL, state), the leader and the outbox's rows by status. Exit 3 when a --max-* check fails.",
		settings: append(general[:len(general):len(general)], "REPLICATION_SLOT_NAME", "OUTBOX_TABLE", "OUTBOX_RETENTION", "EVENT_TIME_ZONE"),
	},
	"dead-letters": {
		synopsis: "outbox-streamer dead-letters list [--limit N] [--type T] [--json]\n" +
			"       outbox-streamer dead-letters requeue (--id N[,N...] | --all) [--type T]",
		about: "Lists the rows that exhausted EVENT_MAX_ATTEMPTS, or makes them due again: requeued rows\n" +
			"become failed with a fresh attempt count and the next sweep (EVENT_PROCESSING_INTERVAL, or\n" +
			"\"outbox-streamer run --sweep\") delivers them. A requeue of an --id that is not a dead letter exits 1.",
		settings: append(general[:len(general):len(general)], "OUTBOX_TABLE"),
	},
	"failures": {
		synopsis: "outbox-streamer failures [--json] [--limit N] [--type T] [settings]",
		about: "Why rows failed: the failed and dead rows grouped by reason (reasons that differ only in numbers are one),\n" +
			"with counts and the oldest and newest created_at of each, then the most recently failed rows with their\n" +
			"attempts, next attempt and reason. It only reads.",
		settings: append(general[:len(general):len(general)], "OUTBOX_TABLE"),
	},
	"prune": {
		synopsis: "outbox-streamer prune [--older-than DUR] [--dry-run] [settings]",
		about:    "Removes processed outbox rows older than OUTBOX_RETENTION (or --older-than) once, as the leader does after each sweep.",
		settings: append(general[:len(general):len(general)], "Outbox table"),
	},
	"verify": {
		synopsis: "outbox-streamer verify [--since DUR | --from TIME] [--until TIME] [--bucket DUR] [--max-ids N] [--json] [--repair] [settings]",
		about: "Compares the rows the outbox holds with ClickHouse's event table, bucket by bucket of created_at: by count and an\n" +
			"id checksum both databases compute, then id by id where they differ (missing in ClickHouse, there twice, there but\n" +
			"not in the outbox; rows OUTBOX_RETENTION pruned from the outbox are out of scope). Exit 0 when everything matches,\n" +
			"1 when something differs. --repair hands rows missing in ClickHouse to the sweep, which checks ClickHouse before it\n" +
			"inserts; duplicates are only reported. See docs/verify.md.",
		settings: append(general[:len(general):len(general)], "ClickHouse", "OUTBOX_TABLE", "EVENT_TIME_ZONE", "OUTBOX_RETENTION"),
	},
	"demo": {
		synopsis: "outbox-streamer demo [--rate N] [--tx-size N] [--count N] [--duration DUR] [settings]",
		about:    "Writes demo events into the outbox and prints, once a second, how many of them ClickHouse holds.",
		settings: append(general[:len(general):len(general)], "ClickHouse"),
	},
	"healthcheck": {
		synopsis: "outbox-streamer healthcheck [settings]",
		about:    "Probes the local /healthz of a running `run` (for container health checks: the image has no shell). Exit 0 when healthy.",
		settings: []string{"METRICS_ADDR"},
	},
}

// helpFor finds a command's help: "dead-letters list" falls back to
// "dead-letters", and a subcommand without settings of its own takes its
// parent's.
func helpFor(name string) commandHelp {
	h, ok := commands[name]
	parent, _, _ := strings.Cut(name, " ")
	if !ok {
		h = commands[parent]
	}
	if h.settings == nil && parent != "run" {
		h.settings = commands[parent].settings
	}
	return h
}

// printCommandHelp writes a command's synopsis, what it does, its own flags
// and the settings it reads.
func printCommandHelp(w io.Writer, name string, src *config.Source) {
	h := helpFor(name)
	fmt.Fprintf(w, "Usage: %s\n\n%s\n\n", h.synopsis, h.about)
	src.PrintUsageOf(w, h.settings)
	if h.settings != nil {
		fmt.Fprintln(w, "\nThe other settings (outbox-streamer --help) are accepted and ignored by this command.")
	}
}
