package localsvc

import (
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"sync"
	"time"
)

// resetShield is a TCP forwarder in front of the modern ClickHouse's native
// port. It exists because of a bug in ClickHouse 26.7 as built into chDB:
// when a client's connection is reset (RST) in the middle of a query, the
// server's TCP handler lets the NETWORK_ERROR escape, std::terminate runs and
// the whole server aborts (signal 6) — or hangs after its fatal-error
// handler with its listeners gone. A process killed with SIGKILL while data
// sits unread in its socket makes the kernel send exactly such a reset, and
// that is what chaos tests do to the streamer. Real ClickHouse servers end
// the one session and go on.
//
// The shield turns a client's reset into an orderly end of stream towards
// the server: it half-closes the server side (FIN) and keeps reading what the
// server still sends until the server closes, so the server sees "end of
// stream mid-query" (ATTEMPT_TO_READ_AFTER_EOF, handled: the session ends)
// and never a reset. Everything else passes through unchanged: bytes both
// ways, half-closes, timeouts, a frozen server. While the server is down the
// shield does not listen, so clients see "connection refused" as they would
// without it.
type resetShield struct {
	upstream string // the server's own native address

	mu   sync.Mutex
	port int          // fixed after the first listen, so clients keep their address
	ln   net.Listener // nil while paused
	wg   sync.WaitGroup
}

// shieldDialTimeout bounds connecting to the server for one client.
const shieldDialTimeout = 5 * time.Second

// listen opens the shield's listener (on a free port the first time, on the
// same port afterwards) and starts accepting.
func (s *resetShield) listen() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ln != nil {
		return nil
	}
	ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(s.port)))
	if err != nil {
		return fmt.Errorf("reset shield: listen: %w", err)
	}
	s.ln = ln
	s.port = ln.Addr().(*net.TCPAddr).Port
	s.wg.Add(1)
	go s.accept(ln)
	return nil
}

// pause stops accepting new connections. Connections already open keep
// going until the server or the client ends them: closing them here could
// reset the server's side, the very thing the shield prevents.
func (s *resetShield) pause() {
	s.mu.Lock()
	ln := s.ln
	s.ln = nil
	s.mu.Unlock()
	if ln != nil {
		_ = ln.Close()
	}
}

func (s *resetShield) accept(ln net.Listener) {
	defer s.wg.Done()
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			time.Sleep(10 * time.Millisecond) // e.g. EMFILE: do not spin
			continue
		}
		go s.forward(c.(*net.TCPConn))
	}
}

// forward relays one client connection to the server.
func (s *resetShield) forward(client *net.TCPConn) {
	d := net.Dialer{Timeout: shieldDialTimeout}
	c, err := d.Dial("tcp", s.upstream)
	if err != nil {
		// The server went away without the harness knowing (a crash the
		// harness reports on its own). Tell the client as a reset would.
		_ = client.SetLinger(0)
		_ = client.Close()
		return
	}
	server := c.(*net.TCPConn)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		// Client to server. However the client's stream ends — EOF, reset,
		// an error — the server gets an orderly FIN.
		_, _ = io.Copy(server, client)
		_ = server.CloseWrite()
	}()
	// Server to client. When the client is gone, keep draining the server
	// until it closes, so that its socket is never closed by us with data
	// unread (which the kernel would turn into a reset).
	if _, err := io.Copy(client, server); err != nil {
		_, _ = io.Copy(io.Discard, server)
	}
	// The server has closed its side: end the client's (it may still be
	// writing; that fails on its side, as it would against the server).
	_ = client.Close()
	wg.Wait()
	_ = server.Close()
}
