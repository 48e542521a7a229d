-- See the single-server migration 3: minmax skipping indexes on created_at
-- and inserted_at, on every node's local table.
ALTER TABLE {{.Local}} ON CLUSTER {{.Cluster}} ADD INDEX IF NOT EXISTS created_at_minmax created_at TYPE minmax GRANULARITY 1;
ALTER TABLE {{.Local}} ON CLUSTER {{.Cluster}} ADD INDEX IF NOT EXISTS inserted_at_minmax inserted_at TYPE minmax GRANULARITY 1;
