package replication

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/zap"
)

// slotWaitReportAfter is how long a slot's creation may take before the
// transactions it waits for are logged.
const slotWaitReportAfter = 5 * time.Second

// openTransactionsSQL lists the oldest transactions holding an xid, which a
// new slot's consistent point waits for (not their statements: those may
// carry application data).
const openTransactionsSQL = `SELECT pid, backend_xid::text, coalesce(application_name, ''),
	coalesce(state, ''), extract(epoch FROM now() - xact_start)::float8
FROM pg_stat_activity
WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid() AND backend_type = 'client backend'
ORDER BY xact_start LIMIT 3`

// watchSlotCreation logs, when creating the slot takes longer than
// slotWaitReportAfter, the transactions it is waiting for: PostgreSQL builds
// a new slot's snapshot only once every transaction running when it began
// has ended, so a long transaction (or a prepared one) holds the first start
// back with nothing else to see. plain must not be used by anyone else until
// the returned stop has returned.
func watchSlotCreation(ctx context.Context, plain *pgx.Conn, log *zap.Logger) (stop func()) {
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() {
		select {
		case <-ctx.Done():
			return
		case <-time.After(slotWaitReportAfter):
		}
		waiting, prepared, err := openTransactions(ctx, plain)
		if err != nil {
			if ctx.Err() == nil {
				log.Warn("creating the replication slot takes long; could not list the transactions it waits for", zap.Error(err))
			}
			return
		}
		log.Warn("creating the replication slot waits for transactions that were open when it began: PostgreSQL decodes from a consistent point only once they end; commit or roll them back, and the streamer goes on by itself",
			zap.String("waiting_for", waiting), zap.Int("prepared_transactions", prepared))
	})
	return func() {
		cancel()
		wg.Wait()
	}
}

// openTransactions describes the oldest open transactions with an xid, and
// counts the prepared ones.
func openTransactions(ctx context.Context, conn *pgx.Conn) (string, int, error) {
	rows, err := conn.Query(ctx, openTransactionsSQL)
	if err != nil {
		return "", 0, fmt.Errorf("list open transactions: %w", err)
	}
	var parts []string
	for rows.Next() {
		var pid int32
		var xid, app, state string
		var age float64
		if err := rows.Scan(&pid, &xid, &app, &state, &age); err != nil {
			rows.Close()
			return "", 0, fmt.Errorf("list open transactions: %w", err)
		}
		parts = append(parts, fmt.Sprintf("pid %d (xid %s, application %q, %s, open %s)",
			pid, xid, app, state, (time.Duration(age*float64(time.Second))).Round(time.Second)))
	}
	if err := rows.Err(); err != nil {
		return "", 0, fmt.Errorf("list open transactions: %w", err)
	}
	var prepared int
	if err := conn.QueryRow(ctx, "SELECT count(*) FROM pg_prepared_xacts").Scan(&prepared); err != nil {
		return "", 0, fmt.Errorf("count prepared transactions: %w", err)
	}
	if len(parts) == 0 {
		return "none with an xid now (they may have just ended)", prepared, nil
	}
	return strings.Join(parts, "; "), prepared, nil
}
