-- Every worker's reap looks for active jobs left unclaimable by hand-run SQL
-- (no chunk processing, yet claimable_at empty). This index keeps that look
-- among the few active jobs instead of the whole history of sync_queue.
CREATE INDEX IF NOT EXISTS sync_queue_unclaimable_active_idx
    ON sync_queue (id)
    WHERE status IN ('pending', 'processing') AND claimable_at IS NULL;
