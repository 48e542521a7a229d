package main

import (
	"encoding/json"
	"io"
	"net"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/fixture"
	"github.com/outbox-streamer/outbox-streamer/internal/harness/testenv"
)

// gate forwards TCP connections to upstream while open and closes them at
// once while shut: a ClickHouse that is unreachable, then back, without
// touching the server (which must not see a reset: ENVIRONMENT.md).
type gate struct {
	ln       net.Listener
	upstream string
	open     atomic.Bool
	wg       sync.WaitGroup
}

func newGate(t *testing.T, upstream string) *gate {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := &gate{ln: ln, upstream: upstream}
	go g.accept()
	t.Cleanup(func() { ln.Close(); g.wg.Wait() })
	return g
}

func (g *gate) accept() {
	for {
		c, err := g.ln.Accept()
		if err != nil {
			return
		}
		if !g.open.Load() {
			c.Close()
			continue
		}
		up, err := net.Dial("tcp", g.upstream)
		if err != nil {
			c.Close()
			continue
		}
		g.wg.Add(2)
		pipe := func(dst, src net.Conn) {
			defer g.wg.Done()
			_, _ = io.Copy(dst, src)
			_ = dst.(*net.TCPConn).CloseWrite()
		}
		go pipe(up, c)
		go pipe(c, up)
	}
}

// TestRunLogsProgress (issue 27): the leader logs "catching up: N left, ETA"
// while rows wait for an unreachable ClickHouse, one "caught up" when they
// are delivered, then periodic progress lines; every line is JSON when
// stderr is not a terminal, with each key once, and /metrics' address is
// logged once.
func TestRunLogsProgress(t *testing.T) {
	srv := testenv.ModernClickHouse(t)
	e := fixture.New(t, srv)
	g := newGate(t, srv.Addr)
	host, port, _ := strings.Cut(g.ln.Addr().String(), ":")
	cmd, out := startStreamer(t, envFor(e, "CLICKHOUSE_HOST="+host, "CLICKHOUSE_PORT="+port, "CLICKHOUSE_CONNECT_TIMEOUT=1",
		"PROGRESS_INTERVAL=0.2", "EVENT_BATCH_SIZE=100", "CLICKHOUSE_BATCH_SIZE=100", "RETRY_MAX_WAIT=0.2"))
	e.WaitStreaming(t)
	e.Insert(t, 500, false)
	fixture.WaitFor(t, time.Minute, "a catching-up line", func() bool { return strings.Contains(out.String(), `"catching up: 500 left, ETA unknown"`) })
	// status shows the leader's own view: catching up, 500 pending.
	env := envFor(e, "CLICKHOUSE_HOST="+host, "CLICKHOUSE_PORT="+port)
	fixture.WaitFor(t, time.Minute, "the leader's view in status", func() bool {
		_, o := runCmd(t, env, "status", "--json")
		var st struct {
			LeaderView *struct {
				State   string  `json:"state"`
				Pending float64 `json:"pending"`
			} `json:"leader_view"`
		}
		return json.Unmarshal([]byte(o), &st) == nil && st.LeaderView != nil && st.LeaderView.State == "catching up" && st.LeaderView.Pending == 500
	})
	g.open.Store(true)
	fixture.WaitFor(t, time.Minute, "delivered", func() bool { _, p := e.Committed(t); return p == 500 })
	fixture.WaitFor(t, time.Minute, "progress after caught up", func() bool {
		s := out.String()
		i := strings.Index(s, `"caught up: `)
		return i >= 0 && strings.Contains(s[i:], `"msg":"progress: `)
	})
	fixture.WaitFor(t, time.Minute, "status showing the view after the catch-up", func() bool {
		_, o := runCmd(t, env, "status")
		return regexp.MustCompile(`its view \d+s ago: (caught up|streaming), [\d.]+ rows/s, confirmed [0-9A-F]+/[0-9A-F]+, 500 delivered by this process, last batch \d+s ago, \d+ errors`).MatchString(o)
	})
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	_ = cmd.Wait()
	log := out.String()
	if n := strings.Count(log, `"caught up: `); n != 1 {
		t.Errorf("%d caught-up lines, want 1", n)
	}
	if n := strings.Count(log, "serving /metrics"); n != 1 {
		t.Errorf("serving /metrics logged %d times, want 1", n)
	}
	line := regexp.MustCompile(`(?m)^.*"msg":"progress: .*$`).FindString(log)
	for _, key := range []string{`"rows_per_second":`, `"confirmed_lsn":"`, `"lag_bytes":`, `"pending":`, `"failed":0`, `"oldest_undelivered":`, `"slot":"` + e.Slot + `"`} {
		if !strings.Contains(line, key) {
			t.Errorf("progress line lacks %s: %s", key, line)
		}
	}
	for _, l := range strings.Split(strings.TrimSpace(log), "\n") {
		if !json.Valid([]byte(l)) {
			t.Errorf("not a JSON line: %s", l)
			continue
		}
		if dup := duplicateKeys(t, l); len(dup) > 0 {
			t.Errorf("keys %v twice: %s", dup, l)
		}
	}
	if t.Failed() {
		t.Logf("log:\n%s", log)
	}
}
