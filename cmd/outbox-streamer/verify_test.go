package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os/exec"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/fixture"
	"github.com/outbox-streamer/outbox-streamer/internal/harness/testenv"
	"github.com/outbox-streamer/outbox-streamer/internal/record"
	"github.com/outbox-streamer/outbox-streamer/internal/verify"
	"github.com/outbox-streamer/outbox-streamer/sink"
)

// runSplit runs the binary to completion and returns its exit code, stdout
// and stderr (logs) apart.
func runSplit(t *testing.T, env []string, args ...string) (int, string, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, binary(t), args...)
	cmd.Env = env
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("run %v: %v", args, err)
	}
	return code, out.String(), errOut.String()
}

// TestVerifyExitCodes drives `outbox-streamer verify` against real servers:
// exit 0 when ClickHouse holds every processed row once, 1 with the missing
// id named when it does not, 2 for a command line that cannot run; --repair
// hands the row to the sweep, `run --sweep` delivers it, and verify exits 0.
func TestVerifyExitCodes(t *testing.T) {
	e := fixture.New(t, testenv.ModernClickHouse(t))
	ctx := context.Background()
	start := time.Date(2026, 11, 20, 8, 0, 0, 0, time.UTC)
	var ids []int64
	rows, err := e.Pool.Query(ctx, `INSERT INTO event_outbox (event_type, event_date_time, created_at, status)
		SELECT 'cli', $1::timestamp + g * interval '30 seconds', $1::timestamp + g * interval '30 seconds', 'processed'
		FROM generate_series(0, 199) g RETURNING id`, start)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var id int64
		if err := rows.Scan(&id); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, id)
	}
	rows.Close()
	w, err := sink.Open(ctx, e.Sink, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	var events []record.Event
	var lost int64
	for i, id := range ids {
		if i == 130 { // 09:05: never reached ClickHouse
			lost = id
			continue
		}
		at := start.Add(time.Duration(i) * 30 * time.Second)
		events = append(events, record.Event{ID: id, Type: "cli", Time: at, Context: "{}", MetadataVersion: 1, CreatedAt: at})
	}
	if err := w.Insert(ctx, events); err != nil {
		t.Fatal(err)
	}
	env := envFor(e)
	from, until := start.Format(time.RFC3339), start.Add(2*time.Hour).Format(time.RFC3339)

	code, out, logs := runSplit(t, env, "verify", "--from", from, "--until", until)
	t.Logf("verify with a row missing:\n%s", out)
	if code != 1 || !strings.Contains(out, fmt.Sprintf("missing in ClickHouse (processed in the outbox): %d", lost)) ||
		!strings.Contains(out, "2026-11-20T09:00:00Z") || !strings.Contains(out, "DIFFERS: 1 missing") {
		t.Fatalf("verify with a row missing: exit %d, want 1; stdout:\n%s\nstderr:\n%s", code, out, logs)
	}

	code, out, logs = runSplit(t, env, "verify", "--from", from, "--until", until, "--json", "--repair")
	var rep struct {
		Match  bool `json:"match"`
		Totals struct {
			Missing int64 `json:"missing"`
		} `json:"totals"`
		Repair struct {
			Requeued struct {
				IDs []int64 `json:"ids"`
			} `json:"requeued"`
		} `json:"repair"`
	}
	if err := json.Unmarshal([]byte(out), &rep); err != nil || code != 1 || rep.Match || rep.Totals.Missing != 1 ||
		len(rep.Repair.Requeued.IDs) != 1 || rep.Repair.Requeued.IDs[0] != lost {
		t.Fatalf("verify --json --repair: exit %d, %v; stdout:\n%s\nstderr:\n%s", code, err, out, logs)
	}

	if code, out := runCmd(t, env, "run", "--sweep"); code != 0 {
		t.Fatalf("run --sweep: exit %d:\n%s", code, out)
	}
	code, out, logs = runSplit(t, env, "verify", "--from", from, "--until", until)
	if code != 0 || !strings.Contains(out, "result: match (2 buckets, 200 processed outbox rows)") {
		t.Fatalf("verify after the sweep: exit %d, want 0; stdout:\n%s\nstderr:\n%s", code, out, logs)
	}

	for _, args := range [][]string{
		{"verify", "--since", "1h", "--from", from},
		{"verify", "--bucket", "1500ms"},
		{"verify", "--from", "yesterday"},
	} {
		code, out, logs := runSplit(t, env, args...)
		if lines := strings.Split(strings.TrimSpace(logs), "\n"); code != 2 || len(lines) != 1 || !strings.Contains(lines[0], "verify --help") || out != "" {
			t.Errorf("%v: exit %d, want 2 and one line; stdout %q, stderr %q", args, code, out, logs)
		}
	}
}

// TestPrintVerify: the human report names every kind of difference with its
// ids, what is out of scope, and the verdict.
func TestPrintVerify(t *testing.T) {
	h := time.Date(2026, 11, 20, 8, 0, 0, 0, time.UTC)
	rep := &verify.Report{From: h, Until: h.Add(3 * time.Hour), BucketSeconds: 3600, TimeZone: "Europe/Berlin", OutboxTable: "event_outbox", Table: "`a`.`event_log`",
		Buckets: []verify.Bucket{
			{Start: h, Outbox: 10, ClickHouse: 510, Status: verify.StatusExplained, PrunedRows: 500},
			{Start: h.Add(time.Hour), Outbox: 10, ClickHouse: 11, Pending: 2, InFlight: 1, Status: verify.StatusExplained},
			{Start: h.Add(2 * time.Hour), Outbox: 10, ClickHouse: 10, Status: verify.StatusDiffers,
				Missing:     &verify.IDList{Count: 3, IDs: []int64{7, 8}, Truncated: true},
				Duplicates:  &verify.DuplicateList{Count: 1, IDs: []verify.Duplicate{{ID: 9, Copies: 2, Status: "processed"}}},
				NotInOutbox: &verify.IDList{Count: 1, IDs: []int64{99}}},
		},
		Totals: verify.Totals{Buckets: 3, Differing: 1, Missing: 3, Duplicates: 1, NotInOutbox: 1, Pending: 2, InFlight: 1, PrunedRows: 500},
		Repair: &verify.RepairResult{Requeued: verify.IDList{Count: 2, IDs: []int64{7, 8}}, Skipped: verify.IDList{Count: 1, IDs: []int64{6}}, DuplicatesLeft: 1},
	}
	var out bytes.Buffer
	printVerify(&out, rep)
	t.Logf("\n%s", out.String())
	for _, want := range []string{
		"match (500 pruned, out of scope)",
		"match (1 in flight)",
		"DIFFERS: 3 missing, 1 duplicated, 1 not in the outbox",
		"2026-11-20T10:00:00Z: missing in ClickHouse (processed in the outbox): 7, 8 ... and 1 more (--max-ids)",
		"in ClickHouse more than once: 9 (2 rows)",
		"in ClickHouse, not in the outbox (and not pruned from it): 99",
		"pruned from the outbox (out of scope): 500 ClickHouse rows",
		"not yet delivered (not a difference): 2 pending, 0 failed, 0 dead; 1 of them already in ClickHouse (in flight)",
		"repair: 2 missing row(s) handed to the sweep",
		"repair: 1 row(s) no longer processed, left alone: 6",
		"repair: 1 duplicate(s) reported and left alone",
		"result: 1 of 3 buckets differ: 3 missing, 1 duplicated, 1 not in the outbox, 0 with another created_at",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("report lacks %q", want)
		}
	}
}
