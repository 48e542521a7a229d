package main

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/outbox-streamer/outbox-streamer/replication"
)

// readSlot is the bare slot reader of scenario a: one replication connection that
// receives the pgoutput stream of the slot, decodes every message with this
// repository's replication.Decoder (the streamer's own decoder), counts the inserts
// and acknowledges the last commit's end LSN (every second, on request, and at the
// end) — no batching, no ClickHouse, no status updates. It returns once want
// inserts and the commit after the last one were decoded.
func readSlot(ctx context.Context, dsn, slot string, want int, onDone func()) (inserts int, lastEnd uint64, doneAt time.Time, err error) {
	// The streamer's own connection settings: the ceiling reads with
	// production's by construction.
	cfg, err := replication.ConnConfig(dsn)
	if err != nil {
		return 0, 0, doneAt, err
	}
	cfg.RuntimeParams["application_name"] = "bench-slot-reader"
	conn, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		return 0, 0, doneAt, fmt.Errorf("replication connection: %w", err)
	}
	defer conn.Close(context.Background())
	err = pglogrepl.StartReplication(ctx, conn, slot, 0, pglogrepl.StartReplicationOptions{
		Mode:       pglogrepl.LogicalReplication,
		PluginArgs: []string{"proto_version '1'", "publication_names '" + publication + "'"},
	})
	if err != nil {
		return 0, 0, doneAt, fmt.Errorf("start replication: %w", err)
	}
	dec := replication.NewDecoder("public", "event_outbox", time.UTC)
	var msg replication.Message
	ack := func() error {
		return pglogrepl.SendStandbyStatusUpdate(ctx, conn, pglogrepl.StandbyStatusUpdate{
			WALWritePosition: pglogrepl.LSN(lastEnd), WALFlushPosition: pglogrepl.LSN(lastEnd), WALApplyPosition: pglogrepl.LSN(lastEnd),
		})
	}
	nextAck := time.Now().Add(time.Second)
	for {
		if time.Now().After(nextAck) {
			if err := ack(); err != nil {
				return inserts, lastEnd, doneAt, err
			}
			nextAck = time.Now().Add(time.Second)
		}
		rctx, cancel := context.WithDeadline(ctx, nextAck)
		raw, err := conn.ReceiveMessage(rctx)
		cancel()
		if err != nil {
			if pgconn.Timeout(err) && ctx.Err() == nil {
				continue
			}
			return inserts, lastEnd, doneAt, fmt.Errorf("receive: %w", err)
		}
		switch m := raw.(type) {
		case *pgproto3.CopyData:
			switch m.Data[0] {
			case pglogrepl.PrimaryKeepaliveMessageByteID:
				ka, err := pglogrepl.ParsePrimaryKeepaliveMessage(m.Data[1:])
				if err != nil {
					return inserts, lastEnd, doneAt, err
				}
				if ka.ReplyRequested {
					if err := ack(); err != nil {
						return inserts, lastEnd, doneAt, err
					}
				}
			case pglogrepl.XLogDataByteID:
				xld, err := pglogrepl.ParseXLogData(m.Data[1:])
				if err != nil {
					return inserts, lastEnd, doneAt, err
				}
				if err := dec.Decode(xld.WALData, &msg); err != nil {
					return inserts, lastEnd, doneAt, err
				}
				switch msg.Kind {
				case replication.KindInsert:
					inserts++
				case replication.KindCommit:
					lastEnd = msg.EndLSN
					if inserts >= want {
						if err := ack(); err != nil {
							return inserts, lastEnd, doneAt, err
						}
						doneAt = time.Now()
						if onDone != nil {
							onDone() // while the walsender still exists
						}
						// Leave copy mode so the server has read the acknowledgement.
						dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
						_, _ = pglogrepl.SendStandbyCopyDone(dctx, conn)
						cancel()
						return inserts, lastEnd, doneAt, nil
					}
				}
			}
		case *pgproto3.ErrorResponse:
			return inserts, lastEnd, doneAt, pgconn.ErrorResponseToPgError(m)
		}
	}
}

// runBareReader is scenario a: a backlog committed after the slot was created,
// read by readSlot.
func runBareReader(ctx context.Context, b *bench) (map[string]float64, error) {
	e, err := newEnv(ctx, b.srv)
	if err != nil {
		return nil, err
	}
	defer e.close()
	if _, err := e.Pool.Exec(ctx, "SELECT pg_create_logical_replication_slot($1, 'pgoutput')", e.Slot); err != nil {
		return nil, fmt.Errorf("create slot: %w", err)
	}
	target, err := e.insertBacklog(ctx, b.cfg.Rows, b.cfg.TxSize)
	if err != nil {
		return nil, err
	}
	if err := e.settle(ctx); err != nil {
		return nil, err
	}
	meter := &cpuMeter{}
	c0 := meter.sample()
	t0 := time.Now()
	rctx, cancel := context.WithTimeout(ctx, b.cfg.Timeout)
	defer cancel()
	var use cpuUse
	n, lastEnd, doneAt, err := readSlot(rctx, e.DSN, e.Slot, b.cfg.Rows, func() { use = meter.sample().since(c0) })
	took := doneAt.Sub(t0)
	if err != nil {
		return nil, fmt.Errorf("bare reader after %d rows: %w", n, err)
	}
	if n != b.cfg.Rows {
		return nil, fmt.Errorf("bare reader decoded %d inserts, want %d", n, b.cfg.Rows)
	}
	if lastEnd < target {
		return nil, fmt.Errorf("bare reader stopped at %s, before the backlog's end %s", pglogrepl.LSN(lastEnd), pglogrepl.LSN(target))
	}
	if err := e.waitConfirmed(ctx, lastEnd, 30*time.Second); err != nil {
		return nil, err
	}
	b.note("a", use)
	return map[string]float64{
		"rows":       float64(n),
		"seconds":    took.Seconds(),
		"rows_per_s": float64(n) / took.Seconds(),
	}, nil
}
