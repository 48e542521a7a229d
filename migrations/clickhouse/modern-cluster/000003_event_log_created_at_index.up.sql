-- See the single-server migration 3: a minmax skipping index on created_at
-- for `verify`, on every node's local table.
ALTER TABLE {{.Local}} ON CLUSTER {{.Cluster}} ADD INDEX IF NOT EXISTS created_at_minmax created_at TYPE minmax GRANULARITY 1;
