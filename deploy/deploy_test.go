package deploy

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"

	dto "github.com/prometheus/client_model/go"
	"gopkg.in/yaml.v3"

	"github.com/outbox-streamer/outbox-streamer/internal/config"
	"github.com/outbox-streamer/outbox-streamer/internal/metrics"
)

// root is the repository root, relative to this package's directory.
const root = ".."

// yamlFiles returns every YAML file of the deployment: docker-compose.yml and all of
// deploy/.
func yamlFiles(t *testing.T) []string {
	t.Helper()
	files := []string{filepath.Join(root, "docker-compose.yml")}
	err := filepath.WalkDir(".", func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
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

func TestEveryYAMLAndJSONFileParses(t *testing.T) {
	files := yamlFiles(t)
	if len(files) < 12 {
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
	m.SetSlot(metrics.SlotStats{Slot: "s", Exists: true, Active: true, LagBytes: &v, RetainedBytes: &v, SafeWALSize: &v})
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
		"outbox_streamer_leader",
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
	for _, e := range []string{"METRICS_ADDR", "SENTRY_CONFIG_DSN", "SENTRY_CONFIG_ENVIRONMENT", "OTEL_EXPORTER_OTLP_ENDPOINT"} {
		env[e] = true
	}
	return env
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

func TestKubernetesManifests(t *testing.T) {
	dep := mustDoc(t, "kubernetes/deployment.yaml")
	if get(t, dep, "spec", "replicas") != 2 {
		t.Errorf("replicas = %v, want 2 (leader and standby)", get(t, dep, "spec", "replicas"))
	}
	podLabels := get(t, dep, "spec", "template", "metadata", "labels").(map[string]any)
	if !reflect.DeepEqual(get(t, dep, "spec", "selector", "matchLabels"), podLabels) {
		t.Error("the Deployment's selector does not match its pod labels")
	}
	pod := get(t, dep, "spec", "template", "spec")
	if get(t, pod, "securityContext", "runAsNonRoot") != true {
		t.Error("pod securityContext must set runAsNonRoot")
	}
	c := get(t, pod, "containers", 0)
	for k, want := range map[string]any{"readOnlyRootFilesystem": true, "allowPrivilegeEscalation": false, "runAsNonRoot": true} {
		if got := get(t, c, "securityContext", k); got != want {
			t.Errorf("container securityContext.%s = %v, want %v", k, got, want)
		}
	}
	if get(t, c, "readinessProbe", "httpGet", "path") != "/readyz" || get(t, c, "livenessProbe", "httpGet", "path") != "/healthz" {
		t.Error("readiness must probe /readyz and liveness /healthz")
	}
	if get(t, c, "ports", 0, "name") != "metrics" || get(t, c, "ports", 0, "containerPort") != 8187 {
		t.Error("the container must expose port 8187 named metrics")
	}
	env := knownEnv(t)
	secretKeys := get(t, mustDoc(t, "kubernetes/secret.example.yaml"), "stringData").(map[string]any)
	for _, e := range get(t, c, "env").([]any) {
		name := get(t, e, "name").(string)
		if !env[name] {
			t.Errorf("the Deployment sets %s, which the streamer does not read", name)
		}
		if ref, ok := get(t, e, "valueFrom").(map[string]any); ok {
			key := get(t, ref, "secretKeyRef", "key").(string)
			if _, ok := secretKeys[key]; !ok {
				t.Errorf("env %s reads secret key %s, missing from secret.example.yaml", name, key)
			}
		}
		if name == "DATABASE_URL" || name == "CLICKHOUSE_PASSWORD" {
			if get(t, e, "value") != nil {
				t.Errorf("%s must come from the Secret, not a literal", name)
			}
		}
	}

	svc := mustDoc(t, "kubernetes/service.yaml")
	if !reflect.DeepEqual(get(t, svc, "spec", "selector"), podLabels) {
		t.Error("the Service does not select the streamer pods")
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
	for _, f := range []string{"deployment.yaml", "service.yaml", "poddisruptionbudget.yaml", "servicemonitor.yaml", "prometheusrule.yaml"} {
		if !slices.Contains(res, any(f)) {
			t.Errorf("kustomization.yaml does not list %s", f)
		}
	}
	if slices.Contains(res, any("secret.example.yaml")) {
		t.Error("kustomization.yaml must not apply the example Secret")
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
