DROP PUBLICATION IF EXISTS {{.Publication}};
DROP TABLE IF EXISTS outbox_checkpoint;
DROP TABLE IF EXISTS event_outbox;
