package sink

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/outbox-streamer/outbox-streamer/internal/record"
)

// Staging of streamed transactions (protocol 2). PostgreSQL sends a large
// transaction while it runs; its rows are written to the staging table
// (StagingTable, created by migration 2) under their slot and transaction,
// and on the commit one INSERT ... SELECT copies them into the event table:
// the time from the commit to the rows in event_log is then the server's copy,
// not a million rows' round trip through the streamer. The event table never
// holds a row of an unfinished or aborted transaction. One partition per slot
// and transaction, so dropping a transaction is a metadata operation.

// StagingTable is the name of the event table's staging table.
func StagingTable(table string) string { return table + "_staging" }

// stagingColumns are the staging table's columns, in insert order.
const stagingColumns = "slot, xid, subxid, event_id, event_type, event_date_time, environment, event_context, metadata_version, created_at"

// Staged names the rows one slot staged for one top-level transaction.
type Staged struct {
	Slot string
	Xid  uint32
	// Aborted are the subtransactions rolled back: their rows stay out.
	Aborted []uint32
}

func (c *Client) stagingTable() string {
	return QuoteIdent(c.cfg.Database) + "." + QuoteIdent(StagingTable(c.cfg.Table))
}

// StagingAvailable reports whether streamed transactions can be staged: the
// staging table exists (migration 2 ran) and the events go to one server (a
// cluster's nodes would each need one; not supported yet).
func (c *Client) StagingAvailable(ctx context.Context) (bool, error) {
	if err := c.Ready(ctx); err != nil {
		return false, err
	}
	if c.cfg.Cluster != "" {
		return false, nil
	}
	var n uint8
	if err := c.conn.QueryRow(ctx, "EXISTS TABLE "+c.stagingTable()).Scan(&n); err != nil {
		c.noteFailure(err)
		return false, fmt.Errorf("look for the staging table %s: %w", c.stagingTable(), err)
	}
	return n == 1, nil
}

// Stage writes rows of the in-progress transaction s.Xid, each of the
// subtransaction subxids[i], in one insert. The caller validated them.
func (c *Client) Stage(ctx context.Context, s Staged, subxids []uint32, events []record.Event) error {
	if len(events) == 0 {
		return nil
	}
	if len(subxids) != len(events) {
		return fmt.Errorf("stage %d rows with %d subtransaction ids", len(events), len(subxids))
	}
	b, err := c.conn.PrepareBatch(ctx, "INSERT INTO "+c.stagingTable()+" ("+stagingColumns+")")
	if err != nil {
		return fmt.Errorf("prepare insert into %s: %w", c.stagingTable(), err)
	}
	n := len(events)
	slots := make([]string, n)
	xids := make([]uint32, n)
	for i := range events {
		slots[i], xids[i] = s.Slot, s.Xid
	}
	if err := appendColumns(b, append([]any{slots, xids, subxids}, eventColumnValues(events)...), c.stagingTable()); err != nil {
		return err
	}
	if err := b.Send(); err != nil {
		c.noteFailure(err)
		return fmt.Errorf("stage %d rows of transaction %d into %s: %w", n, s.Xid, c.stagingTable(), err)
	}
	return nil
}

// stagedWhere selects the committed rows of s.
func stagedWhere(s Staged) string {
	var sb strings.Builder
	sb.WriteString(" WHERE slot = ")
	sb.WriteString(quoteString(s.Slot))
	sb.WriteString(" AND xid = ")
	sb.WriteString(strconv.FormatUint(uint64(s.Xid), 10))
	if len(s.Aborted) > 0 {
		sb.WriteString(" AND subxid NOT IN (")
		for i, sub := range s.Aborted {
			if i > 0 {
				sb.WriteByte(',')
			}
			sb.WriteString(strconv.FormatUint(uint64(sub), 10))
		}
		sb.WriteByte(')')
	}
	return sb.String()
}

// StagedRows counts the committed rows staged for s.
func (c *Client) StagedRows(ctx context.Context, s Staged) (uint64, error) {
	var n uint64
	if err := c.conn.QueryRow(ctx, "SELECT count() FROM "+c.stagingTable()+stagedWhere(s)).Scan(&n); err != nil {
		c.noteFailure(err)
		return 0, fmt.Errorf("count the staged rows of transaction %d: %w", s.Xid, err)
	}
	return n, nil
}

// Promote copies the rows rows committed rows staged for s into the event
// table in one INSERT ... SELECT, with the transaction's commit LSN. Its text
// starts like every insert into the event table, so that a lookup after an
// uncertain outcome waits for it (awaitInsertsDone).
func (c *Client) Promote(ctx context.Context, s Staged, commitLSN uint64, rows int) error {
	// The driver bounds a whole statement by one read timeout unless the
	// context has a deadline; a copy of many millions of rows may need more.
	ctx, cancel := context.WithTimeout(ctx, c.cfg.ReadTimeout+time.Duration(rows)*promotePerRow)
	defer cancel()
	q := "INSERT INTO " + c.table + " (" + insertColumns + ") SELECT " +
		"event_id, event_type, event_date_time, environment, event_context, metadata_version, created_at, toUInt64(" +
		strconv.FormatUint(commitLSN, 10) + ") FROM " + c.stagingTable() + stagedWhere(s)
	if err := c.conn.Exec(ctx, q); err != nil {
		c.noteFailure(err)
		return fmt.Errorf("copy the staged rows of transaction %d into %s: %w", s.Xid, c.table, err)
	}
	return nil
}

// promotePerRow is the time a promote may take per row beyond the read
// timeout: ten times what a 1,000,000-row copy took here (0.55 s).
const promotePerRow = 5 * time.Microsecond

// DropStaged drops what slot staged for transaction xid.
func (c *Client) DropStaged(ctx context.Context, slot string, xid uint32) error {
	q := "ALTER TABLE " + c.stagingTable() + " DROP PARTITION (" + quoteString(slot) + ", " + strconv.FormatUint(uint64(xid), 10) + ")"
	if err := c.conn.Exec(ctx, q); err != nil {
		c.noteFailure(err)
		return fmt.Errorf("drop the staged rows of transaction %d: %w", xid, err)
	}
	return nil
}

// ClearStaging drops everything slot staged: at the start of a replication
// session, when the server sends unfinished transactions again from their
// start. Only slot's leader writes its partitions.
func (c *Client) ClearStaging(ctx context.Context, slot string) error {
	rows, err := c.conn.Query(ctx, "SELECT DISTINCT xid FROM "+c.stagingTable()+" WHERE slot = "+quoteString(slot))
	if err != nil {
		c.noteFailure(err)
		return fmt.Errorf("list the staged transactions of slot %q: %w", slot, err)
	}
	var xids []uint32
	for rows.Next() {
		var x uint32
		if err := rows.Scan(&x); err != nil {
			rows.Close()
			return fmt.Errorf("list the staged transactions of slot %q: %w", slot, err)
		}
		xids = append(xids, x)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return fmt.Errorf("list the staged transactions of slot %q: %w", slot, err)
	}
	for _, x := range xids {
		if err := c.DropStaged(ctx, slot, x); err != nil {
			return err
		}
	}
	return nil
}
