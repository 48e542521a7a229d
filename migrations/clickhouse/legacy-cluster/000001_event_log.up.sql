-- The legacy schema on a cluster (CLICKHOUSE_CLUSTER): the rows live in
-- the local table on every node, replicated within a shard through ZooKeeper
-- (the {shard} and {replica} macros come from each server's <macros>); the
-- event table is a Distributed table over them, sharded by event_id, so that
-- an event always lands on the same shard. The streamer inserts into the
-- Distributed table synchronously, with a quorum of every replica.
CREATE TABLE IF NOT EXISTS {{.Local}} ON CLUSTER {{.Cluster}} (
    event_id         UInt64,
    event_type       String,
    event_date_time  DateTime('UTC'),
    environment      String,
    event_context    String,
    metadata_version Int64,
    created_at       DateTime('UTC'),
    commit_lsn       UInt64,
    inserted_at      DateTime('UTC') DEFAULT now()
)
ENGINE = ReplicatedReplacingMergeTree({{.ReplicaPath}}, '{replica}')
PARTITION BY toYYYYMM(event_date_time)
ORDER BY (event_type, event_date_time, event_id);
CREATE TABLE IF NOT EXISTS {{.Table}} ON CLUSTER {{.Cluster}} AS {{.Local}}
ENGINE = Distributed({{.ClusterLiteral}}, {{.DatabaseLiteral}}, {{.LocalLiteral}}, cityHash64(event_id));
