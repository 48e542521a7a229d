-- Rows of large transactions that PostgreSQL streams before their commit
-- (protocol 2). The streamer writes them here while the transaction runs and,
-- once it commits, copies them into the event table with one INSERT ... SELECT
-- and drops their partition; on an abort it only drops the partition. Nothing
-- reads this table but the streamer: event_log never holds a row of an
-- uncommitted or aborted transaction. One partition per slot and transaction.
CREATE TABLE IF NOT EXISTS {{.Staging}} (
    slot             String,
    xid              UInt32,
    subxid           UInt32,
    event_id         UInt64,
    event_type       String,
    event_date_time  DateTime('UTC'),
    environment      String,
    event_context    String,
    metadata_version Int64,
    created_at       DateTime('UTC')
)
ENGINE = MergeTree
PARTITION BY (slot, xid)
ORDER BY tuple();
