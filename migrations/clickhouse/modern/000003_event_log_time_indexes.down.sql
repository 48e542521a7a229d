ALTER TABLE {{.Table}} DROP INDEX IF EXISTS inserted_at_minmax;
ALTER TABLE {{.Table}} DROP INDEX IF EXISTS created_at_minmax;
