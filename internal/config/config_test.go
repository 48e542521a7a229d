package config

import (
	"flag"
	"io"
	"os"
	"strings"
	"testing"
	"time"
)

func load(t *testing.T, env map[string]string, args ...string) (*Config, error) {
	t.Helper()
	fs := flag.NewFlagSet("test", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	cfg, _, err := Load(fs, args, mapEnv(env))
	return cfg, err
}

func TestDefaults(t *testing.T) {
	cfg, err := load(t, nil)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.BatchSize != 1000 || cfg.BatchTimeout != 100*time.Millisecond || cfg.ClickHouseBatchSize != 10000 ||
		cfg.SweepInterval != time.Minute || cfg.ClickHouse.Table != "event_log" || cfg.ClickHouse.Addr != "localhost:9000" ||
		cfg.ClickHouse.DialTimeout != 30*time.Second || cfg.ClickHouse.ReadTimeout != 10*time.Second ||
		cfg.MetricsAddr != "127.0.0.1:8187" || cfg.PostgresDSN != "postgres://postgres@localhost:5432/postgres" {
		t.Fatalf("defaults = %+v", cfg)
	}
}

func TestFlagsWinOverEnvironment(t *testing.T) {
	cfg, err := load(t, map[string]string{"EVENT_BATCH_SIZE": "50", "CLICKHOUSE_CONNECT_TIMEOUT": "5"}, "--batch-size", "70")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.BatchSize != 70 || cfg.ClickHouse.DialTimeout != 5*time.Second {
		t.Fatalf("batch size %d, connect timeout %s", cfg.BatchSize, cfg.ClickHouse.DialTimeout)
	}
}

func TestBadValuesNameTheSetting(t *testing.T) {
	cases := []struct {
		env  map[string]string
		want string
	}{
		{map[string]string{"EVENT_BATCH_SIZE": "0"}, "invalid EVENT_BATCH_SIZE (--batch-size)"},
		{map[string]string{"EVENT_BATCH_TIMEOUT": "soon"}, "invalid EVENT_BATCH_TIMEOUT (--batch-timeout)"},
		{map[string]string{"DEBUG": "maybe"}, "invalid DEBUG (--debug)"},
		{map[string]string{"CLICKHOUSE_PORT": "ninety"}, "invalid CLICKHOUSE_PORT (--clickhouse-port)"},
		{map[string]string{"CLICKHOUSE_PROTOCOL": "grpc"}, "invalid CLICKHOUSE_PROTOCOL"},
		{map[string]string{"EVENT_TIME_ZONE": "Mars/Olympus"}, "invalid EVENT_TIME_ZONE"},
		{map[string]string{"CLICKHOUSE_URI": "::nonsense"}, "invalid CLICKHOUSE_URI"},
	}
	for _, c := range cases {
		_, err := load(t, c.env)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%v: error %v, want it to contain %q", c.env, err, c.want)
		}
	}
}

func TestSecretsAreNotEchoed(t *testing.T) {
	_, err := load(t, map[string]string{"CLICKHOUSE_URI": "http://u:hunter2@[bad"})
	if err == nil || strings.Contains(err.Error(), "hunter2") {
		t.Fatalf("error %v echoes the secret", err)
	}
}

func TestClickHouseURIAndOverrides(t *testing.T) {
	cfg, err := load(t, map[string]string{
		"CLICKHOUSE_URI":  "http://alice:pw@ch.example:8123/analytics",
		"CLICKHOUSE_USER": "bob",
	})
	if err != nil {
		t.Fatal(err)
	}
	c := cfg.ClickHouse
	if c.Addr != "ch.example:8123" || c.Protocol != "http" || c.Database != "analytics" || c.User != "bob" || c.Password != "pw" {
		t.Fatalf("clickhouse config = %+v", c)
	}
}

func TestPostgresPartsAndRedaction(t *testing.T) {
	cfg, err := load(t, map[string]string{"POSTGRES_HOST": "db", "POSTGRES_USER": "app", "POSTGRES_PASSWORD": "p@ss word", "POSTGRES_DB": "shop"})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(cfg.PostgresDSN, "postgres://app:") || !strings.HasSuffix(cfg.PostgresDSN, "@db:5432/shop") {
		t.Fatalf("DSN = %q", cfg.PostgresDSN)
	}
	if got := RedactDSN(cfg.PostgresDSN); got != "postgres://app@db:5432/shop" {
		t.Fatalf("RedactDSN = %q", got)
	}
	// The keyword form keeps host, port, user and database (it used to show
	// the host alone) and never the password, quoted or not.
	for dsn, want := range map[string]string{
		"host=127.0.0.1 port=5433 user=u dbname=d password=secret":                   "postgres://u@127.0.0.1:5433/d",
		"password='se cret\\' x' host=db  user = app dbname='my db' sslmode=require": "postgres://app@db/my%20db",
		"host=db user=app password=secret":                                           "postgres://app@db",
		"dbname=d password=secret":                                                   "postgres://(unparsed)",
		"password='unterminated host=db":                                             "postgres://(unparsed)",
	} {
		got := RedactDSN(dsn)
		if strings.Contains(got, "secret") || strings.Contains(got, "cret") {
			t.Errorf("RedactDSN(%q) = %q: the password shows", dsn, got)
		}
		if got != want && !(strings.Contains(want, "%20") && got == "postgres://app@db/my db") {
			t.Errorf("RedactDSN(%q) = %q, want %q", dsn, got, want)
		}
	}
}

func TestParseDurationDays(t *testing.T) {
	for in, want := range map[string]time.Duration{
		"7d": 7 * 24 * time.Hour, "1d12h": 36 * time.Hour, "0.5d": 12 * time.Hour, "90": 90 * time.Second, "0": 0, "250ms": 250 * time.Millisecond,
	} {
		got, err := ParseDuration(in)
		if err != nil || got != want {
			t.Errorf("ParseDuration(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, bad := range []string{"d", "7x", "1d2", "seven days"} {
		if _, err := ParseDuration(bad); err == nil {
			t.Errorf("ParseDuration(%q) accepted", bad)
		}
	}
}

func TestRetentionSetting(t *testing.T) {
	for env, want := range map[string]time.Duration{"": 7 * 24 * time.Hour, "0": 0, "10s": 10 * time.Second, "30d": 30 * 24 * time.Hour} {
		cfg, _, err := Load(flag.NewFlagSet("t", flag.ContinueOnError), nil, mapEnv(map[string]string{"OUTBOX_RETENTION": env}))
		if err != nil {
			t.Fatalf("OUTBOX_RETENTION=%q: %v", env, err)
		}
		if cfg.Retention != want {
			t.Errorf("OUTBOX_RETENTION=%q: %v, want %v", env, cfg.Retention, want)
		}
	}
	if _, _, err := Load(flag.NewFlagSet("t", flag.ContinueOnError), nil, mapEnv(map[string]string{"OUTBOX_RETENTION": "-1h"})); err == nil || !strings.Contains(err.Error(), "OUTBOX_RETENTION") {
		t.Errorf("a negative retention gave %v, want an error naming OUTBOX_RETENTION", err)
	}
}

func TestBatchByteBounds(t *testing.T) {
	cases := []struct {
		name                string
		env                 map[string]string
		args                []string
		wantBatch, wantInto int
	}{
		{"defaults", nil, nil, 8 << 20, 64 << 20},
		{"flags", nil, []string{"--batch-max-bytes", "1000", "--clickhouse-batch-max-bytes", "5000"}, 1000, 5000},
		{"a merged insert holds at least one batch", map[string]string{"EVENT_BATCH_MAX_BYTES": "100000000", "CLICKHOUSE_BATCH_MAX_BYTES": "1000"}, nil, 100000000, 100000000},
		{"0 turns the batch byte bound off", map[string]string{"EVENT_BATCH_MAX_BYTES": "0"}, nil, 0, 64 << 20},
		{"0 turns the insert byte bound off", map[string]string{"CLICKHOUSE_BATCH_MAX_BYTES": "0"}, nil, 8 << 20, 0},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			cfg, err := load(t, c.env, c.args...)
			if err != nil {
				t.Fatal(err)
			}
			if cfg.BatchMaxBytes != c.wantBatch || cfg.ClickHouseBatchMaxBytes != c.wantInto {
				t.Fatalf("batch max bytes %d, clickhouse batch max bytes %d; want %d, %d",
					cfg.BatchMaxBytes, cfg.ClickHouseBatchMaxBytes, c.wantBatch, c.wantInto)
			}
		})
	}
	for env, want := range map[string]string{
		"EVENT_BATCH_MAX_BYTES":      "invalid EVENT_BATCH_MAX_BYTES (--batch-max-bytes)",
		"CLICKHOUSE_BATCH_MAX_BYTES": "invalid CLICKHOUSE_BATCH_MAX_BYTES (--clickhouse-batch-max-bytes)",
	} {
		for _, bad := range []string{"-1", "8MiB"} {
			if _, err := load(t, map[string]string{env: bad}); err == nil || !strings.Contains(err.Error(), want) {
				t.Errorf("%s=%s: error %v, want it to contain %q", env, bad, err, want)
			}
		}
	}
}

// TestBareBooleanFlags: `run --debug` works like `--debug=true` (it used to
// fail with "flag needs an argument"), `--debug=false` still turns it off,
// and a bare boolean does not swallow the next argument.
func TestBareBooleanFlags(t *testing.T) {
	cfg, err := load(t, nil, "--debug", "--clickhouse-secure", "--batch-size", "70")
	if err != nil {
		t.Fatal(err)
	}
	if !cfg.Debug || cfg.ClickHouse.TLS == nil || cfg.BatchSize != 70 {
		t.Fatalf("debug %v, TLS %v, batch size %d", cfg.Debug, cfg.ClickHouse.TLS != nil, cfg.BatchSize)
	}
	cfg, err = load(t, map[string]string{"DEBUG": "true"}, "--debug=false")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Debug {
		t.Fatal("--debug=false did not win over DEBUG=true")
	}
}

// TestAliasesAndSecretFiles: the names people already use work too
// (SENTRY_DSN, SENTRY_ENVIRONMENT, CLICKHOUSE_DATABASE), the seed's names win
// when both are set, and every secret can come from a file (NAME_FILE, as
// Docker and Kubernetes secrets are mounted; one trailing newline is dropped).
func TestAliasesAndSecretFiles(t *testing.T) {
	dir := t.TempDir()
	pw := dir + "/ch-password"
	if err := os.WriteFile(pw, []byte("s3cret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := load(t, map[string]string{"SENTRY_DSN": "https://k@sentry.example/1", "SENTRY_ENVIRONMENT": "staging",
		"CLICKHOUSE_DATABASE": "events", "CLICKHOUSE_PASSWORD_FILE": pw})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.SentryDSN != "https://k@sentry.example/1" || cfg.SentryEnv != "staging" || cfg.ClickHouse.Database != "events" || cfg.ClickHouse.Password != "s3cret" {
		t.Fatalf("dsn %q, env %q, database %q, password %q", cfg.SentryDSN, cfg.SentryEnv, cfg.ClickHouse.Database, cfg.ClickHouse.Password)
	}
	cfg, err = load(t, map[string]string{"CLICKHOUSE_SCHEMA": "seed", "CLICKHOUSE_DATABASE": "alias"})
	if err != nil || cfg.ClickHouse.Database != "seed" {
		t.Fatalf("database %q (%v), want the seed's CLICKHOUSE_SCHEMA to win", cfg.ClickHouse.Database, err)
	}
	_, err = load(t, map[string]string{"CLICKHOUSE_PASSWORD_FILE": dir + "/missing"})
	if err == nil || !strings.Contains(err.Error(), "CLICKHOUSE_PASSWORD_FILE") || strings.Contains(err.Error(), "s3cret") {
		t.Fatalf("a missing secret file: %v", err)
	}
}

// mapEnv is an environment of exactly these variables.
func mapEnv(env map[string]string) func(string) (string, bool) {
	return func(k string) (string, bool) { v, ok := env[k]; return v, ok }
}

func TestEmptyMetricsAddrDisables(t *testing.T) {
	for _, tc := range []struct {
		env  map[string]string
		args []string
		want string
	}{
		{nil, nil, "127.0.0.1:8187"},
		{map[string]string{"METRICS_ADDR": ""}, nil, ""},
		{nil, []string{"--metrics-addr="}, ""},
		{map[string]string{"METRICS_ADDR": "0.0.0.0:8187"}, nil, "0.0.0.0:8187"},
		// Other settings keep "set but empty means unset", for compose's ${X:-}.
		{map[string]string{"METRICS_ADDR": "", "EVENT_BATCH_SIZE": ""}, nil, ""},
	} {
		cfg, err := load(t, tc.env, tc.args...)
		if err != nil {
			t.Fatalf("env %v args %v: %v", tc.env, tc.args, err)
		}
		if cfg.MetricsAddr != tc.want {
			t.Errorf("env %v args %v: METRICS_ADDR %q, want %q", tc.env, tc.args, cfg.MetricsAddr, tc.want)
		}
	}
}

func TestFormatDuration(t *testing.T) {
	for d, want := range map[time.Duration]string{0: "0", time.Minute: "1m", time.Hour: "1h", 90 * time.Minute: "1h30m",
		30 * time.Second: "30s", 100 * time.Millisecond: "100ms", 7 * 24 * time.Hour: "7d", 61 * time.Second: "1m1s"} {
		if got := FormatDuration(d); got != want {
			t.Errorf("FormatDuration(%v) = %q, want %q", d, got, want)
		}
		if back, err := ParseDuration(want); err != nil || back != d {
			t.Errorf("ParseDuration(%q) = %v, %v; want %v", want, back, err, d)
		}
	}
}

func TestOutboxTable(t *testing.T) {
	cfg, err := load(t, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !cfg.Outbox.IsDefault() || cfg.Outbox.Ident() != `"event_outbox"` {
		t.Fatalf("default outbox = %+v (%s)", cfg.Outbox, cfg.Outbox.Ident())
	}
	for _, c := range []struct {
		env, flag            string
		schema, table, ident string
	}{
		{env: "orders_outbox", table: "orders_outbox", ident: `"orders_outbox"`},
		{env: "billing.event_outbox", schema: "billing", table: "event_outbox", ident: `"billing"."event_outbox"`},
		{env: " public.event_outbox ", schema: "public", table: "event_outbox", ident: `"public"."event_outbox"`},
		{env: "a.b", flag: "_x.t1", schema: "_x", table: "t1", ident: `"_x"."t1"`},
	} {
		var args []string
		if c.flag != "" {
			args = []string{"--outbox-table", c.flag}
		}
		cfg, err := load(t, map[string]string{"OUTBOX_TABLE": c.env}, args...)
		if err != nil {
			t.Fatalf("OUTBOX_TABLE=%q %v: %v", c.env, args, err)
		}
		if cfg.Outbox.Schema != c.schema || cfg.Outbox.Table != c.table || cfg.Outbox.Ident() != c.ident {
			t.Errorf("OUTBOX_TABLE=%q %v: %+v %s, want %s.%s %s", c.env, args, cfg.Outbox, cfg.Outbox.Ident(), c.schema, c.table, c.ident)
		}
	}
	for _, bad := range []string{
		"a.b.c", ".event_outbox", "billing.", "Orders", `"event_outbox"`, "1outbox", "event-outbox",
		"event outbox", "x;drop table y", "billing.Event_Outbox",
		strings.Repeat("t", 37), // the derived names would pass 63 bytes
	} {
		_, err := load(t, map[string]string{"OUTBOX_TABLE": bad})
		if err == nil || !strings.HasPrefix(err.Error(), "invalid OUTBOX_TABLE (--outbox-table)") {
			t.Errorf("OUTBOX_TABLE=%q: err = %v, want one naming the setting", bad, err)
		}
	}
	if _, err := load(t, map[string]string{"OUTBOX_TABLE": strings.Repeat("t", 36)}); err != nil {
		t.Errorf("a 36-byte table name: %v", err)
	}
}

func TestClickHouseCluster(t *testing.T) {
	cfg, err := load(t, nil)
	if err != nil || cfg.ClickHouse.Cluster != "" {
		t.Fatalf("default cluster = %q, %v; want empty (one server)", cfg.ClickHouse.Cluster, err)
	}
	cfg, err = load(t, map[string]string{"CLICKHOUSE_CLUSTER": "from_env"})
	if err != nil || cfg.ClickHouse.Cluster != "from_env" {
		t.Fatalf("CLICKHOUSE_CLUSTER: cluster = %q, %v", cfg.ClickHouse.Cluster, err)
	}
	cfg, err = load(t, map[string]string{"CLICKHOUSE_CLUSTER": "from_env"}, "--clickhouse-cluster", "from flag")
	if err != nil || cfg.ClickHouse.Cluster != "from flag" {
		t.Fatalf("--clickhouse-cluster: cluster = %q, %v", cfg.ClickHouse.Cluster, err)
	}
}
