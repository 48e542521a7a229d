package deploy

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	dto "github.com/prometheus/client_model/go"
	"gopkg.in/yaml.v3"

	"github.com/outbox-streamer/outbox-streamer/internal/config"
	"github.com/outbox-streamer/outbox-streamer/internal/metrics"
)

// root is the repository root, relative to this package's directory.
const root = ".."

// update rewrites the files generated from prometheus/alerts.yml (the
// PrometheusRule and the Helm chart's copy): go test ./deploy -run Alerts -update
var update = flag.Bool("update", false, "rewrite the files generated from prometheus/alerts.yml")

// yamlFiles returns every YAML file of the deployment: docker-compose.yml and all of
// deploy/, except the Helm chart's templates, which are YAML only once rendered (the
// helm tests parse what helm template makes of them).
func yamlFiles(t *testing.T) []string {
	t.Helper()
	files := []string{filepath.Join(root, "docker-compose.yml")}
	err := filepath.WalkDir(".", func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && d.Name() == "templates" && filepath.Base(filepath.Dir(filepath.Dir(path))) == "helm" {
			return filepath.SkipDir
		}
		if ext := filepath.Ext(path); !d.IsDir() && (ext == ".yml" || ext == ".yaml") {
			files = append(files, path)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return files
}

// decodeAll parses every document of a YAML file.
func decodeAll(path string) ([]map[string]any, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return decodeYAML(raw)
}

// decodeYAML parses every document of a YAML stream, skipping empty ones.
func decodeYAML(raw []byte) ([]map[string]any, error) {
	dec := yaml.NewDecoder(bytes.NewReader(raw))
	var docs []map[string]any
	for {
		var doc map[string]any
		err := dec.Decode(&doc)
		if errors.Is(err, io.EOF) {
			return docs, nil
		}
		if err != nil {
			return nil, err
		}
		if doc != nil {
			docs = append(docs, doc)
		}
	}
}

func mustDoc(t *testing.T, path string) map[string]any {
	t.Helper()
	docs, err := decodeAll(path)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	if len(docs) != 1 {
		t.Fatalf("%s: %d YAML documents, want 1", path, len(docs))
	}
	return docs[0]
}

// get walks a decoded YAML/JSON tree: keys for maps, ints for lists.
func get(t *testing.T, v any, path ...any) any {
	t.Helper()
	for _, p := range path {
		switch k := p.(type) {
		case string:
			m, ok := v.(map[string]any)
			if !ok {
				t.Fatalf("at %v: %T is not a map", path, v)
			}
			v = m[k]
		case int:
			l, ok := v.([]any)
			if !ok || k >= len(l) {
				t.Fatalf("at %v: no item %d", path, k)
			}
			v = l[k]
		}
	}
	return v
}

// lookup is get for paths that may be missing: nil where get would fail.
func lookup(v any, path ...any) any {
	for _, p := range path {
		switch k := p.(type) {
		case string:
			m, _ := v.(map[string]any)
			v = m[k]
		case int:
			l, _ := v.([]any)
			if k >= len(l) {
				return nil
			}
			v = l[k]
		}
	}
	return v
}

func TestEveryYAMLAndJSONFileParses(t *testing.T) {
	files := yamlFiles(t)
	if len(files) < 17 {
		t.Fatalf("found only %d YAML files: %v", len(files), files)
	}
	for _, f := range files {
		docs, err := decodeAll(f)
		if err != nil {
			t.Errorf("%s: %v", f, err)
		} else if len(docs) == 0 {
			t.Errorf("%s: no YAML document", f)
		}
	}
	err := filepath.WalkDir(".", func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || filepath.Ext(path) != ".json" {
			return err
		}
		raw, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		var v any
		if err := json.Unmarshal(raw, &v); err != nil {
			t.Errorf("%s: %v", path, err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// promtool runs promtool with args in dir, or fails the test with how to get it.
func promtool(t *testing.T, dir string, args ...string) {
	t.Helper()
	if os.Getenv("OUTBOX_SKIP_PROMTOOL") == "1" {
		t.Skip("OUTBOX_SKIP_PROMTOOL=1")
	}
	bin, err := exec.LookPath("promtool")
	if err != nil {
		t.Fatal("promtool not found on PATH: install it (Debian: apt-get install -y prometheus; " +
			"`make deps` does it) or set OUTBOX_SKIP_PROMTOOL=1 to skip the rule checks")
	}
	cmd := exec.Command(bin, args...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	t.Logf("promtool %s:\n%s", strings.Join(args, " "), out)
}

func TestPromtoolChecksRules(t *testing.T) {
	promtool(t, "prometheus", "check", "rules", "alerts.yml")
}

// TestPromtoolUnitTestsOfAlerts runs alerts_test.yml: each alert fires on the
// situation it describes and stays quiet on a healthy pair of replicas.
func TestPromtoolUnitTestsOfAlerts(t *testing.T) {
	promtool(t, "prometheus", "test", "rules", "alerts_test.yml")
}

func TestPromtoolChecksPrometheusConfig(t *testing.T) {
	promtool(t, "prometheus", "check", "config", "prometheus.yml")
}

// alertGroups reads the groups of deploy/prometheus/alerts.yml.
func alertGroups(t *testing.T) []any {
	t.Helper()
	groups, _ := get(t, mustDoc(t, "prometheus/alerts.yml"), "groups").([]any)
	if len(groups) == 0 {
		t.Fatal("alerts.yml has no groups")
	}
	return groups
}

// The header of kubernetes/prometheusrule.yaml, which prometheusRuleYAML completes
// with the groups of alerts.yml.
const prometheusRuleHeader = `# The alert rules of deploy/prometheus/alerts.yml for the Prometheus Operator, made
# from it by go test ./deploy -run Alerts -update (deploy_test.go checks that the groups
# stay identical). Add the label your Prometheus selects rules by (often release:
# <helm release>).
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: outbox-streamer
  labels:
    app.kubernetes.io/name: outbox-streamer
spec:
`

// prometheusRuleYAML is kubernetes/prometheusrule.yaml made from alerts.yml: its
// groups, as they are written, two spaces deeper under spec.
func prometheusRuleYAML(t *testing.T, alerts []byte) []byte {
	t.Helper()
	lines := strings.SplitAfter(string(alerts), "\n")
	start := slices.Index(lines, "groups:\n")
	if start < 0 {
		t.Fatal("alerts.yml has no top-level groups: line")
	}
	var b strings.Builder
	b.WriteString(prometheusRuleHeader)
	for _, l := range lines[start:] {
		if strings.TrimSpace(l) != "" {
			b.WriteString("  ")
		}
		b.WriteString(l)
	}
	return []byte(b.String())
}

// The Helm chart's copy of alerts.yml: Helm reads no file outside the chart.
const chartAlerts = "helm/outbox-streamer/files/alerts.yml"

// TestAlertsCopiesAreCurrent: the PrometheusRule and the chart's copy carry
// alerts.yml's rules; -update rewrites them from it.
func TestAlertsCopiesAreCurrent(t *testing.T) {
	alerts, err := os.ReadFile("prometheus/alerts.yml")
	if err != nil {
		t.Fatal(err)
	}
	want := map[string][]byte{"kubernetes/prometheusrule.yaml": prometheusRuleYAML(t, alerts), chartAlerts: alerts}
	for _, f := range slices.Sorted(maps.Keys(want)) {
		if *update {
			if err := os.WriteFile(f, want[f], 0o644); err != nil {
				t.Fatal(err)
			}
			continue
		}
		if got, err := os.ReadFile(f); err != nil || !bytes.Equal(got, want[f]) {
			t.Errorf("%s is not made from prometheus/alerts.yml (%v): run go test ./deploy -run Alerts -update", f, err)
		}
	}
}

func TestPrometheusRuleMatchesAlertsFile(t *testing.T) {
	rule := mustDoc(t, "kubernetes/prometheusrule.yaml")
	if rule["kind"] != "PrometheusRule" {
		t.Fatalf("kind = %v", rule["kind"])
	}
	if got, want := get(t, rule, "spec", "groups"), alertGroups(t); !reflect.DeepEqual(got, want) {
		t.Error("kubernetes/prometheusrule.yaml spec.groups differ from prometheus/alerts.yml groups: regenerate one from the other")
	}
}

func TestAlertsCoverTheOperatorsQuestions(t *testing.T) {
	var names []string
	for _, g := range alertGroups(t) {
		for _, r := range get(t, g, "rules").([]any) {
			name, _ := get(t, r, "alert").(string)
			names = append(names, name)
			if get(t, r, "labels", "severity") == nil || get(t, r, "annotations", "summary") == nil || get(t, r, "annotations", "description") == nil {
				t.Errorf("alert %s needs a severity label and summary and description annotations", name)
			}
		}
	}
	for _, want := range []string{
		"OutboxStreamerSlotLagHigh", "OutboxStreamerRetainedWALHigh", "OutboxStreamerRetainedWALNearLimit",
		"OutboxStreamerSlotInactive", "OutboxStreamerNoLeader", "OutboxStreamerFailedRowsGrowing",
		"OutboxStreamerDeadLetters", "OutboxStreamerStale", "OutboxStreamerDown", "OutboxStreamerAllDown",
		"OutboxStreamerSlotInvalidationPredicted", "OutboxStreamerSlotWALUnreserved",
	} {
		if !slices.Contains(names, want) {
			t.Errorf("no alert %s", want)
		}
	}
}

// exportedNames is every series name a scrape of the streamer can show: each family
// of the registry, with _bucket, _sum and _count for histograms.
func exportedNames(t *testing.T) map[string]bool {
	t.Helper()
	m := metrics.New()
	// Touch every labelled series that only appears once set.
	v := 1.0
	m.SetSlot(metrics.SlotStats{Slot: "s", Exists: true, Active: true, LagBytes: &v, RetainedBytes: &v, SafeWALSize: &v,
		WALStatus: "reserved", WALPosition: &v, Failover: &v, Conflicting: &v})
	m.SetWALKeepSize(&v)
	m.ObserveVerify(metrics.VerifyResult{Match: true, Window: "24h"}, nil)
	m.SetStandbyHold("sb", true, &v)
	m.SetStandbyConfirmationWait("s", true)
	m.SetFailoverWanted("s", true)
	m.SetOutbox(metrics.OutboxStats{Rows: map[string]float64{"pending": 1, "processed": 1, "failed": 1, "dead": 1}})
	m.ObserveSweep(1, 1, 1)
	for _, s := range metrics.Stages {
		m.AddError(s)
	}
	fams, err := m.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for _, f := range fams {
		names[f.GetName()] = true
		switch f.GetType() {
		case dto.MetricType_HISTOGRAM:
			for _, s := range []string{"_bucket", "_sum", "_count"} {
				names[f.GetName()+s] = true
			}
		case dto.MetricType_SUMMARY:
			names[f.GetName()+"_sum"], names[f.GetName()+"_count"] = true, true
		}
	}
	return names
}

// metricRef finds the streamer's metric names (and the Go/process collectors' ones)
// in a PromQL expression.
var metricRef = regexp.MustCompile(`\b(?:outbox_streamer|process|go)_[a-z0-9_]+\b`)

// checkExprs reports every metric an expression uses that the registry lacks.
func checkExprs(t *testing.T, where string, exprs []string, names map[string]bool) int {
	t.Helper()
	refs := 0
	for _, e := range exprs {
		for _, ref := range metricRef.FindAllString(e, -1) {
			refs++
			if !names[ref] {
				t.Errorf("%s uses %s, which the metrics package does not export (expression: %s)", where, ref, e)
			}
		}
	}
	return refs
}

func TestAlertRulesUseExportedMetrics(t *testing.T) {
	names := exportedNames(t)
	var exprs []string
	for _, g := range alertGroups(t) {
		for _, r := range get(t, g, "rules").([]any) {
			exprs = append(exprs, get(t, r, "expr").(string))
		}
	}
	if n := checkExprs(t, "alerts.yml", exprs, names); n < 10 {
		t.Errorf("only %d metric references found in the alert rules", n)
	}
}

// collectExprs gathers every "expr" string of a dashboard, in panels, rows and
// nested panels alike.
func collectExprs(v any, out *[]string) {
	switch x := v.(type) {
	case map[string]any:
		for k, val := range x {
			if s, ok := val.(string); ok && k == "expr" {
				*out = append(*out, s)
				continue
			}
			collectExprs(val, out)
		}
	case []any:
		for _, val := range x {
			collectExprs(val, out)
		}
	}
}

func TestDashboardUsesExportedMetrics(t *testing.T) {
	raw, err := os.ReadFile("grafana/dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	var dash map[string]any
	if err := json.Unmarshal(raw, &dash); err != nil {
		t.Fatal(err)
	}
	var exprs []string
	collectExprs(dash, &exprs)
	names := exportedNames(t)
	checkExprs(t, "dashboard.json", exprs, names)

	// The panels operators asked for, by the metric each one needs.
	all := strings.Join(exprs, "\n")
	for _, want := range []string{
		"outbox_streamer_rows_delivered_total", "outbox_streamer_rows_failed_total", "outbox_streamer_rows_dead_total",
		"outbox_streamer_batch_rows_bucket", "outbox_streamer_clickhouse_insert_duration_seconds_bucket",
		"outbox_streamer_commit_to_clickhouse_latency_seconds_bucket", "outbox_streamer_slot_lag_bytes",
		"outbox_streamer_slot_retained_wal_bytes", "outbox_streamer_outbox_rows", "outbox_streamer_oldest_undelivered_age_seconds",
		"outbox_streamer_leader", "outbox_streamer_slot_wal_status", "outbox_streamer_max_slot_wal_keep_size_bytes",
		"outbox_streamer_wal_position_bytes",
	} {
		if !strings.Contains(all, want) {
			t.Errorf("the dashboard has no panel using %s", want)
		}
	}
	for _, q := range []string{"0.5, sum by (le) (rate(outbox_streamer_commit_to_clickhouse", "0.95, sum by (le) (rate(outbox_streamer_commit_to_clickhouse", "0.99, sum by (le) (rate(outbox_streamer_commit_to_clickhouse",
		"0.5, sum by (le) (rate(outbox_streamer_clickhouse_insert", "0.99, sum by (le) (rate(outbox_streamer_clickhouse_insert"} {
		if !strings.Contains(all, q) {
			t.Errorf("the dashboard lacks the quantile %q…", q)
		}
	}
	if dash["uid"] != "outbox-streamer" {
		t.Errorf("dashboard uid = %v: provisioning and links rely on outbox-streamer", dash["uid"])
	}

	// The top row shows the retained WAL as a share of max_slot_wal_keep_size, and
	// "unlimited" for its -1.
	panels, _ := dash["panels"].([]any)
	found := false
	for _, p := range panels {
		var pe []string
		collectExprs(p, &pe)
		e := strings.Join(pe, "\n")
		if get(t, p, "gridPos", "y") != 1.0 || !strings.Contains(e, "outbox_streamer_slot_retained_wal_bytes") ||
			!strings.Contains(e, "outbox_streamer_max_slot_wal_keep_size_bytes") {
			continue
		}
		found = true
		if typ := get(t, p, "type"); typ != "gauge" && typ != "stat" {
			t.Errorf("the retained WAL share is a %v panel, want a gauge or stat", typ)
		}
		if get(t, p, "fieldConfig", "defaults", "unit") != "percentunit" {
			t.Error("the retained WAL share is not in percentunit")
		}
		unlimited := false
		for _, m := range get(t, p, "fieldConfig", "defaults", "mappings").([]any) {
			if opt, _ := get(t, m, "options").(map[string]any); opt != nil && opt["-1"] != nil && get(t, opt["-1"], "text") == "unlimited" {
				unlimited = true
			}
		}
		if !unlimited || !strings.Contains(e, "> 0") || !strings.Contains(e, "< 0") {
			t.Errorf("the retained WAL share must divide by a limit > 0 and map the -1 of an unlimited one to \"unlimited\": %s", e)
		}
	}
	if !found {
		t.Error("the top row (y = 1) has no panel of retained WAL over max_slot_wal_keep_size")
	}
	checkDashboardLayout(t, panels)
}

// checkDashboardLayout: unique panel ids, and panels within 24 columns that do not
// overlap (Grafana would push them around).
func checkDashboardLayout(t *testing.T, panels []any) {
	t.Helper()
	type box struct{ x, y, w, h int }
	ids := map[float64]bool{}
	var boxes []box
	var titles []string
	for _, p := range panels {
		id := get(t, p, "id").(float64)
		if ids[id] {
			t.Errorf("panel id %v used twice", id)
		}
		ids[id] = true
		g := func(k string) int { return int(get(t, p, "gridPos", k).(float64)) }
		b := box{g("x"), g("y"), g("w"), g("h")}
		title, _ := get(t, p, "title").(string)
		if b.x < 0 || b.w <= 0 || b.x+b.w > 24 {
			t.Errorf("panel %q is outside the 24 columns: %+v", title, b)
		}
		for i, o := range boxes {
			if b.x < o.x+o.w && o.x < b.x+b.w && b.y < o.y+o.h && o.y < b.y+b.h {
				t.Errorf("panels %q and %q overlap: %+v, %+v", titles[i], title, o, b)
			}
		}
		boxes, titles = append(boxes, b), append(titles, title)
	}
}

// TestDashboardQueriesParse: every dashboard query is valid PromQL (promtool checks
// them as recording rules, with Grafana's variables filled in).
func TestDashboardQueriesParse(t *testing.T) {
	raw, err := os.ReadFile("grafana/dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	var dash map[string]any
	if err := json.Unmarshal(raw, &dash); err != nil {
		t.Fatal(err)
	}
	var exprs []string
	collectExprs(dash, &exprs)
	vars := strings.NewReplacer(`"$job"`, `".+"`, "$__rate_interval", "1m", "$__interval", "15s", "$__range", "1h")
	var rules []map[string]string
	for i, e := range exprs {
		rules = append(rules, map[string]string{"record": fmt.Sprintf("dashboard:query_%d", i), "expr": vars.Replace(e)})
	}
	out, err := yaml.Marshal(map[string]any{"groups": []any{map[string]any{"name": "dashboard", "rules": rules}}})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "dashboard.yml"), out, 0o644); err != nil {
		t.Fatal(err)
	}
	promtool(t, dir, "check", "rules", "dashboard.yml")
}

// knownEnv is every environment variable the streamer reads: the config package's
// settings plus those of the operators' view that cmd/ wires (see the metrics and
// telemetry packages).
func knownEnv(t *testing.T) map[string]bool {
	t.Helper()
	var buf bytes.Buffer
	src := config.NewSource(flag.NewFlagSet("x", flag.ContinueOnError), func(string) (string, bool) { return "", false })
	config.Bind(src, &config.Config{})
	src.PrintUsage(&buf)
	env := map[string]bool{}
	name := regexp.MustCompile(`^[A-Z][A-Z0-9_]+$`)
	for _, line := range strings.Split(buf.String(), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && name.MatchString(f[1]) {
			env[f[1]] = true
		}
	}
	if !env["DATABASE_URL"] || !env["REPLICATION_SLOT_NAME"] {
		t.Fatalf("could not read the settings from config.PrintUsage:\n%s", buf.String())
	}
	for _, e := range []string{"METRICS_ADDR", "SENTRY_CONFIG_DSN", "SENTRY_CONFIG_ENVIRONMENT", "OTEL_EXPORTER_OTLP_ENDPOINT",
		// Read by the Go runtime itself.
		"GOMEMLIMIT"} {
		env[e] = true
	}
	return env
}

// secretEnv is every setting the streamer treats as a secret ("(secret)" in its
// usage), aliases included.
func secretEnv(t *testing.T) []string {
	t.Helper()
	var buf bytes.Buffer
	src := config.NewSource(flag.NewFlagSet("x", flag.ContinueOnError), func(string) (string, bool) { return "", false })
	config.Bind(src, &config.Config{})
	src.PrintUsage(&buf)
	var names []string
	name := regexp.MustCompile(`^[A-Z][A-Z0-9_]+$`)
	for _, line := range strings.Split(buf.String(), "\n") {
		if !strings.Contains(line, "(secret)") {
			continue
		}
		f := strings.Fields(line)
		for i := 1; i < len(f) && (i == 1 || f[i-1] == "|"); i += 2 {
			if name.MatchString(f[i]) {
				names = append(names, f[i])
			}
		}
	}
	if !slices.Contains(names, "DATABASE_URL") || !slices.Contains(names, "CLICKHOUSE_PASSWORD") {
		t.Fatalf("could not read the secret settings from config.PrintUsage:\n%s", buf.String())
	}
	slices.Sort(names)
	return names
}

func TestDockerCompose(t *testing.T) {
	compose := mustDoc(t, filepath.Join(root, "docker-compose.yml"))
	services, _ := compose["services"].(map[string]any)
	env := knownEnv(t)
	for _, name := range []string{"postgres", "clickhouse", "migrate", "streamer-1", "streamer-2", "demo", "otel-collector", "prometheus", "grafana"} {
		svc, ok := services[name].(map[string]any)
		if !ok {
			t.Errorf("no service %s", name)
			continue
		}
		// Every long-running service has a health check, or says why it cannot.
		if name != "migrate" {
			hc, _ := svc["healthcheck"].(map[string]any)
			if hc == nil || (hc["test"] == nil && hc["disable"] != true) {
				t.Errorf("service %s has no healthcheck", name)
			}
		}
	}
	// The entrypoint's init server listens on the Unix socket only: a socket check
	// passes before the real server is up, and migrate would start too early.
	hc := fmt.Sprint(get(t, services, "postgres", "healthcheck", "test"))
	if !strings.Contains(hc, "pg_isready") || !strings.Contains(hc, "-h 127.0.0.1") {
		t.Errorf("the postgres healthcheck must run pg_isready over TCP (-h 127.0.0.1): %s", hc)
	}
	pgCmd, _ := get(t, services, "postgres", "command").([]any)
	if !slices.Contains(pgCmd, any("wal_level=logical")) || !strings.HasPrefix(get(t, services, "postgres", "image").(string), "postgres:17") {
		t.Errorf("postgres must be PostgreSQL 17 with wal_level=logical: %v", services["postgres"])
	}
	for name, want := range map[string][]any{
		"migrate": {"migrate", "up"}, "streamer-1": {"run"}, "streamer-2": {"run"},
	} {
		if got := get(t, services, name, "command"); !reflect.DeepEqual(got, want) {
			t.Errorf("%s command = %v, want %v", name, got, want)
		}
	}
	if cmd, _ := get(t, services, "demo", "command").([]any); len(cmd) == 0 || cmd[0] != "demo" {
		t.Errorf("demo command = %v", cmd)
	}
	for _, name := range []string{"migrate", "streamer-1", "streamer-2", "demo"} {
		vars, _ := get(t, services, name, "environment").(map[string]any)
		if len(vars) == 0 {
			t.Errorf("%s has no environment", name)
		}
		for k := range vars {
			if !env[k] {
				t.Errorf("%s sets %s, which the streamer does not read", name, k)
			}
		}
		if name == "streamer-1" && vars["METRICS_ADDR"] != "0.0.0.0:8187" {
			t.Errorf("streamer METRICS_ADDR = %v: Prometheus in another container cannot reach loopback", vars["METRICS_ADDR"])
		}
	}
	// Prometheus scrapes both replicas where they listen.
	prom := mustDoc(t, "prometheus/prometheus.yml")
	targets := get(t, prom, "scrape_configs", 0, "static_configs", 0, "targets")
	if get(t, prom, "scrape_configs", 0, "job_name") != "outbox-streamer" ||
		!reflect.DeepEqual(targets, []any{"streamer-1:8187", "streamer-2:8187"}) {
		t.Errorf("prometheus.yml does not scrape both streamers as job outbox-streamer: %v", targets)
	}
	// The mounts of the configuration files point at files that exist.
	for _, svc := range []string{"otel-collector", "prometheus", "grafana"} {
		vols, _ := get(t, services, svc, "volumes").([]any)
		for _, v := range vols {
			src := strings.SplitN(v.(string), ":", 2)[0]
			if strings.HasPrefix(src, "./") {
				if _, err := os.Stat(filepath.Join(root, src)); err != nil {
					t.Errorf("%s mounts %s: %v", svc, src, err)
				}
			}
		}
	}
	// The collector's configuration uses what current collectors accept: the logging
	// exporter is gone (debug replaced it), and so is telemetry.metrics.address
	// (readers replaced it).
	otel := mustDoc(t, "otel-collector.yaml")
	if exp, _ := otel["exporters"].(map[string]any); exp["logging"] != nil || exp["debug"] == nil {
		t.Errorf("otel-collector.yaml exporters = %v: use debug, the logging exporter was removed", exp)
	}
	if get(t, otel, "service", "telemetry", "metrics", "address") != nil || get(t, otel, "service", "telemetry", "metrics", "readers") == nil {
		t.Error("otel-collector.yaml: the collector's own metrics need service.telemetry.metrics.readers (address was removed)")
	}
	// Grafana's dashboard provider reads the directory the dashboard is mounted in.
	prov := mustDoc(t, "grafana/provisioning/dashboards/outbox-streamer.yml")
	dir := get(t, prov, "providers", 0, "options", "path").(string)
	mounted := false
	for _, v := range get(t, services, "grafana", "volumes").([]any) {
		if strings.Contains(v.(string), "dashboard.json:"+dir+"/") {
			mounted = true
		}
	}
	if !mounted {
		t.Errorf("grafana does not mount dashboard.json under the provider's path %s", dir)
	}
}

// streamerPod checks what every pod running the streamer's image needs, the
// Deployment's and the migration Job's alike: a non-root, read-only container, the
// settings the binary reads, secrets only from the Secret secretName (keys: the
// Secret's keys, nil: not checked), and GOMEMLIMIT at about 90% of the memory
// limit. It returns the container.
func streamerPod(t *testing.T, where string, pod any, secretName string, keys map[string]any) any {
	t.Helper()
	if get(t, pod, "securityContext", "runAsNonRoot") != true {
		t.Errorf("%s: pod securityContext must set runAsNonRoot", where)
	}
	if uid, _ := get(t, pod, "securityContext", "runAsUser").(int); uid == 0 {
		t.Errorf("%s: pod securityContext.runAsUser must be the image's non-root uid (65532)", where)
	}
	if get(t, pod, "automountServiceAccountToken") != false {
		t.Errorf("%s: the streamer needs no Kubernetes API token (automountServiceAccountToken: false)", where)
	}
	containers, _ := get(t, pod, "containers").([]any)
	if len(containers) != 1 {
		t.Fatalf("%s: %d containers, want 1", where, len(containers))
	}
	c := containers[0]
	for k, want := range map[string]any{"readOnlyRootFilesystem": true, "allowPrivilegeEscalation": false, "runAsNonRoot": true} {
		if got := get(t, c, "securityContext", k); got != want {
			t.Errorf("%s: container securityContext.%s = %v, want %v", where, k, got, want)
		}
	}
	if drop := fmt.Sprint(get(t, c, "securityContext", "capabilities", "drop")); drop != "[ALL]" {
		t.Errorf("%s: container must drop all capabilities, drops %s", where, drop)
	}
	known := knownEnv(t)
	secrets := secretEnv(t)
	seen := map[string]bool{}
	for _, e := range get(t, c, "env").([]any) {
		name := get(t, e, "name").(string)
		if seen[name] {
			t.Errorf("%s sets %s twice", where, name)
		}
		seen[name] = true
		if !known[name] {
			t.Errorf("%s sets %s, which the streamer does not read", where, name)
		}
		ref, _ := lookup(e, "valueFrom", "secretKeyRef").(map[string]any)
		if slices.Contains(secrets, name) && (get(t, e, "value") != nil || ref == nil) {
			t.Errorf("%s: %s must come from the Secret, not a literal", where, name)
		}
		if ref != nil {
			if ref["name"] != secretName {
				t.Errorf("%s: env %s reads Secret %v, want %s", where, name, ref["name"], secretName)
			}
			if _, ok := keys[ref["key"].(string)]; keys != nil && !ok && ref["optional"] != true {
				t.Errorf("%s: env %s reads secret key %v, which the Secret lacks", where, name, ref["key"])
			}
		}
		if name == "METRICS_ADDR" && get(t, e, "value") != "0.0.0.0:8187" {
			t.Errorf("%s: METRICS_ADDR = %v, want 0.0.0.0:8187 (Prometheus and the probes cannot reach loopback)", where, get(t, e, "value"))
		}
		if name == "GOMEMLIMIT" {
			checkGoMemLimit(t, where, get(t, e, "value"), get(t, c, "resources", "limits", "memory"))
		}
	}
	for _, want := range []string{"DATABASE_URL", "CLICKHOUSE_PASSWORD", "METRICS_ADDR", "GOMEMLIMIT"} {
		if !seen[want] {
			t.Errorf("%s does not set %s", where, want)
		}
	}
	return c
}

// quantity parses a Kubernetes memory quantity or a GOMEMLIMIT value into bytes.
func quantity(s string) (int64, error) {
	m := regexp.MustCompile(`^([0-9]+)(|B|Ki|Mi|Gi|Ti|KiB|MiB|GiB|TiB|k|M|G|T)$`).FindStringSubmatch(s)
	if m == nil {
		return 0, fmt.Errorf("%q is not a whole number of bytes with a unit", s)
	}
	n, err := strconv.ParseInt(m[1], 10, 64)
	mult := map[string]int64{"": 1, "B": 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40,
		"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[m[2]]
	return n * mult, err
}

// checkGoMemLimit: GOMEMLIMIT below the container's memory limit, at about 90% of
// it (the rest is memory the Go runtime does not count).
func checkGoMemLimit(t *testing.T, where string, gomemlimit, limit any) {
	t.Helper()
	gs, _ := gomemlimit.(string)
	ls, _ := limit.(string)
	g, err1 := quantity(gs)
	l, err2 := quantity(ls)
	if err := errors.Join(err1, err2); err != nil {
		t.Errorf("%s: GOMEMLIMIT %v, memory limit %v: %v", where, gomemlimit, limit, err)
		return
	}
	if r := float64(g) / float64(l); g >= l || r < 0.85 || r > 0.95 {
		t.Errorf("%s: GOMEMLIMIT %s is %.0f%% of the memory limit %s, want about 90%% (below the limit)", where, gs, 100*r, ls)
	}
}

// migrationJob checks a Job running outbox-streamer migrate up: bounded retries, a
// ttl, a pod that never restarts in place and that the streamers' selector does
// not match. It returns the pod spec.
func migrationJob(t *testing.T, where string, job map[string]any, streamerSelector map[string]any) any {
	t.Helper()
	if job["kind"] != "Job" {
		t.Fatalf("%s: kind %v, want Job", where, job["kind"])
	}
	spec := get(t, job, "spec")
	if n, ok := get(t, spec, "backoffLimit").(int); !ok || n < 1 || n > 10 {
		t.Errorf("%s: backoffLimit = %v, want a small number of retries", where, get(t, spec, "backoffLimit"))
	}
	if n, ok := get(t, spec, "ttlSecondsAfterFinished").(int); !ok || n <= 0 {
		t.Errorf("%s: ttlSecondsAfterFinished = %v, want the finished Job removed after a while", where, get(t, spec, "ttlSecondsAfterFinished"))
	}
	if n, ok := get(t, spec, "activeDeadlineSeconds").(int); !ok || n <= 0 {
		t.Errorf("%s: activeDeadlineSeconds = %v, want a bound", where, get(t, spec, "activeDeadlineSeconds"))
	}
	pod := get(t, spec, "template", "spec")
	if rp := get(t, pod, "restartPolicy"); rp != "Never" && rp != "OnFailure" {
		t.Errorf("%s: restartPolicy %v", where, rp)
	}
	if got := get(t, pod, "containers", 0, "args"); !reflect.DeepEqual(got, []any{"migrate", "up"}) {
		t.Errorf("%s: args %v, want [migrate up]", where, got)
	}
	labels, _ := get(t, spec, "template", "metadata", "labels").(map[string]any)
	matches := len(streamerSelector) > 0
	for k, v := range streamerSelector {
		if labels[k] != v {
			matches = false
		}
	}
	if matches {
		t.Errorf("%s: the Job's pod labels %v match the streamers' selector %v (the Service and the PodDisruptionBudget would count it)", where, labels, streamerSelector)
	}
	return pod
}

func TestKubernetesManifests(t *testing.T) {
	dep := mustDoc(t, "kubernetes/deployment.yaml")
	if get(t, dep, "spec", "replicas") != 2 {
		t.Errorf("replicas = %v, want 2 (leader and standby)", get(t, dep, "spec", "replicas"))
	}
	podLabels := get(t, dep, "spec", "template", "metadata", "labels").(map[string]any)
	selector := get(t, dep, "spec", "selector", "matchLabels").(map[string]any)
	if !reflect.DeepEqual(selector, podLabels) {
		t.Error("the Deployment's selector does not match its pod labels")
	}
	pod := get(t, dep, "spec", "template", "spec")
	secretKeys := get(t, mustDoc(t, "kubernetes/secret.example.yaml"), "stringData").(map[string]any)
	c := streamerPod(t, "deployment.yaml", pod, "outbox-streamer", secretKeys)
	if get(t, c, "readinessProbe", "httpGet", "path") != "/readyz" || get(t, c, "livenessProbe", "httpGet", "path") != "/healthz" {
		t.Error("readiness must probe /readyz and liveness /healthz")
	}
	if get(t, c, "ports", 0, "name") != "metrics" || get(t, c, "ports", 0, "containerPort") != 8187 {
		t.Error("the container must expose port 8187 named metrics")
	}
	if !reflect.DeepEqual(get(t, c, "args"), []any{"run"}) {
		t.Errorf("the Deployment runs %v, want [run]", get(t, c, "args"))
	}

	// The migration Job: the Deployment's image, environment and Secret.
	job := mustDoc(t, "kubernetes/migrate-job.yaml")
	jobPod := migrationJob(t, "migrate-job.yaml", job, selector)
	jc := streamerPod(t, "migrate-job.yaml", jobPod, "outbox-streamer", secretKeys)
	for _, k := range []string{"image", "env", "resources", "securityContext"} {
		if !reflect.DeepEqual(get(t, jc, k), get(t, c, k)) {
			t.Errorf("migrate-job.yaml's container %s differs from the Deployment's", k)
		}
	}
	if !reflect.DeepEqual(get(t, jobPod, "securityContext"), get(t, pod, "securityContext")) {
		t.Error("migrate-job.yaml's pod securityContext differs from the Deployment's")
	}

	svc := mustDoc(t, "kubernetes/service.yaml")
	if !reflect.DeepEqual(get(t, svc, "spec", "selector"), podLabels) {
		t.Error("the Service does not select the streamer pods")
	}
	if get(t, svc, "spec", "ports", 0, "port") != 8187 || get(t, svc, "spec", "ports", 0, "targetPort") != "metrics" {
		t.Error("the Service must serve port 8187 from the container's metrics port")
	}
	pdb := mustDoc(t, "kubernetes/poddisruptionbudget.yaml")
	if !reflect.DeepEqual(get(t, pdb, "spec", "selector", "matchLabels"), podLabels) || get(t, pdb, "spec", "minAvailable") != 1 {
		t.Error("the PodDisruptionBudget must keep one streamer pod available")
	}
	sm := mustDoc(t, "kubernetes/servicemonitor.yaml")
	if get(t, sm, "spec", "endpoints", 0, "port") != get(t, svc, "spec", "ports", 0, "name") {
		t.Error("the ServiceMonitor scrapes a port the Service does not name")
	}
	svcLabels := get(t, svc, "metadata", "labels").(map[string]any)
	for k, v := range get(t, sm, "spec", "selector", "matchLabels").(map[string]any) {
		if svcLabels[k] != v {
			t.Errorf("the ServiceMonitor selects %s=%v, which the Service lacks", k, v)
		}
	}
	// jobLabel makes job="outbox-streamer", the value the alerts select on.
	if jl := get(t, sm, "spec", "jobLabel").(string); svcLabels[jl] != "outbox-streamer" {
		t.Errorf("ServiceMonitor jobLabel %s gives job %v, want outbox-streamer", jl, svcLabels[jl])
	}
	// kustomize applies every manifest except the Secret example.
	kz := mustDoc(t, "kubernetes/kustomization.yaml")
	res := get(t, kz, "resources").([]any)
	for _, f := range []string{"migrate-job.yaml", "deployment.yaml", "service.yaml", "poddisruptionbudget.yaml", "servicemonitor.yaml", "prometheusrule.yaml"} {
		if !slices.Contains(res, any(f)) {
			t.Errorf("kustomization.yaml does not list %s", f)
		}
	}
	if slices.Contains(res, any("secret.example.yaml")) {
		t.Error("kustomization.yaml must not apply the example Secret")
	}
	// The images transformer renames the one image both pods use.
	if get(t, kz, "images", 0, "name") != get(t, c, "image") {
		t.Errorf("kustomization.yaml renames image %v, the pods use %v", get(t, kz, "images", 0, "name"), get(t, c, "image"))
	}
}

func TestDockerfile(t *testing.T) {
	raw, err := os.ReadFile(filepath.Join(root, "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	df := string(raw)
	for _, want := range []string{
		"FROM golang:1.26 AS build", "CGO_ENABLED=0", "./cmd/outbox-streamer", "gcr.io/distroless/static",
		"USER 65532:65532", `ENTRYPOINT ["/usr/local/bin/outbox-streamer"]`, `CMD ["run"]`,
	} {
		if !strings.Contains(df, want) {
			t.Errorf("Dockerfile lacks %q", want)
		}
	}
	if _, err := os.Stat(filepath.Join(root, "cmd", "outbox-streamer", "main.go")); err != nil {
		t.Errorf("the Dockerfile builds ./cmd/outbox-streamer: %v", err)
	}
}
