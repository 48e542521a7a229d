package migrations

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync/atomic"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/golang-migrate/migrate/v4/database"

	"github.com/outbox-streamer/outbox-streamer/internal/fault"
	"github.com/outbox-streamer/outbox-streamer/sink"
)

// chDriver is a golang-migrate database driver over clickhouse-go's native
// connection. golang-migrate's own ClickHouse driver records versions with a
// database/sql INSERT, which never returns against ClickHouse 18.16 with
// clickhouse-go v2; this one uses a prepared batch, which works on every version.
type chDriver struct {
	conn    driver.Conn
	db      string
	table   string // quoted db.table of the version table
	timeout time.Duration
	locked  atomic.Bool
}

func newCHDriver(ctx context.Context, conn driver.Conn, db, versionTable string, timeout time.Duration) (*chDriver, error) {
	d := &chDriver{conn: conn, db: db, table: sink.QuoteIdent(db) + "." + sink.QuoteIdent(versionTable), timeout: timeout}
	err := conn.Exec(ctx, "CREATE TABLE IF NOT EXISTS "+d.table+
		" (version Int64, dirty UInt8, sequence UInt64) ENGINE = TinyLog")
	if err != nil {
		return nil, fmt.Errorf("create clickhouse migrations table: %w", err)
	}
	return d, nil
}

func (d *chDriver) ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), d.timeout)
}

// Open is not used: the driver is always built with newCHDriver.
func (d *chDriver) Open(string) (database.Driver, error) {
	return nil, errors.New("clickhouse migrations driver is opened by the migrations package")
}

func (d *chDriver) Close() error { return d.conn.Close() }

// Lock is process-local: the streamer's migrations run from one command at a time,
// and ClickHouse has no lock to take.
func (d *chDriver) Lock() error {
	if !d.locked.CompareAndSwap(false, true) {
		return database.ErrLocked
	}
	return nil
}

func (d *chDriver) Unlock() error {
	if !d.locked.CompareAndSwap(true, false) {
		return database.ErrNotLocked
	}
	return nil
}

// Run executes a migration's statements one by one (split on semicolons at line
// ends: the migrations contain no semicolons elsewhere).
func (d *chDriver) Run(r io.Reader) error {
	body, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	for _, stmt := range splitStatements(body) {
		if err := d.exec(stmt); err != nil {
			return database.Error{OrigErr: err, Err: "migration failed", Query: []byte(stmt)}
		}
	}
	return nil
}

// execAttempts bounds how often a statement is sent when the connection
// fails under it: every statement of the migrations creates only what does
// not exist, so sending it again after a lost answer is safe, and a network
// blip should not leave the version dirty.
const execAttempts = 3

func (d *chDriver) exec(stmt string) error {
	var err error
	for attempt := 1; attempt <= execAttempts; attempt++ {
		ctx, cancel := d.ctx()
		err = d.conn.Exec(ctx, stmt)
		cancel()
		if err == nil || !fault.Retryable(err) || attempt == execAttempts {
			return err
		}
		time.Sleep(time.Duration(attempt) * 500 * time.Millisecond)
	}
	return err
}

// splitStatements splits a migration into statements at semicolons outside
// quotes ('...', "...", `...`, with ClickHouse's backslash escapes) and
// outside -- comments, and drops comment-only lines. Identifiers from
// configuration are quoted into the migrations and may hold semicolons.
func splitStatements(body []byte) []string {
	var out []string
	var cur strings.Builder
	flush := func() {
		var lines []string
		for _, l := range strings.Split(cur.String(), "\n") {
			if t := strings.TrimSpace(l); t != "" && !strings.HasPrefix(t, "--") {
				lines = append(lines, l)
			}
		}
		if len(lines) > 0 {
			out = append(out, strings.Join(lines, "\n"))
		}
		cur.Reset()
	}
	var quote byte // the open quote, or 0
	for i := 0; i < len(body); i++ {
		c := body[i]
		switch {
		case quote != 0:
			cur.WriteByte(c)
			if c == '\\' && i+1 < len(body) {
				i++
				cur.WriteByte(body[i])
			} else if c == quote {
				quote = 0
			}
		case c == '\'' || c == '"' || c == '`':
			quote = c
			cur.WriteByte(c)
		case c == '-' && i+1 < len(body) && body[i+1] == '-':
			// A comment runs to the end of the line; keep it (flush drops
			// comment-only lines) but never split inside it.
			end := bytes.IndexByte(body[i:], '\n')
			if end < 0 {
				end = len(body) - i
			}
			cur.Write(body[i : i+end])
			i += end - 1
		case c == ';':
			flush()
		default:
			cur.WriteByte(c)
		}
	}
	flush()
	return out
}

func (d *chDriver) SetVersion(version int, dirty bool) error {
	ctx, cancel := d.ctx()
	defer cancel()
	b, err := d.conn.PrepareBatch(ctx, "INSERT INTO "+d.table+" (version, dirty, sequence)")
	if err != nil {
		return fmt.Errorf("record clickhouse migration version: %w", err)
	}
	var dirtyFlag uint8
	if dirty {
		dirtyFlag = 1
	}
	if err := b.Append(int64(version), dirtyFlag, uint64(time.Now().UnixNano())); err != nil {
		return fmt.Errorf("record clickhouse migration version: %w", err)
	}
	if err := b.Send(); err != nil {
		return fmt.Errorf("record clickhouse migration version: %w", err)
	}
	return nil
}

func (d *chDriver) Version() (int, bool, error) {
	ctx, cancel := d.ctx()
	defer cancel()
	rows, err := d.conn.Query(ctx, "SELECT version, dirty FROM "+d.table+" ORDER BY sequence DESC LIMIT 1")
	if err != nil {
		return 0, false, fmt.Errorf("read clickhouse migration version: %w", err)
	}
	defer rows.Close()
	if !rows.Next() {
		return database.NilVersion, false, rows.Err()
	}
	var v int64
	var dirty uint8
	if err := rows.Scan(&v, &dirty); err != nil {
		return 0, false, fmt.Errorf("read clickhouse migration version: %w", err)
	}
	return int(v), dirty == 1, nil
}

// Drop removes every table of the database (golang-migrate's contract for Drop).
func (d *chDriver) Drop() error {
	ctx, cancel := d.ctx()
	defer cancel()
	rows, err := d.conn.Query(ctx, "SELECT name FROM system.tables WHERE database = ?", d.db)
	if err != nil {
		return err
	}
	var names []string
	for rows.Next() {
		var n string
		if err := rows.Scan(&n); err != nil {
			rows.Close()
			return err
		}
		names = append(names, n)
	}
	rows.Close()
	for _, n := range names {
		if err := d.conn.Exec(ctx, "DROP TABLE IF EXISTS "+sink.QuoteIdent(d.db)+"."+sink.QuoteIdent(n)); err != nil {
			return err
		}
	}
	return nil
}
