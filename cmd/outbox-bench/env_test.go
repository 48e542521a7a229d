package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"syscall"
	"testing"
	"time"
)

func TestPollAsksAgainAfterAReset(t *testing.T) {
	reset := fmt.Errorf("handshake: failed to read packet from 127.0.0.1:1: %w",
		fmt.Errorf("read: %w", &net.OpError{Op: "read", Net: "tcp", Err: os.NewSyscallError("read", syscall.ECONNRESET)}))
	refused := errors.New("code: 60, message: Unknown table")
	calls := 0
	err := poll(context.Background(), time.Minute, time.Millisecond, "rows", func() (bool, error) {
		calls++
		if calls <= 3 {
			return false, reset
		}
		return true, nil
	})
	if err != nil || calls != 4 {
		t.Fatalf("poll = %v after %d calls; want nil after 4", err, calls)
	}

	calls = 0
	err = poll(context.Background(), time.Minute, time.Millisecond, "rows", func() (bool, error) {
		calls++
		return false, reset
	})
	if !errors.Is(err, syscall.ECONNRESET) || calls != 4 {
		t.Fatalf("poll = %v after %d calls; want the reset after 4 (3 asked again)", err, calls)
	}

	calls = 0
	err = poll(context.Background(), time.Minute, time.Millisecond, "rows", func() (bool, error) {
		calls++
		return false, refused
	})
	if !errors.Is(err, refused) || calls != 1 {
		t.Fatalf("poll = %v after %d calls; want the server's error at once", err, calls)
	}
}
