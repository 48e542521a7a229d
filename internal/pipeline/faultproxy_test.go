package pipeline_test

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// answerDropper is a TCP forwarder in front of a ClickHouse native port that,
// while armed, lets an insert through whole and then drops the client's
// connection (a reset) instead of passing on the server's answer: ClickHouse
// has accepted the insert, the client cannot know. It recognises the answer
// to an insert as bytes the server sends after the client uploaded more than
// uploadBytes, when the client then stays quiet for answerQuiet (it waits for
// the answer); server bytes during the upload (progress) pass.
type answerDropper struct {
	ln       net.Listener
	upstream string
	armed    atomic.Int32 // answers still to drop
	dropped  atomic.Int32
	wg       sync.WaitGroup
}

const (
	uploadBytes = 4 << 10
	answerQuiet = 150 * time.Millisecond
)

func newAnswerDropper(t *testing.T, upstream string) *answerDropper {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	d := &answerDropper{ln: ln, upstream: upstream}
	d.wg.Add(1)
	go d.accept()
	t.Cleanup(func() { ln.Close(); d.wg.Wait() })
	return d
}

func (d *answerDropper) Addr() string { return d.ln.Addr().String() }

func (d *answerDropper) accept() {
	defer d.wg.Done()
	for {
		c, err := d.ln.Accept()
		if err != nil {
			return
		}
		go d.forward(c.(*net.TCPConn))
	}
}

func (d *answerDropper) forward(client *net.TCPConn) {
	s, err := net.Dial("tcp", d.upstream)
	if err != nil {
		client.Close()
		return
	}
	server := s.(*net.TCPConn)
	var uploaded atomic.Int64 // client bytes since the server's last answer
	var total atomic.Int64    // all client bytes
	go func() {
		buf := make([]byte, 32<<10)
		for {
			n, err := client.Read(buf)
			if n > 0 {
				uploaded.Add(int64(n))
				total.Add(int64(n))
				if _, werr := server.Write(buf[:n]); werr != nil {
					break
				}
			}
			if err != nil {
				break
			}
		}
		_ = server.CloseWrite()
	}()
	buf := make([]byte, 32<<10)
	for {
		n, err := server.Read(buf)
		if n > 0 {
			switch {
			case d.armed.Load() > 0 && uploaded.Load() > uploadBytes:
				mark := total.Load()
				time.Sleep(answerQuiet)
				if total.Load() != mark {
					break // progress during the upload: keep counting
				}
				if d.armed.Add(-1) >= 0 {
					// The insert is in and the client waits for its
					// answer: it is not delivered.
					d.dropped.Add(1)
					_ = client.SetLinger(0)
					_ = client.Close()
					_, _ = io.Copy(io.Discard, server)
					_ = server.Close()
					return
				}
				uploaded.Store(0)
			default:
				uploaded.Store(0) // the answer to something small
			}
			if _, werr := client.Write(buf[:n]); werr != nil {
				_, _ = io.Copy(io.Discard, server)
				break
			}
		}
		if err != nil {
			if !errors.Is(err, io.EOF) {
				_ = client.SetLinger(0)
			}
			break
		}
	}
	_ = client.Close()
	_ = server.Close()
}
