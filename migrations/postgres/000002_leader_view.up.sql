-- The leader's own view of its work, for `outbox-streamer status`: the leader
-- writes it into its slot's row every PROGRESS_INTERVAL (rate, confirmed LSN,
-- lag, rows pending, the last batch, errors, catching up or not). A column of
-- the shared outbox_checkpoint, one row per slot, so other outboxes of the
-- database are not touched.
ALTER TABLE outbox_checkpoint ADD COLUMN IF NOT EXISTS leader_view JSONB;
ALTER TABLE outbox_checkpoint ADD COLUMN IF NOT EXISTS leader_view_at TIMESTAMPTZ;
