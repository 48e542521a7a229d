package producertest

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// consumerGo is the go directive of the consumer module below: the outbox
// module's own, which it must be able to keep.
const consumerGo = "1.23.0"

// streamerOnly are module paths of the streamer's dependencies that a producer
// must not inherit.
var streamerOnly = []string{
	"github.com/ClickHouse/clickhouse-go",
	"go.opentelemetry.io",
	"google.golang.org/grpc",
	"go.uber.org/zap",
	"github.com/outbox-streamer/outbox-streamer ", // the streamer's module itself
}

// TestConsumerModule is issue 15: a service module declaring an older go
// version that imports package outbox keeps its go directive through go mod
// tidy and gets pgx, not the streamer's dependencies.
func TestConsumerModule(t *testing.T) {
	if testing.Short() {
		t.Skip("runs go mod tidy (needs the module cache or the module proxy)")
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("go not found in PATH (go test puts GOROOT/bin there): %v", err)
	}
	outboxDir, err := filepath.Abs(filepath.Join("..", "..", "..", "outbox"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(outboxDir, "go.mod")); err != nil {
		t.Fatalf("the outbox module: %v", err)
	}

	dir := t.TempDir()
	write := func(name, content string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("go.mod", `module example.com/consumer

go `+consumerGo+`

require github.com/outbox-streamer/outbox-streamer/outbox v0.0.0

replace github.com/outbox-streamer/outbox-streamer/outbox => `+outboxDir+`
`)
	write("main.go", `package main

import (
	"context"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-streamer/outbox-streamer/outbox"
)

func main() {
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, "")
	if err != nil {
		panic(err)
	}
	defer conn.Close(ctx)
	w := outbox.New(outbox.Options{Table: "app.event_outbox"})
	err = pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		if _, err := w.Append(ctx, tx, outbox.Event{Type: "x", Time: time.Now()}); err != nil {
			return err
		}
		_, err := w.AppendBatch(ctx, tx, []outbox.Event{{Type: "y", Time: time.Now()}})
		return err
	})
	if err != nil {
		panic(err)
	}
}
`)

	// The module cache and proxy of this environment (inherited), a go
	// command that may not switch toolchains (which would hide a raised
	// directive), and no workspace.
	cmd := exec.Command(goBin, "mod", "tidy")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "GOFLAGS=-mod=mod", "GOTOOLCHAIN=local", "GOWORK=off")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("go mod tidy in the consumer module: %v\n%s", err, out)
	}

	gomod, err := os.ReadFile(filepath.Join(dir, "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	gosum, err := os.ReadFile(filepath.Join(dir, "go.sum"))
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("consumer go.mod after go mod tidy:\n%s", gomod)
	if v := goDirective(gomod); v != consumerGo {
		t.Errorf("go mod tidy changed the consumer's go directive to %q, want %s", v, consumerGo)
	}
	if regexp.MustCompile(`(?m)^toolchain `).Match(gomod) {
		t.Errorf("go mod tidy added a toolchain line")
	}
	if !strings.Contains(string(gomod), "github.com/jackc/pgx/v5 ") {
		t.Errorf("the consumer's go.mod does not list pgx")
	}
	for _, file := range []struct {
		name    string
		content string
	}{{"go.mod", string(gomod)}, {"go.sum", string(gosum)}} {
		for _, mod := range streamerOnly {
			if strings.Contains(file.content, mod) {
				t.Errorf("the consumer's %s mentions %s", file.name, strings.TrimSpace(mod))
			}
		}
	}

	// Keep this test in step with the module: a lowered directive in
	// outbox/go.mod must lower consumerGo (and the docs) too.
	own, err := os.ReadFile(filepath.Join(outboxDir, "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	if v := goDirective(own); v != consumerGo {
		t.Errorf("outbox/go.mod declares go %q, want %s (change consumerGo and docs/producing-events.md with it)", v, consumerGo)
	}
}

// goDirective returns the version of a go.mod's go line, or "".
func goDirective(gomod []byte) string {
	m := regexp.MustCompile(`(?m)^go (\S+)\s*$`).FindSubmatch(gomod)
	if m == nil {
		return ""
	}
	return string(m[1])
}
