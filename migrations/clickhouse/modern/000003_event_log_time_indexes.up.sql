-- Minmax skipping indexes on created_at and inserted_at, which are not in the
-- sort key: `verify` reads the event table by created_at alone (an event the
-- outbox lacks may carry any event_date_time), and a new session reads the
-- highest commit LSN inserted lately. Parts hold rows inserted close
-- together, so their granules' ranges of both are narrow and such reads skip
-- almost every other granule. Parts written before this migration get the
-- indexes when they are merged.
ALTER TABLE {{.Table}} ADD INDEX IF NOT EXISTS created_at_minmax created_at TYPE minmax GRANULARITY 1;
ALTER TABLE {{.Table}} ADD INDEX IF NOT EXISTS inserted_at_minmax inserted_at TYPE minmax GRANULARITY 1;
