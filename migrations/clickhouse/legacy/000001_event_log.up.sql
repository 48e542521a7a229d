-- The nearest equivalent for servers older than 22.x (18.16 is the one tested):
-- DateTime (seconds, 1970-2106) instead of DateTime64(6), String instead of
-- LowCardinality(String), no insert deduplication window.
CREATE TABLE IF NOT EXISTS {{.Table}} (
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
ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMM(event_date_time)
ORDER BY (event_type, event_date_time, event_id);
