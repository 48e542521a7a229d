ALTER TABLE {{.Local}} ON CLUSTER {{.Cluster}} DROP INDEX IF EXISTS inserted_at_minmax;
ALTER TABLE {{.Local}} ON CLUSTER {{.Cluster}} DROP INDEX IF EXISTS created_at_minmax;
