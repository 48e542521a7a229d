package replication

import (
	"context"
	"fmt"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"go.uber.org/zap"
)

// minFailoverMajor is the first PostgreSQL with failover slots.
const minFailoverMajor = 17

// failoverPlan is what Open does about REPLICATION_SLOT_FAILOVER.
type failoverPlan struct {
	// want is whether the slot should be a failover slot.
	want bool
	// standbySlots is the primary's synchronized_standby_slots.
	standbySlots string
}

// planFailover decides whether the slot should be a failover slot: never
// with "off" or before PostgreSQL 17 (refused with "on"), always with "on",
// and with "auto" when synchronized_standby_slots names a standby.
func planFailover(ctx context.Context, plain *pgx.Conn, cfg Config) (failoverPlan, error) {
	if cfg.SlotFailover == FailoverOff {
		return failoverPlan{}, nil
	}
	version := plain.PgConn().ParameterStatus("server_version")
	if serverMajor(version) < minFailoverMajor {
		if cfg.SlotFailover == FailoverOn {
			return failoverPlan{}, &PreconditionError{
				Problem: fmt.Sprintf("REPLICATION_SLOT_FAILOVER is on, but PostgreSQL %s has no failover slots", version),
				Hint:    "use PostgreSQL 17 or newer, or set REPLICATION_SLOT_FAILOVER=auto or off",
			}
		}
		return failoverPlan{}, nil
	}
	var plan failoverPlan
	if err := plain.QueryRow(ctx, "SELECT current_setting('synchronized_standby_slots')").Scan(&plan.standbySlots); err != nil {
		return failoverPlan{}, fmt.Errorf("read synchronized_standby_slots: %w", err)
	}
	plan.want = cfg.SlotFailover == FailoverOn || plan.standbySlots != ""
	return plan, nil
}

// warnings logs what makes a failover slot unreliable.
func (p failoverPlan) warn(log *zap.Logger) {
	if p.want && p.standbySlots == "" {
		// Without it the walsender may send (and the streamer confirm)
		// changes the standby has not received: after a failover the synced
		// slot would be behind what ClickHouse holds, or the new primary
		// would lack transactions ClickHouse already has.
		log.Warn("the slot is a failover slot but synchronized_standby_slots is empty on the primary: name the standby's physical slot there so that nothing reaches ClickHouse before the standby has it")
	}
}

// createFailoverSlot creates the slot as a failover slot with the syntax of
// PostgreSQL 15+ (pglogrepl only speaks the older one), exporting a
// snapshot like the ordinary creation.
func createFailoverSlot(ctx context.Context, conn *pgconn.PgConn, slot string) (pglogrepl.CreateReplicationSlotResult, error) {
	sql := fmt.Sprintf("CREATE_REPLICATION_SLOT %s LOGICAL pgoutput (SNAPSHOT 'export', FAILOVER true)", pgx.Identifier{slot}.Sanitize())
	return pglogrepl.ParseCreateReplicationSlot(conn.Exec(ctx, sql))
}

// makeFailoverSlot turns an existing, inactive slot into a failover slot.
func makeFailoverSlot(ctx context.Context, conn *pgconn.PgConn, slot string) error {
	sql := fmt.Sprintf("ALTER_REPLICATION_SLOT %s (FAILOVER true)", pgx.Identifier{slot}.Sanitize())
	if _, err := conn.Exec(ctx, sql).ReadAll(); err != nil {
		return fmt.Errorf("make replication slot %q a failover slot: %w", slot, err)
	}
	return nil
}
