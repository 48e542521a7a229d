-- A minmax skipping index on created_at: `verify` reads the event table by
-- created_at alone (an event the outbox lacks may carry any event_date_time),
-- and created_at is not in the sort key. Parts hold rows inserted close
-- together, so their granules' created_at ranges are narrow and a verified
-- range skips almost every other granule. Parts written before this
-- migration get the index when they are merged.
ALTER TABLE {{.Table}} ADD INDEX IF NOT EXISTS created_at_minmax created_at TYPE minmax GRANULARITY 1;
