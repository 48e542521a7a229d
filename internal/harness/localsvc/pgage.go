package localsvc

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"

	"github.com/jackc/pgx/v5"
)

// EnvPGXIDEpoch and EnvPGNextXID make the servers the harness starts look
// like an old production database: a transaction-ID epoch of 1 or more
// (every database that has used more than 2^32 xids, kept by pg_upgrade),
// and the 32-bit xid counter close to its wraparound. See
// PostgresOptions.XIDEpoch and NextXID.
const (
	EnvPGXIDEpoch = "OUTBOX_PG_XID_EPOCH"
	EnvPGNextXID  = "OUTBOX_PG_NEXT_XID"
)

// AgeFromEnv fills XIDEpoch and NextXID from the environment where they are
// unset.
func (o *PostgresOptions) AgeFromEnv() error {
	for _, v := range []struct {
		env string
		dst *uint32
	}{{EnvPGXIDEpoch, &o.XIDEpoch}, {EnvPGNextXID, &o.NextXID}} {
		s := os.Getenv(v.env)
		if s == "" || *v.dst != 0 {
			continue
		}
		n, err := strconv.ParseUint(s, 0, 32)
		if err != nil {
			return fmt.Errorf("%s=%q: want an unsigned 32-bit number: %w", v.env, s, err)
		}
		*v.dst = uint32(n)
	}
	return nil
}

// aged reports whether the options ask for an old cluster.
func (o PostgresOptions) aged() bool { return o.XIDEpoch != 0 || o.NextXID != 0 }

// xidsPerClogSegment is how many transactions one pg_xact file covers
// (32 pages of 8 kB, 2 bits each).
const xidsPerClogSegment = 32 * 8192 * 4

// ageCluster turns the freshly initialised, running cluster into an old one
// with pg_resetwal, the way PostgreSQL's own wraparound tests do.
//
// The counter cannot jump far in one go: rows whose xids lie more than 2^31
// behind it would then be "in the future" and vanish, and the server stops
// accepting commands when the oldest unfrozen xid is about that far behind.
// So it moves in hops of at most 2^30 and freezes every database after each.
func (p *Postgres) ageCluster(ctx context.Context) error {
	if !p.opts.aged() {
		return nil
	}
	resetwal, err := p.findResetWAL()
	if err != nil {
		return err
	}
	next := p.opts.NextXID
	if next != 0 && next < 3 {
		next = 3 // 0-2 are reserved xids
	}
	for hop := uint64(xidHop); uint64(next) > hop; hop += xidHop {
		if err := p.resetXIDs(ctx, resetwal, "", uint32(hop)); err != nil {
			return err
		}
		if err := p.freezeAll(ctx); err != nil {
			return err
		}
	}
	return p.resetXIDs(ctx, resetwal, strconv.FormatUint(uint64(p.opts.XIDEpoch), 10), next)
}

// xidHop is the longest jump of the xid counter ageCluster makes at once.
const xidHop = 1 << 30

// resetXIDs stops the server cleanly, runs pg_resetwal with the epoch (if
// not empty) and next xid (if not zero), creates the commit-log segment the
// new xid needs, and starts the server again.
func (p *Postgres) resetXIDs(ctx context.Context, resetwal, epoch string, next uint32) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.haltLocked(); err != nil {
		return err
	}
	args := []string{"-D", p.DataDir}
	if epoch != "" {
		args = append(args, "-e", epoch)
	}
	if next != 0 {
		args = append(args, "-x", strconv.FormatUint(uint64(next), 10))
	}
	cmd := exec.CommandContext(ctx, resetwal, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: p.cred, Pdeathsig: syscall.SIGKILL}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := StartChild(cmd); err != nil {
		return fmt.Errorf("postgres: pg_resetwal: %w", err)
	}
	if err := cmd.Wait(); err != nil {
		return fmt.Errorf("postgres: pg_resetwal %v: %w\n%s", args, err, out.String())
	}
	if next != 0 {
		if err := p.clogSegment(next); err != nil {
			return err
		}
	}
	return p.startLocked(ctx)
}

// clogSegment creates the zeroed pg_xact file that holds xid's status:
// pg_resetwal moves the counter but leaves the commit log as it was.
func (p *Postgres) clogSegment(xid uint32) error {
	path := filepath.Join(p.DataDir, "pg_xact", fmt.Sprintf("%04X", xid/xidsPerClogSegment))
	if _, err := os.Stat(path); err == nil {
		return nil
	}
	if err := os.WriteFile(path, make([]byte, xidsPerClogSegment/4), 0o600); err != nil {
		return fmt.Errorf("postgres: create commit-log segment: %w", err)
	}
	if p.cred != nil {
		if err := os.Chown(path, int(p.cred.Uid), int(p.cred.Gid)); err != nil {
			return fmt.Errorf("chown %s: %w", path, err)
		}
	}
	return nil
}

// freezeAll runs VACUUM FREEZE in every database, template0 included.
func (p *Postgres) freezeAll(ctx context.Context) error {
	conn, err := pgx.Connect(ctx, p.DSN())
	if err != nil {
		return fmt.Errorf("postgres: freeze: %w", err)
	}
	defer conn.Close(context.Background())
	rows, err := conn.Query(ctx, "SELECT datname FROM pg_database ORDER BY datname")
	if err != nil {
		return fmt.Errorf("postgres: list databases: %w", err)
	}
	dbs, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return fmt.Errorf("postgres: list databases: %w", err)
	}
	if _, err := conn.Exec(ctx, "ALTER DATABASE template0 ALLOW_CONNECTIONS true"); err != nil {
		return fmt.Errorf("postgres: open template0: %w", err)
	}
	for _, db := range dbs {
		c, err := pgx.Connect(ctx, p.DSNFor(db))
		if err != nil {
			return fmt.Errorf("postgres: freeze %s: %w", db, err)
		}
		_, err = c.Exec(ctx, "VACUUM FREEZE")
		c.Close(context.Background())
		if err != nil {
			return fmt.Errorf("postgres: freeze %s: %w", db, err)
		}
	}
	if _, err := conn.Exec(ctx, "ALTER DATABASE template0 ALLOW_CONNECTIONS false"); err != nil {
		return fmt.Errorf("postgres: close template0: %w", err)
	}
	return nil
}

// findResetWAL finds pg_resetwal for the server's major version: beside the
// server, else Debian's for the same major, else the one
// scripts/fetch-pg-resetwal.sh keeps in the cache for the packaged majors
// (their server-only builds omit it).
func (p *Postgres) findResetWAL() (string, error) {
	own := filepath.Join(p.BinDir, "pg_resetwal")
	if _, err := os.Stat(own); err == nil {
		return own, nil
	}
	raw, err := os.ReadFile(filepath.Join(p.DataDir, "PG_VERSION"))
	if err != nil {
		return "", fmt.Errorf("postgres: read the cluster's major version: %w", err)
	}
	major := string(bytes.TrimSpace(raw))
	for _, candidate := range []string{
		filepath.Join("/usr/lib/postgresql", major, "bin", "pg_resetwal"),
		filepath.Join(PGCacheDir(), "resetwal", major, "pg_resetwal"),
	} {
		if _, err := os.Stat(candidate); err == nil {
			return candidate, nil
		}
	}
	return "", fmt.Errorf("postgres: an old cluster (XIDEpoch, NextXID) needs pg_resetwal %s, which is neither beside %s nor fetched (make deps runs scripts/fetch-pg-resetwal.sh for the majors in pg-resetwal.txt; set %s=0 and %s=0 for a fresh cluster)", major, p.BinDir, EnvPGXIDEpoch, EnvPGNextXID)
}
