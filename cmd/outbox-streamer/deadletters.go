package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/jackc/pgx/v5"
)

// deadLetter is a row that exhausted its attempts.
type deadLetter struct {
	ID        int64     `json:"id"`
	Type      string    `json:"event_type"`
	Time      time.Time `json:"event_date_time"`
	Attempts  int       `json:"attempts"`
	LastError string    `json:"last_error"`
	UpdatedAt time.Time `json:"updated_at"`
}

const deadLettersUsage = `usage:
  outbox-streamer dead-letters list [--limit N] [--type T] [--json]
  outbox-streamer dead-letters requeue (--id N[,N...] | --all) [--type T]
Requeued rows become failed with a fresh attempt count and are due at once: the sweep
(EVENT_PROCESSING_INTERVAL, or "outbox-streamer run --sweep") delivers them.`

func cmdDeadLetters(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 || (args[0] != "list" && args[0] != "requeue") {
		if len(args) > 0 && (args[0] == "-h" || args[0] == "--help") {
			fmt.Fprintln(stdout, deadLettersUsage)
			return nil
		}
		return errors.New(deadLettersUsage)
	}
	action := args[0]
	var limit int
	var asJSON, all bool
	var ids, typ string
	cfg, _, err := loadConfig("dead-letters "+action, args[1:], stderr, func(fs *flag.FlagSet) {
		fs.StringVar(&typ, "type", "", "only dead letters of this event type")
		if action == "list" {
			fs.IntVar(&limit, "limit", 100, "most rows to list")
			fs.BoolVar(&asJSON, "json", false, "print JSON lines")
		} else {
			fs.StringVar(&ids, "id", "", "comma-separated ids to requeue")
			fs.BoolVar(&all, "all", false, "requeue every dead letter (of --type, if given)")
		}
	})
	if err != nil {
		return err
	}
	conn, ctx, done, err := connectPostgres(cfg, 5*time.Minute)
	if err != nil {
		return err
	}
	defer done()

	if action == "list" {
		rows, err := conn.Query(ctx, `SELECT id, event_type, event_date_time, attempts, COALESCE(last_error, ''), updated_at
			FROM event_outbox WHERE status = 'dead' AND ($1 = '' OR event_type = $1) ORDER BY id LIMIT $2`, typ, limit)
		if err != nil {
			return fmt.Errorf("list dead letters: %w", err)
		}
		list, err := pgx.CollectRows(rows, pgx.RowToStructByPos[deadLetter])
		if err != nil {
			return fmt.Errorf("list dead letters: %w", err)
		}
		if asJSON {
			enc := json.NewEncoder(stdout)
			for _, d := range list {
				if err := enc.Encode(d); err != nil {
					return err
				}
			}
			return nil
		}
		tw := tabwriter.NewWriter(stdout, 2, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "ID\tTYPE\tEVENT TIME\tATTEMPTS\tLAST ERROR")
		for _, d := range list {
			fmt.Fprintf(tw, "%d\t%s\t%s\t%d\t%s\n", d.ID, d.Type, d.Time.Format(time.RFC3339), d.Attempts, d.LastError)
		}
		tw.Flush()
		fmt.Fprintf(stdout, "%d dead letter(s) shown\n", len(list))
		return nil
	}

	var idList []int64
	if ids != "" {
		for _, s := range strings.Split(ids, ",") {
			id, err := strconv.ParseInt(strings.TrimSpace(s), 10, 64)
			if err != nil {
				return fmt.Errorf("--id %q: not a list of integers", ids)
			}
			idList = append(idList, id)
		}
	}
	if len(idList) == 0 && !all {
		return errors.New("requeue needs --id N[,N...] or --all")
	}
	tag, err := conn.Exec(ctx, `UPDATE event_outbox
		SET status = 'failed', attempts = 0, next_attempt_at = now(), updated_at = now() AT TIME ZONE 'UTC',
		    last_error = 'requeued by operator; before: ' || COALESCE(last_error, '')
		WHERE status = 'dead' AND ($1::bigint[] IS NULL OR id = ANY($1)) AND ($2 = '' OR event_type = $2)`, nullable(idList), typ)
	if err != nil {
		return fmt.Errorf("requeue dead letters: %w", err)
	}
	fmt.Fprintf(stdout, "requeued %d dead letter(s); the next sweep delivers them\n", tag.RowsAffected())
	return nil
}

func nullable(ids []int64) any {
	if len(ids) == 0 {
		return nil
	}
	return ids
}
