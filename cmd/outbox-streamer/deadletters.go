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

	"github.com/outbox-streamer/outbox-streamer/internal/outboxstore"
)

func cmdDeadLetters(args []string, stdout, stderr io.Writer) error {
	if len(args) > 0 && (args[0] == "-h" || args[0] == "--help") {
		_, _, err := loadConfig("dead-letters", []string{"--help"}, stdout, nil)
		return err
	}
	if len(args) == 0 || (args[0] != "list" && args[0] != "requeue") {
		return usageError{command: "dead-letters", err: errors.New("want list or requeue")}
	}
	action := args[0]
	var limit int
	var asJSON, all bool
	var ids, typ string
	cfg, _, err := loadConfig("dead-letters "+action, args[1:], stdout, func(fs *flag.FlagSet) {
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
	// Arguments first: nothing connects for a command line that cannot run.
	var idList []int64
	if ids != "" {
		for _, s := range strings.Split(ids, ",") {
			id, err := strconv.ParseInt(strings.TrimSpace(s), 10, 64)
			if err != nil {
				return usageError{command: "dead-letters requeue", err: fmt.Errorf("--id %q: not a list of integers", ids)}
			}
			idList = append(idList, id)
		}
	}
	if action == "requeue" && len(idList) == 0 && !all {
		return usageError{command: "dead-letters requeue", err: errors.New("requeue needs --id N[,N...] or --all")}
	}
	conn, ctx, done, err := connectPostgres(cfg, 5*time.Minute)
	if err != nil {
		return err
	}
	defer done()

	if action == "list" {
		list, err := outboxstore.DeadLetters(ctx, conn, cfg.Outbox, typ, limit)
		if err != nil {
			return err
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

	requeued, err := outboxstore.Requeue(ctx, conn, cfg.Outbox, cfg.TimeZone, idList, typ)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "requeued %d dead letter(s); the next sweep delivers them\n", len(requeued))
	if missed := notRequeued(idList, requeued); len(missed) > 0 {
		return fmt.Errorf("%s: no dead letter with id %s in %s (see outbox-streamer failures)", "dead-letters requeue", joinIDs(missed), cfg.Outbox)
	}
	return nil
}

// notRequeued is the ids asked for that were not requeued: absent, not dead,
// or of another --type. Requeuing them silently would pass a typo.
func notRequeued(asked, done []int64) []int64 {
	got := make(map[int64]bool, len(done))
	for _, id := range done {
		got[id] = true
	}
	var missed []int64
	for _, id := range asked {
		if !got[id] {
			missed = append(missed, id)
		}
	}
	return missed
}

func joinIDs(ids []int64) string {
	s := make([]string, len(ids))
	for i, id := range ids {
		s[i] = strconv.FormatInt(id, 10)
	}
	return strings.Join(s, ", ")
}
