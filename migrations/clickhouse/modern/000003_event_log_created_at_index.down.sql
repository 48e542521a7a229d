ALTER TABLE {{.Table}} DROP INDEX IF EXISTS created_at_minmax;
