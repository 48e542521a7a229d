package deploy

import (
	"bytes"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"
)

// helmVersion is the helm that scripts/install-deps.sh builds into the cache
// (TestInstallDepsBuildsThisHelm keeps the two in step).
const helmVersion = "v4.3.2"

const chartDir = "helm/outbox-streamer"

// helmCachePath is where scripts/install-deps.sh puts helm.
func helmCachePath() string {
	cache := os.Getenv("XDG_CACHE_HOME")
	if cache == "" {
		home, _ := os.UserHomeDir()
		cache = filepath.Join(home, ".cache")
	}
	return filepath.Join(cache, "outbox-streamer", "helm", helmVersion, "helm")
}

// requireHelm: a missing helm fails the test in CI (CI set) or with
// OUTBOX_TEST_REQUIRE_HELM=1, and skips it elsewhere, so that `go test ./deploy`
// works on a machine without it while CI cannot pass by skipping.
func requireHelm() bool {
	ci := os.Getenv("CI")
	return os.Getenv("OUTBOX_TEST_REQUIRE_HELM") == "1" || (ci != "" && ci != "false" && ci != "0")
}

// helmBin finds helm: OUTBOX_HELM, then PATH, then install-deps.sh's cache.
func helmBin(t *testing.T) string {
	t.Helper()
	if p := os.Getenv("OUTBOX_HELM"); p != "" {
		if _, err := os.Stat(p); err != nil {
			t.Fatalf("OUTBOX_HELM=%s: %v", p, err)
		}
		return p
	}
	if p, err := exec.LookPath("helm"); err == nil {
		return p
	}
	if p := helmCachePath(); isExecutable(p) {
		return p
	}
	msg := fmt.Sprintf("helm not found on PATH nor at %s: `make deps` (scripts/install-deps.sh) builds %s there, "+
		"or set OUTBOX_HELM to a helm binary", helmCachePath(), helmVersion)
	if requireHelm() {
		t.Fatal(msg + " (required: CI or OUTBOX_TEST_REQUIRE_HELM=1)")
	}
	t.Skip(msg)
	return ""
}

func isExecutable(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0
}

// helm runs helm with its cache, configuration and data in a temporary directory,
// so that the tests neither read nor change the user's.
func helm(t *testing.T, args ...string) ([]byte, error) {
	t.Helper()
	bin := helmBin(t)
	home := t.TempDir()
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), "HELM_CACHE_HOME="+filepath.Join(home, "cache"),
		"HELM_CONFIG_HOME="+filepath.Join(home, "config"), "HELM_DATA_HOME="+filepath.Join(home, "data"))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("helm %s: %w\n%s%s", strings.Join(args, " "), err, out, stderr.Bytes())
	}
	return out, nil
}

// helmTemplate renders the chart as release "rel" in namespace "ns" and returns its
// objects by kind and name.
func helmTemplate(t *testing.T, args ...string) map[string]map[string]any {
	t.Helper()
	out, err := helm(t, append([]string{"template", "rel", chartDir, "--namespace", "ns"}, args...)...)
	if err != nil {
		t.Fatal(err)
	}
	docs, err := decodeYAML(out)
	if err != nil {
		t.Fatalf("helm template gave invalid YAML: %v\n%s", err, out)
	}
	objs := map[string]map[string]any{}
	for _, d := range docs {
		key := fmt.Sprintf("%v/%v", d["kind"], get(t, d, "metadata", "name"))
		if objs[key] != nil {
			t.Errorf("helm template renders %s twice", key)
		}
		objs[key] = d
	}
	return objs
}

func object(t *testing.T, objs map[string]map[string]any, key string) map[string]any {
	t.Helper()
	o := objs[key]
	if o == nil {
		t.Fatalf("helm template renders no %s (it renders %v)", key, slices.Sorted(maps.Keys(objs)))
	}
	return o
}

// chartAppVersion is Chart.yaml's appVersion, the default image tag.
func chartAppVersion(t *testing.T) string {
	t.Helper()
	v, _ := mustDoc(t, chartDir+"/Chart.yaml")["appVersion"].(string)
	if v == "" {
		t.Fatal("Chart.yaml has no appVersion")
	}
	return v
}

const variantValues = chartDir + "/ci/variant-values.yaml"

func TestHelmLint(t *testing.T) {
	helmBin(t)
	for _, c := range []struct {
		name string
		args []string
	}{{"default values", nil}, {"variant values", []string{"-f", variantValues}}} {
		t.Run(c.name, func(t *testing.T) {
			out, err := helm(t, append([]string{"lint", "--strict", chartDir}, c.args...)...)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("%s", out)
		})
	}
}

// checkChart checks a rendering of the chart, whatever the values: the streamer
// pods, the Service, the PodDisruptionBudget, the migration Job, the Secret
// references and the optional Prometheus Operator objects.
func checkChart(t *testing.T, objs map[string]map[string]any, replicas int, image, secretName string, secretKeys map[string]any) {
	t.Helper()
	dep := object(t, objs, "Deployment/rel-outbox-streamer")
	if get(t, dep, "spec", "replicas") != replicas {
		t.Errorf("replicas = %v, want %d", get(t, dep, "spec", "replicas"), replicas)
	}
	selector := get(t, dep, "spec", "selector", "matchLabels").(map[string]any)
	podLabels := get(t, dep, "spec", "template", "metadata", "labels").(map[string]any)
	for k, v := range selector {
		if podLabels[k] != v {
			t.Errorf("the Deployment's selector %s=%v does not match its pods", k, v)
		}
	}
	pod := get(t, dep, "spec", "template", "spec")
	c := streamerPod(t, "the chart's Deployment", pod, secretName, secretKeys)
	if get(t, c, "image") != image {
		t.Errorf("image = %v, want %s", get(t, c, "image"), image)
	}
	if !reflect.DeepEqual(get(t, c, "args"), []any{"run"}) {
		t.Errorf("the Deployment runs %v, want [run]", get(t, c, "args"))
	}
	if get(t, c, "readinessProbe", "httpGet", "path") != "/readyz" || get(t, c, "livenessProbe", "httpGet", "path") != "/healthz" ||
		get(t, c, "readinessProbe", "httpGet", "port") != "metrics" || get(t, c, "livenessProbe", "httpGet", "port") != "metrics" {
		t.Error("readiness must probe /readyz and liveness /healthz, on the metrics port")
	}
	if get(t, c, "ports", 0, "name") != "metrics" || get(t, c, "ports", 0, "containerPort") != 8187 {
		t.Error("the container must expose port 8187 named metrics")
	}
	if n, _ := get(t, pod, "terminationGracePeriodSeconds").(int); n <= 30 {
		t.Errorf("terminationGracePeriodSeconds = %d: leave margin beyond SHUTDOWN_TIMEOUT (30 s)", n)
	}
	if get(t, dep, "spec", "strategy", "rollingUpdate", "maxUnavailable") != 0 {
		t.Error("a rollout must start the new standby before stopping an old pod (maxUnavailable: 0)")
	}

	svc := object(t, objs, "Service/rel-outbox-streamer")
	if !reflect.DeepEqual(get(t, svc, "spec", "selector"), selector) {
		t.Error("the Service does not select the streamer pods")
	}
	if get(t, svc, "spec", "ports", 0, "port") != 8187 || get(t, svc, "spec", "ports", 0, "targetPort") != "metrics" ||
		get(t, svc, "spec", "ports", 0, "name") != "metrics" {
		t.Error("the Service must serve port 8187, named metrics, from the container's metrics port")
	}
	if pdb := objs["PodDisruptionBudget/rel-outbox-streamer"]; replicas > 1 {
		if pdb == nil || !reflect.DeepEqual(get(t, pdb, "spec", "selector", "matchLabels"), selector) || get(t, pdb, "spec", "minAvailable") != 1 {
			t.Error("the PodDisruptionBudget must keep one streamer pod available")
		}
	} else if pdb != nil {
		t.Error("with one replica a PodDisruptionBudget of minAvailable 1 blocks every drain")
	}

	// The migration Job: a pre-install and pre-upgrade hook with the Deployment's
	// image and environment (its Secret aside, see below).
	job := object(t, objs, "Job/rel-outbox-streamer-migrate")
	hooks := strings.Split(fmt.Sprint(get(t, job, "metadata", "annotations", "helm.sh/hook")), ",")
	if !slices.Contains(hooks, "pre-install") || !slices.Contains(hooks, "pre-upgrade") {
		t.Errorf("the migration Job is hook %v, want pre-install and pre-upgrade", hooks)
	}
	if p := fmt.Sprint(get(t, job, "metadata", "annotations", "helm.sh/hook-delete-policy")); !strings.Contains(p, "before-hook-creation") {
		t.Errorf("the migration Job's hook-delete-policy %s: the next release's Job must replace it (before-hook-creation)", p)
	}
	jobSecret := secretName
	if objs["Secret/rel-outbox-streamer"] != nil {
		jobSecret = "rel-outbox-streamer-migrate"
	}
	jobPod := migrationJob(t, "the chart's migration Job", job, selector)
	jc := streamerPod(t, "the chart's migration Job", jobPod, jobSecret, secretKeys)
	for _, k := range []string{"image", "resources", "securityContext"} {
		if !reflect.DeepEqual(get(t, jc, k), get(t, c, k)) {
			t.Errorf("the migration Job's container %s differs from the Deployment's", k)
		}
	}
	if !reflect.DeepEqual(envWithSecret(t, jc, jobSecret, secretName), get(t, c, "env")) {
		t.Error("the migration Job's env differs from the Deployment's (beyond the name of its Secret)")
	}
	if !reflect.DeepEqual(get(t, jobPod, "securityContext"), get(t, pod, "securityContext")) {
		t.Error("the migration Job's pod securityContext differs from the Deployment's")
	}

	// Secrets never in a ConfigMap (the chart makes none; a later one must not carry them).
	secrets := secretEnv(t)
	for key, o := range objs {
		if o["kind"] == "ConfigMap" {
			data, _ := lookup(o, "data").(map[string]any)
			for k := range data {
				if slices.Contains(secrets, k) {
					t.Errorf("%s holds %s, a secret", key, k)
				}
			}
		}
	}

	// With the Prometheus Operator objects: the ServiceMonitor scrapes the Service's
	// metrics port as job outbox-streamer, the PrometheusRule carries alerts.yml.
	if sm := objs["ServiceMonitor/rel-outbox-streamer"]; sm != nil {
		if get(t, sm, "spec", "endpoints", 0, "port") != "metrics" || get(t, sm, "spec", "endpoints", 0, "path") != "/metrics" {
			t.Error("the ServiceMonitor must scrape /metrics on the Service's metrics port")
		}
		svcLabels := get(t, svc, "metadata", "labels").(map[string]any)
		for k, v := range get(t, sm, "spec", "selector", "matchLabels").(map[string]any) {
			if svcLabels[k] != v {
				t.Errorf("the ServiceMonitor selects %s=%v, which the Service lacks", k, v)
			}
		}
		if jl := get(t, sm, "spec", "jobLabel").(string); svcLabels[jl] != "outbox-streamer" {
			t.Errorf("ServiceMonitor jobLabel %s gives job %v, want outbox-streamer (the rules select it)", jl, svcLabels[jl])
		}
	}
	if rule := objs["PrometheusRule/rel-outbox-streamer"]; rule != nil {
		if got, want := get(t, rule, "spec", "groups"), alertGroups(t); !reflect.DeepEqual(got, want) {
			t.Error("the chart's PrometheusRule spec.groups differ from prometheus/alerts.yml groups")
		}
	}
}

// envWithSecret is a container's env with the Secret from renamed to to.
func envWithSecret(t *testing.T, c any, from, to string) any {
	t.Helper()
	raw, _ := yaml.Marshal(get(t, c, "env"))
	var env []any
	if err := yaml.Unmarshal(raw, &env); err != nil {
		t.Fatal(err)
	}
	for _, e := range env {
		if ref, ok := lookup(e, "valueFrom", "secretKeyRef").(map[string]any); ok && ref["name"] == from {
			ref["name"] = to
		}
	}
	return env
}

func envValue(t *testing.T, c any, name string) any {
	t.Helper()
	for _, e := range get(t, c, "env").([]any) {
		if get(t, e, "name") == name {
			if v := lookup(e, "value"); v != nil {
				return v
			}
			return lookup(e, "valueFrom")
		}
	}
	return nil
}

// TestHelmTemplateDefaults: the default values give what deploy/kubernetes gives,
// with the Secret made elsewhere and no Prometheus Operator objects.
func TestHelmTemplateDefaults(t *testing.T) {
	objs := helmTemplate(t)
	secretKeys := get(t, mustDoc(t, "kubernetes/secret.example.yaml"), "stringData").(map[string]any)
	checkChart(t, objs, 2, "registry.example.com/outbox-streamer:"+chartAppVersion(t), "outbox-streamer", secretKeys)
	for key := range objs {
		if k := strings.SplitN(key, "/", 2)[0]; k == "Secret" || k == "ServiceMonitor" || k == "PrometheusRule" {
			t.Errorf("the default values render %s (existing Secret, no Prometheus Operator objects expected)", key)
		}
	}
	// The same settings as the plain Deployment, the same memory limit and GOMEMLIMIT.
	c := get(t, object(t, objs, "Deployment/rel-outbox-streamer"), "spec", "template", "spec", "containers", 0)
	plain := get(t, mustDoc(t, "kubernetes/deployment.yaml"), "spec", "template", "spec", "containers", 0)
	names := func(c any) []string {
		var n []string
		for _, e := range get(t, c, "env").([]any) {
			n = append(n, get(t, e, "name").(string))
		}
		slices.Sort(n)
		return n
	}
	if got, want := names(c), names(plain); !slices.Equal(got, want) {
		t.Errorf("the chart's default env %v differs from deploy/kubernetes/deployment.yaml's %v", got, want)
	}
	if !reflect.DeepEqual(get(t, c, "resources"), get(t, plain, "resources")) || envValue(t, c, "GOMEMLIMIT") != envValue(t, plain, "GOMEMLIMIT") {
		t.Error("the chart's default resources or GOMEMLIMIT differ from deploy/kubernetes/deployment.yaml's")
	}
}

// TestHelmTemplateVariant: the chart makes the Secret (and a hook copy for the
// migration Job), renders the ServiceMonitor and PrometheusRule with the labels
// asked for, and follows replicas, image tag and memory limit.
func TestHelmTemplateVariant(t *testing.T) {
	objs := helmTemplate(t, "-f", variantValues)
	values := mustDoc(t, variantValues)
	secretValues := get(t, values, "secret", "values").(map[string]any)
	checkChart(t, objs, 3, "ghcr.io/example/outbox-streamer:v9.9.9", "rel-outbox-streamer", secretValues)

	secret := object(t, objs, "Secret/rel-outbox-streamer")
	if !reflect.DeepEqual(get(t, secret, "stringData"), secretValues) {
		t.Errorf("the Secret holds %v, want secret.values", get(t, secret, "stringData"))
	}
	if a := lookup(secret, "metadata", "annotations", "helm.sh/hook"); a != nil {
		t.Errorf("the streamers' Secret is a hook (%v): it must belong to the release", a)
	}
	// A pre-install hook runs before the release's Secret exists: the Job reads a
	// hook copy made before it and deleted after the hooks succeed.
	hookSecret := object(t, objs, "Secret/rel-outbox-streamer-migrate")
	if !reflect.DeepEqual(get(t, hookSecret, "stringData"), secretValues) {
		t.Error("the migration Job's Secret differs from the streamers'")
	}
	job := object(t, objs, "Job/rel-outbox-streamer-migrate")
	if get(t, hookSecret, "metadata", "annotations", "helm.sh/hook") != get(t, job, "metadata", "annotations", "helm.sh/hook") {
		t.Error("the migration Job's Secret is not a hook of the same events as the Job")
	}
	weight := func(o map[string]any) int {
		var n int
		fmt.Sscan(fmt.Sprint(get(t, o, "metadata", "annotations", "helm.sh/hook-weight")), &n)
		return n
	}
	if weight(hookSecret) >= weight(job) {
		t.Errorf("hook weights: Secret %d, Job %d: the Secret must come first", weight(hookSecret), weight(job))
	}
	if p := fmt.Sprint(get(t, hookSecret, "metadata", "annotations", "helm.sh/hook-delete-policy")); !strings.Contains(p, "hook-succeeded") {
		t.Errorf("the hook Secret's delete policy %s leaves credentials behind (want hook-succeeded)", p)
	}
	// The pods roll when the Secret changes.
	if lookup(object(t, objs, "Deployment/rel-outbox-streamer"), "spec", "template", "metadata", "annotations", "checksum/secret") == nil {
		t.Error("the Deployment's pods carry no checksum of the Secret the chart makes")
	}
	// GOMEMLIMIT follows the 1Gi limit; env values and extraEnv come through.
	c := get(t, object(t, objs, "Deployment/rel-outbox-streamer"), "spec", "template", "spec", "containers", 0)
	for name, want := range map[string]any{"GOMEMLIMIT": "921MiB", "EVENT_BATCH_SIZE": "5000", "CLICKHOUSE_PROTOCOL": "http",
		"SENTRY_CONFIG_ENVIRONMENT": map[string]any{"fieldRef": map[string]any{"fieldPath": "metadata.namespace"}}} {
		if got := envValue(t, c, name); !reflect.DeepEqual(got, want) {
			t.Errorf("env %s = %v, want %v", name, got, want)
		}
	}
	for _, k := range []string{"ServiceMonitor/rel-outbox-streamer", "PrometheusRule/rel-outbox-streamer"} {
		if get(t, object(t, objs, k), "metadata", "labels", "release") != "kube-prometheus-stack" {
			t.Errorf("%s lacks the label its Prometheus selects by (release: kube-prometheus-stack)", k)
		}
	}
}

// TestHelmTemplateRefuses: values that would put a secret in plain sight, leave
// the made Secret incomplete or break the rules' job label fail the rendering
// with a message that says what to set.
func TestHelmTemplateRefuses(t *testing.T) {
	helmBin(t)
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--set", "env.DATABASE_URL=postgres://u:p@h/db"}, "env.DATABASE_URL is a secret"},
		{[]string{"--set", "env.CLICKHOUSE_PASSWORD=x"}, "env.CLICKHOUSE_PASSWORD is a secret"},
		{[]string{"--set", "secret.existingSecret="}, "set secret.values.DATABASE_URL"},
		{[]string{"--set", "secret.existingSecret=", "--set", "secret.values.DATABASE_URL=x", "--set", "secret.values.CLICKHOUSE_PASSWORD=y",
			"--set", "secret.values.TYPO=z"}, "secret.values.TYPO"},
		{[]string{"--set", "env.METRICS_ADDR=127.0.0.1:8187"}, "metrics.port"},
		{[]string{"--set", "env.GOMEMLIMIT=1GiB"}, "goMemLimit"},
		{[]string{"--set", "resources.limits.memory=1.5Gi"}, "goMemLimit"},
		{[]string{"--set", "extraEnv[0].name=ENVIRONMENT", "--set", "extraEnv[0].value=x"}, "extraEnv ENVIRONMENT"},
		{[]string{"--set", "prometheusRule.enabled=true", "--set", "nameOverride=streamer"}, "nameOverride"},
	} {
		t.Run(strings.Join(c.args, " "), func(t *testing.T) {
			_, err := helm(t, append([]string{"template", "rel", chartDir}, c.args...)...)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Errorf("helm template %s = %v, want an error saying %q", strings.Join(c.args, " "), err, c.want)
			}
		})
	}
}

// TestHelmTemplateOptions: one replica has no PodDisruptionBudget, goMemLimit
// overrides or turns off GOMEMLIMIT, the migration Job can be left out.
func TestHelmTemplateOptions(t *testing.T) {
	one := helmTemplate(t, "--set", "replicaCount=1", "--set", "goMemLimit=400MiB", "--set", "migration.enabled=false")
	checkDep := func(objs map[string]map[string]any) any {
		return get(t, object(t, objs, "Deployment/rel-outbox-streamer"), "spec", "template", "spec", "containers", 0)
	}
	if _, ok := one["PodDisruptionBudget/rel-outbox-streamer"]; ok {
		t.Error("one replica: a PodDisruptionBudget of minAvailable 1 would block every drain")
	}
	if _, ok := one["Job/rel-outbox-streamer-migrate"]; ok {
		t.Error("migration.enabled=false still renders the migration Job")
	}
	if got := envValue(t, checkDep(one), "GOMEMLIMIT"); got != "400MiB" {
		t.Errorf("goMemLimit=400MiB gives GOMEMLIMIT %v", got)
	}
	off := helmTemplate(t, "--set", "goMemLimit=off")
	if got := envValue(t, checkDep(off), "GOMEMLIMIT"); got != nil {
		t.Errorf("goMemLimit=off still sets GOMEMLIMIT %v", got)
	}
}

// TestHelmChartFiles needs no helm: the chart's settings are the binary's, its list
// of secret settings is the binary's, and its copy of the alert rules is current
// (TestAlertsCopiesAreCurrent).
func TestHelmChartFiles(t *testing.T) {
	known := knownEnv(t)
	raw, err := os.ReadFile(chartDir + "/values.yaml")
	if err != nil {
		t.Fatal(err)
	}
	// Every upper-case key in values.yaml, commented examples included, is a setting.
	n := 0
	for _, m := range regexp.MustCompile(`(?m)^\s*(?:#\s*)?(?:- name: ([A-Z][A-Z0-9_]{2,})$|([A-Z][A-Z0-9_]{2,}):\s)`).FindAllStringSubmatch(string(raw), -1) {
		n++
		if name := m[1] + m[2]; !known[name] {
			t.Errorf("values.yaml names %s, which the streamer does not read", name)
		}
	}
	if n < 10 {
		t.Errorf("found only %d settings in values.yaml", n)
	}
	var values map[string]any
	if err := yaml.Unmarshal(raw, &values); err != nil {
		t.Fatal(err)
	}
	for k := range get(t, values, "env").(map[string]any) {
		if slices.Contains(secretEnv(t), k) {
			t.Errorf("values.yaml env has %s, a secret", k)
		}
	}

	helpers, err := os.ReadFile(chartDir + "/templates/_helpers.tpl")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?s)define "outbox-streamer.secretSettings" -}}\s*(.*?)\s*{{-? end`).FindSubmatch(helpers)
	if m == nil {
		t.Fatal(`_helpers.tpl has no define "outbox-streamer.secretSettings"`)
	}
	got := strings.Fields(string(m[1]))
	slices.Sort(got)
	if want := secretEnv(t); !slices.Equal(got, want) {
		t.Errorf("the chart's secret settings %v differ from the binary's %v: update outbox-streamer.secretSettings", got, want)
	}
}

// TestInstallDepsBuildsThisHelm: scripts/install-deps.sh builds the helm these
// tests look for in the cache.
func TestInstallDepsBuildsThisHelm(t *testing.T) {
	raw, err := os.ReadFile(filepath.Join(root, "scripts", "install-deps.sh"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"helm_version=" + helmVersion, "helm.sh/helm/v4/cmd/helm@", "outbox-streamer/helm/$helm_version/helm"} {
		if !strings.Contains(string(raw), want) {
			t.Errorf("scripts/install-deps.sh lacks %q", want)
		}
	}
}
