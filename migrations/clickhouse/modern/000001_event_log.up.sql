-- Partitioned by month, ordered for queries by event type and time, event_id last.
-- ReplacingMergeTree keyed on the event is only a safety net: the streamer itself
-- never inserts an event twice. The deduplication window also drops a retried insert
-- of an identical block.
CREATE TABLE IF NOT EXISTS {{.Table}} (
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
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(event_date_time)
ORDER BY (event_type, event_date_time, event_id)
SETTINGS non_replicated_deduplication_window = 1000;
