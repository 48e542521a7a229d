-- The transactional outbox (event_outbox, or OUTBOX_TABLE: every name below that
-- starts with the table's is derived from it, so outboxes in one schema never
-- collide). Applications insert here inside their business
-- transactions; outbox-streamer delivers the rows to ClickHouse. With
-- OUTBOX_PARTITION_INTERVAL set when the table is created, it is range-partitioned
-- by created_at (the primary key then includes it, as PostgreSQL requires); the
-- leader creates partitions ahead of time, a DEFAULT partition catches any row
-- outside them, and retention drops old partitions whole.
CREATE TABLE IF NOT EXISTS {{.Outbox}} (
    id               BIGSERIAL    {{if not .Partitioned}}PRIMARY KEY{{end}},
    event_type       VARCHAR(255) NOT NULL,
    event_date_time  TIMESTAMP    NOT NULL,
    environment      VARCHAR(50)  NOT NULL DEFAULT '',
    event_context    JSONB        NOT NULL DEFAULT '{}'::jsonb,
    metadata_version BIGINT       NOT NULL DEFAULT 1,
    status           VARCHAR(20)  NOT NULL DEFAULT 'pending',
    -- TIMESTAMP without time zone holds UTC: the defaults convert explicitly so the
    -- session's TimeZone setting cannot shift them.
    created_at       TIMESTAMP    NOT NULL DEFAULT (now() AT TIME ZONE 'UTC'),
    updated_at       TIMESTAMP    NOT NULL DEFAULT (now() AT TIME ZONE 'UTC'),
    -- Retry bookkeeping for rows that could not be delivered.
    attempts         INTEGER      NOT NULL DEFAULT 0,
    last_error       TEXT,
    next_attempt_at  TIMESTAMPTZ,
    CONSTRAINT {{.StatusCheck}}
        CHECK (status IN ('pending', 'processed', 'failed', 'dead')){{if .Partitioned}},
    PRIMARY KEY (id, created_at)
) PARTITION BY RANGE (created_at);
CREATE TABLE IF NOT EXISTS {{.DefaultPartition}} PARTITION OF {{.Outbox}} DEFAULT;{{else}}
);{{end}}

-- Partial index over undelivered rows only: the sweep, the status counts and the
-- oldest-undelivered age read it, and it stays small however many millions of
-- processed rows the table holds.
CREATE INDEX IF NOT EXISTS {{.UndeliveredIndex}}
    ON {{.Outbox}} (status, next_attempt_at, id)
    WHERE status <> 'processed';

-- The in-flight record: before a batch goes to ClickHouse, the highest commit LSN in it
-- is written here, so after a crash the streamer knows which replayed rows ClickHouse
-- may already hold and checks them instead of inserting them twice. One table for
-- every outbox of the database: its rows are keyed by slot, one slot per outbox.
CREATE TABLE IF NOT EXISTS outbox_checkpoint (
    slot_name    TEXT        PRIMARY KEY,
    inflight_lsn PG_LSN      NOT NULL DEFAULT '0/0',
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The publication carries inserts into the outbox and nothing else. The body's
-- dollar-quote tag is chosen so that the configured name cannot end it.
DO {{.DollarTag}}
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = {{.PublicationLiteral}}) THEN
        CREATE PUBLICATION {{.Publication}} FOR TABLE {{.Outbox}} WITH (publish = 'insert'{{if .Partitioned}}, publish_via_partition_root = true{{end}});
    END IF;
END
{{.DollarTag}};
