package localsvc

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
)

// StandbyOptions configures Postgres.StartStandby.
type StandbyOptions struct {
	// Slot is the physical replication slot on the primary that keeps the
	// WAL the standby still needs; created when missing. Default "standby".
	Slot string
	// Settings are extra server settings of the standby (-c name=value),
	// e.g. sync_replication_slots=on. primary_conninfo, primary_slot_name
	// and hot_standby_feedback=on are set already.
	Settings map[string]string
	// BaseDir and StartTimeout are as in PostgresOptions; the primary's are
	// used when empty. OnCrash is the standby's own.
	BaseDir      string
	StartTimeout time.Duration
	OnCrash      func(*Crash)
}

// StartStandby makes a physical standby of the running server p and starts
// it: an online base backup (pg_backup_start/pg_backup_stop over one
// session, pg_start_backup/pg_stop_backup before 15) around a copy of the
// data directory, since the packaged binaries have no pg_basebackup; then
// standby.signal and streaming replication from p through a physical slot.
// It returns once the standby accepts (read-only) connections. The standby
// runs the primary's binaries; Promote turns it into a primary.
func (p *Postgres) StartStandby(ctx context.Context, opts StandbyOptions) (*Postgres, error) {
	if opts.Slot == "" {
		opts.Slot = "standby"
	}
	po := p.opts
	po.BinDir, po.Dir, po.Port = p.BinDir, "", 0
	if opts.BaseDir != "" {
		po.BaseDir = opts.BaseDir
	}
	if opts.StartTimeout != 0 {
		po.StartTimeout = opts.StartTimeout
	}
	po.OnCrash = opts.OnCrash
	po.Settings = maps.Clone(p.opts.Settings)
	if po.Settings == nil {
		po.Settings = map[string]string{}
	}
	// dbname lets a 17+ standby synchronise logical failover slots.
	po.Settings["primary_conninfo"] = fmt.Sprintf("host=127.0.0.1 port=%d user=postgres dbname=postgres application_name=%s", p.Port, opts.Slot)
	po.Settings["primary_slot_name"] = opts.Slot
	po.Settings["hot_standby_feedback"] = "on"
	maps.Copy(po.Settings, opts.Settings)

	sb, err := newPostgres(ctx, po)
	if err != nil {
		return nil, err
	}
	if err := p.baseBackup(ctx, opts.Slot, sb); err != nil {
		sb.removeDir()
		return nil, err
	}
	if err := sb.startPickingPort(ctx); err != nil {
		sb.removeDir()
		return nil, fmt.Errorf("start standby of port %d: %w", p.Port, err)
	}
	return sb, nil
}

// baseBackup copies p's data directory into sb.DataDir between the start
// and the stop of a non-exclusive backup, writes the backup label, and marks
// the copy a standby. The slot is created first and reserves WAL at once, so
// the standby can stream everything since the backup's start.
func (p *Postgres) baseBackup(ctx context.Context, slot string, sb *Postgres) error {
	conn, err := pgx.Connect(ctx, p.DSN())
	if err != nil {
		return fmt.Errorf("base backup: connect to primary: %w", err)
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(ctx, `SELECT pg_create_physical_replication_slot($1, true)
		WHERE NOT EXISTS (SELECT FROM pg_replication_slots WHERE slot_name = $1)`, slot); err != nil {
		return fmt.Errorf("base backup: create physical slot %q: %w", slot, err)
	}
	start, stop := "SELECT pg_backup_start('localsvc standby', true)", "SELECT labelfile FROM pg_backup_stop(false)"
	if p.Major < 15 {
		start, stop = "SELECT pg_start_backup('localsvc standby', true, false)", "SELECT labelfile FROM pg_stop_backup(false, false)"
	}
	if _, err := conn.Exec(ctx, start); err != nil {
		return fmt.Errorf("base backup: start: %w", err)
	}
	copyErr := copyDataDir(p.DataDir, sb.DataDir, sb.cred)
	var label string
	if err := conn.QueryRow(ctx, stop).Scan(&label); err != nil {
		return errors.Join(copyErr, fmt.Errorf("base backup: stop: %w", err))
	}
	if copyErr != nil {
		return fmt.Errorf("base backup: copy %s: %w", p.DataDir, copyErr)
	}
	if err := sb.writeOwned(filepath.Join(sb.DataDir, "backup_label"), label); err != nil {
		return err
	}
	return sb.writeOwned(filepath.Join(sb.DataDir, "standby.signal"), "")
}

// writeOwned writes a file of the server's data directory, owned by its OS
// user.
func (p *Postgres) writeOwned(path, content string) error {
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if p.cred != nil {
		if err := os.Chown(path, int(p.cred.Uid), int(p.cred.Gid)); err != nil {
			return fmt.Errorf("chown %s: %w", path, err)
		}
	}
	return nil
}

// pgCopySkipContents are the data directory's subdirectories whose contents
// a base backup leaves out (as pg_basebackup does): WAL comes by streaming,
// and the rest is runtime state. pg_replslot is among them, so the standby
// does not start with copies of the primary's slots.
var pgCopySkipContents = map[string]bool{
	"pg_wal": true, "pg_replslot": true, "pg_stat_tmp": true, "pg_dynshmem": true, "pg_notify": true,
	"pg_serial": true, "pg_snapshots": true, "pg_subtrans": true,
}

// pgCopySkipFiles are top-level files of a running server not to copy.
var pgCopySkipFiles = map[string]bool{"postmaster.pid": true, "postmaster.opts": true, "backup_label": true, "tablespace_map": true}

// copyDataDir copies a data directory, files owned by cred's user when set.
// Files the server removes during the copy are skipped: the backup's WAL
// replay recreates what it needs.
func copyDataDir(src, dst string, cred *syscall.Credential) error {
	chown := func(path string) error {
		if cred == nil {
			return nil
		}
		return os.Chown(path, int(cred.Uid), int(cred.Gid))
	}
	return filepath.WalkDir(src, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		rel, err := filepath.Rel(src, path)
		if err != nil {
			return err
		}
		target := filepath.Join(dst, rel)
		switch dir := filepath.Dir(rel); {
		case dir == "." && pgCopySkipFiles[rel]:
			return nil
		case pgCopySkipContents[dir]:
			return skipEntry(d)
		}
		if d.IsDir() {
			if err := os.MkdirAll(target, 0o700); err != nil {
				return err
			}
			// The server expects pg_wal/archive_status to exist.
			if rel == "pg_wal" {
				status := filepath.Join(target, "archive_status")
				if err := os.MkdirAll(status, 0o700); err != nil {
					return err
				}
				if err := chown(status); err != nil {
					return err
				}
			}
		} else if d.Type().IsRegular() {
			if err := copyFile(path, target); err != nil {
				if errors.Is(err, fs.ErrNotExist) {
					return nil
				}
				return err
			}
		} else {
			return nil
		}
		return chown(target)
	})
}

// skipEntry leaves out a directory entry (and a directory's subtree).
func skipEntry(d fs.DirEntry) error {
	if d.IsDir() {
		return fs.SkipDir
	}
	return nil
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// Promote ends recovery on a standby started by StartStandby (pg_promote)
// and returns once it accepts writes.
func (p *Postgres) Promote(ctx context.Context) error {
	conn, err := pgx.Connect(ctx, p.DSN())
	if err != nil {
		return fmt.Errorf("promote: connect to standby on port %d: %w", p.Port, err)
	}
	defer conn.Close(context.Background())
	var ok bool
	if err := conn.QueryRow(ctx, "SELECT pg_promote(true, $1)", int(p.opts.StartTimeout/time.Second)).Scan(&ok); err != nil {
		return fmt.Errorf("promote standby on port %d: %w", p.Port, err)
	}
	if !ok {
		return fmt.Errorf("promote standby on port %d: not promoted within %v", p.Port, p.opts.StartTimeout)
	}
	return nil
}

// PauseWALReceiver stops a standby's WAL receiver with SIGSTOP, once it
// streams: the standby stays up but receives and flushes nothing, as if
// the network to the primary were cut. The returned resume (SIGCONT) may be
// called more than once.
func (p *Postgres) PauseWALReceiver(ctx context.Context) (resume func(), err error) {
	var pid int
	for {
		pid, err = p.walReceiverPID(ctx)
		if err == nil {
			break
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("standby on port %d: no streaming WAL receiver: %w", p.Port, err)
		case <-time.After(50 * time.Millisecond):
		}
	}
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		return nil, fmt.Errorf("SIGSTOP the WAL receiver %d: %w", pid, err)
	}
	var once sync.Once
	return func() { once.Do(func() { _ = syscall.Kill(pid, syscall.SIGCONT) }) }, nil
}

func (p *Postgres) walReceiverPID(ctx context.Context) (int, error) {
	conn, err := pgx.Connect(ctx, p.DSN())
	if err != nil {
		return 0, err
	}
	defer conn.Close(context.Background())
	var pid int
	err = conn.QueryRow(ctx, "SELECT pid FROM pg_stat_wal_receiver WHERE status = 'streaming'").Scan(&pid)
	return pid, err
}
