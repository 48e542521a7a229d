package main

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/outbox-streamer/outbox-streamer/sink"
)

// Pausing the peer. ClickHouse 26.7's MaterializedPostgreSQL has no pause: DETACH
// DATABASE fails ("DETACH TABLE not allowed, use DETACH PERMANENTLY", after it has
// already stopped the replication handler, which nothing but a server restart
// starts again), DETACH DATABASE ... PERMANENTLY is not implemented for
// databases, and there is no SYSTEM STOP/START for the engine. The engine reads
// its slot over SQL (pg_logical_slot_peek_binary_changes, then
// pg_replication_slot_advance) on a timer that backs off from 200 ms to 10 s
// while the slot is empty or fails. So g pauses it from PostgreSQL's side: the
// bench holds the engine's slot with a walsender of its own that never
// confirms anything, every peek of the engine fails with "replication slot is
// active" and the slot stays where the engine left it. Resuming closes that
// walsender and wakes the engine's consumer at once with ALTER DATABASE ...
// MODIFY SETTING of its block size to the default it already has (the engine
// deactivates and reschedules its consumer task on any setting change): without
// it the first read after the pause would wait up to the 10 s backoff.

// pausePublication is an empty publication the holding walsender names, so that
// pgoutput sends it none of the backlog's rows while it holds the slot.
const pausePublication = "bench_pause"

// peerBlockSize is materialized_postgresql_max_block_size's default (65536): the
// resume sets it to the value it has.
const peerBlockSize = 65536

// slotHold is a walsender of the bench's own holding a logical slot: while it
// lives nobody else can read the slot, and as it confirms only the position the
// slot already had, the slot does not move.
type slotHold struct {
	conn   *pgconn.PgConn
	pid    uint32
	at     pglogrepl.LSN
	cancel context.CancelFunc
	done   chan error
}

// holdSlot starts replication from slot at its confirmed position at (the slot's
// owner may be reading it: "active" errors are retried for up to timeout).
func holdSlot(ctx context.Context, dsn, slot string, at uint64, timeout time.Duration) (*slotHold, error) {
	cfg, err := pgconn.ParseConfig(dsn)
	if err != nil {
		return nil, err
	}
	cfg.RuntimeParams["replication"] = "database"
	cfg.RuntimeParams["application_name"] = "bench-slot-hold"
	conn, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("replication connection: %w", err)
	}
	h := &slotHold{conn: conn, pid: conn.PID(), at: pglogrepl.LSN(at), done: make(chan error, 1)}
	err = poll(ctx, timeout, 10*time.Millisecond, "the peer's slot "+slot+" to be free", func() (bool, error) {
		err := pglogrepl.StartReplication(ctx, conn, slot, h.at, pglogrepl.StartReplicationOptions{
			Mode:       pglogrepl.LogicalReplication,
			PluginArgs: []string{"proto_version '1'", "publication_names '" + pausePublication + "'"},
		})
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == "55006" { // object_in_use: the engine is reading it
			return false, nil
		}
		return err == nil, err
	})
	if err != nil {
		conn.Close(context.Background())
		return nil, fmt.Errorf("hold slot %q: %w", slot, err)
	}
	hctx, cancel := context.WithCancel(context.Background())
	h.cancel = cancel
	go func() { h.done <- h.run(hctx) }()
	return h, nil
}

// run answers the walsender's keepalives (within wal_sender_timeout) with the
// position the slot had, and discards anything else, until ctx ends.
func (h *slotHold) run(ctx context.Context) error {
	for {
		rctx, cancel := context.WithTimeout(ctx, time.Second)
		raw, err := h.conn.ReceiveMessage(rctx)
		cancel()
		if ctx.Err() != nil {
			return nil
		}
		if err != nil {
			if pgconn.Timeout(err) {
				continue
			}
			return fmt.Errorf("slot hold: receive: %w", err)
		}
		switch m := raw.(type) {
		case *pgproto3.CopyData:
			if len(m.Data) > 0 && m.Data[0] == pglogrepl.PrimaryKeepaliveMessageByteID {
				ka, err := pglogrepl.ParsePrimaryKeepaliveMessage(m.Data[1:])
				if err != nil {
					return err
				}
				if ka.ReplyRequested {
					if err := pglogrepl.SendStandbyStatusUpdate(ctx, h.conn, pglogrepl.StandbyStatusUpdate{
						WALWritePosition: h.at, WALFlushPosition: h.at, WALApplyPosition: h.at,
					}); err != nil {
						return fmt.Errorf("slot hold: status update: %w", err)
					}
				}
			}
		case *pgproto3.ErrorResponse:
			return fmt.Errorf("slot hold: %w", pgconn.ErrorResponseToPgError(m))
		}
	}
}

// release ends the hold: the walsender exits and the slot is free (once
// PostgreSQL has cleared its active_pid). It returns an error the hold met.
func (h *slotHold) release() error {
	h.cancel()
	err := <-h.done
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = h.conn.Close(ctx)
	return err
}

// peerSlot is the engine's replication slot: its name, confirmed_flush_lsn and
// the pid holding it (0 when free). The engine keeps one permanent slot per
// database; during its snapshot it also has a temporary one, left out here.
func (p *peer) slot(ctx context.Context) (name string, confirmed uint64, pid uint32, err error) {
	var lsn *string
	var apid *int64
	err = p.e.Pool.QueryRow(ctx, `SELECT slot_name, confirmed_flush_lsn::text, active_pid FROM pg_replication_slots
		WHERE database = $1 AND NOT temporary`, p.e.pgName).Scan(&name, &lsn, &apid)
	if errors.Is(err, pgx.ErrNoRows) {
		return "", 0, 0, errors.New("the peer has no replication slot")
	}
	if err != nil {
		return "", 0, 0, err
	}
	if lsn != nil {
		l, perr := pglogrepl.ParseLSN(*lsn)
		if perr != nil {
			return "", 0, 0, perr
		}
		confirmed = uint64(l)
	}
	if apid != nil {
		pid = uint32(*apid)
	}
	return name, confirmed, pid, nil
}

// waitReplicating waits until the peer's table exists and its consumer has read
// its slot at least once: a backend of the database whose last query is the
// engine's peek (pg_stat_activity keeps an idle backend's last query).
func (p *peer) waitReplicating(ctx context.Context, timeout time.Duration) error {
	if err := p.waitReady(ctx, timeout); err != nil {
		return err
	}
	return poll(ctx, timeout, 20*time.Millisecond, "the peer's consumer to read its slot", func() (bool, error) {
		var n int
		err := p.e.Pool.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity
			WHERE datname = $1 AND pid <> pg_backend_pid() AND query LIKE '%pg\_logical\_slot\_peek\_binary\_changes%'`, p.e.pgName).Scan(&n)
		return n > 0, err
	})
}

// wake makes the engine's consumer read its slot now rather than at the end of
// its backoff: a setting change (to the value it has) reschedules it.
func (p *peer) wake(ctx context.Context) error {
	sctx := clickhouse.Context(ctx, clickhouse.WithSettings(clickhouse.Settings{"allow_experimental_database_materialized_postgresql": 1}))
	q := fmt.Sprintf("ALTER DATABASE %s MODIFY SETTING materialized_postgresql_max_block_size = %d", sink.QuoteIdent(p.db), peerBlockSize)
	if err := p.e.CH.Exec(sctx, q); err != nil {
		return fmt.Errorf("wake the peer's consumer: %w", err)
	}
	return nil
}
