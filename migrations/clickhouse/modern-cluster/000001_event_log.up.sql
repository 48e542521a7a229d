-- The modern schema on a cluster (CLICKHOUSE_CLUSTER): the rows live in the
-- local table on every node, replicated within a shard through ClickHouse
-- Keeper or ZooKeeper (the {shard} and {replica} macros come from each
-- server's <macros>); the event table is a Distributed table over them,
-- sharded by event_id, so that an event always lands on the same shard. The
-- streamer inserts into the Distributed table synchronously, with a quorum of
-- every replica; replicated tables deduplicate identical blocks (and blocks
-- with the same insert_deduplication_token) without a setting.
CREATE TABLE IF NOT EXISTS {{.Local}} ON CLUSTER {{.Cluster}} (
    event_id         UInt64,
    event_type       LowCardinality(String),
    event_date_time  DateTime64(6, 'UTC'),
    environment      LowCardinality(String),
    event_context    {{.ContextType}},
    metadata_version Int64,
    created_at       DateTime64(6, 'UTC'),
    commit_lsn       UInt64,
    inserted_at      DateTime64(6, 'UTC') DEFAULT now64(6)
)
ENGINE = ReplicatedReplacingMergeTree({{.ReplicaPath}}, '{replica}')
PARTITION BY toYYYYMM(event_date_time)
ORDER BY (event_type, event_date_time, event_id);
CREATE TABLE IF NOT EXISTS {{.Table}} ON CLUSTER {{.Cluster}} AS {{.Local}}
ENGINE = Distributed({{.ClusterLiteral}}, {{.DatabaseLiteral}}, {{.LocalLiteral}}, cityHash64(event_id));
