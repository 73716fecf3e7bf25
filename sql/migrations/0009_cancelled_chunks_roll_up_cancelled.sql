-- A job rolls up `completed` only when every chunk completed: else `failed`
-- if a chunk failed, else `cancelled`. A job cancelled, then retried for one
-- chunk that then completed, used to say `completed` with chunks cancelled.
--
-- syncctl_refresh_job is 0007's but for that roll-up.

-- Recompute a job's derived state after any change to its chunks: how many
-- of its chunks are in flight, when one may next be claimed, the watermark,
-- and the roll-up of its status. The caller holds the lock on the job.
CREATE OR REPLACE FUNCTION syncctl_refresh_job(p_job_id uuid) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_parallel integer;
    v_sync_to timestamptz;
    v_in_flight integer;
    v_open record;
    v_has_open boolean;
    v_claimable_at timestamptz;
    v_exhausted uuid;
    v_first_unfinished record;
    v_through timestamptz;
BEGIN
    SELECT greatest(coalesce(q.parallel, 1), 1), q.sync_to INTO v_parallel, v_sync_to
      FROM sync_queue q WHERE q.id = p_job_id;
    SELECT count(*) INTO v_in_flight
      FROM chunked_sync_jobs c
     WHERE c.parent_sync_job_id = p_job_id AND c.status = 'processing';
    LOOP
        -- Only the job's first `parallel` chunks still pending or processing
        -- may run (lowest index first); with parallel 1, the reference's
        -- sequential rule. The earliest claimable among them sets claimable_at.
        v_has_open := false;
        v_claimable_at := NULL;
        v_exhausted := NULL;
        FOR v_open IN
            SELECT c.id, c.status, c.not_before, c.attempts, c.max_attempts
              FROM chunked_sync_jobs c
             WHERE c.parent_sync_job_id = p_job_id AND c.status IN ('pending', 'processing')
             ORDER BY c.chunk_index
             LIMIT v_parallel
        LOOP
            v_has_open := true;
            CONTINUE WHEN v_open.status <> 'pending';
            IF v_open.attempts >= v_open.max_attempts THEN
                v_exhausted := v_open.id;
                EXIT;
            END IF;
            v_claimable_at := least(v_claimable_at, coalesce(v_open.not_before, now()));
        END LOOP;
        EXIT WHEN v_exhausted IS NULL;
        -- Put back to pending by hand after its last attempt (the runbook's
        -- reset ignores attempts): attempts stay bounded, so it fails.
        UPDATE chunked_sync_jobs c
           SET status = 'failed',
               completed_at = now(),
               lease_expires_at = NULL,
               not_before = NULL,
               last_error = format('put back to pending with no attempts left (%s of %s used)',
                                   c.attempts, c.max_attempts)
                            || coalesce('; before: ' || c.last_error, ''),
               updated_at = now()
         WHERE c.id = v_exhausted;
    END LOOP;

    -- The watermark: where the first chunk not completed starts, or the end
    -- of the window once every chunk completed. Offset chunks have no start
    -- time, so an older job's watermark is only known when it completes.
    SELECT c.chunk_index, c.window_start INTO v_first_unfinished
      FROM chunked_sync_jobs c
     WHERE c.parent_sync_job_id = p_job_id AND c.status <> 'completed'
     ORDER BY c.chunk_index
     LIMIT 1;
    IF NOT FOUND THEN
        v_through := v_sync_to;
    ELSE
        v_through := v_first_unfinished.window_start;  -- NULL for the first chunk
    END IF;

    IF NOT v_has_open THEN
        -- Every chunk is terminal: the job is done, in this same transaction.
        UPDATE sync_queue q
           SET status = CASE
                   WHEN q.status = 'cancelled' THEN 'cancelled'
                   WHEN EXISTS (SELECT 1 FROM chunked_sync_jobs c
                                 WHERE c.parent_sync_job_id = q.id AND c.status = 'failed')
                       THEN 'failed'
                   WHEN EXISTS (SELECT 1 FROM chunked_sync_jobs c
                                 WHERE c.parent_sync_job_id = q.id AND c.status = 'cancelled')
                       THEN 'cancelled'
                   ELSE 'completed' END,
               claimable_at = NULL,
               chunks_in_flight = 0,
               synced_through = greatest(q.synced_through, v_through),
               completed_at = coalesce(q.completed_at, now()),
               updated_at = now()
         WHERE q.id = p_job_id;
        RETURN;
    END IF;
    -- A cancelled job stays cancelled whatever was done to its chunks by hand:
    -- reviving it could clash with its store's next job (one active per store).
    UPDATE sync_queue q
       SET claimable_at = CASE WHEN q.status = 'cancelled' OR v_in_flight >= v_parallel
                               THEN NULL
                               ELSE v_claimable_at END,
           chunks_in_flight = v_in_flight,
           synced_through = greatest(q.synced_through, v_through),
           status = CASE WHEN q.status = 'cancelled' THEN 'cancelled'
                         WHEN q.status = 'pending' AND v_in_flight = 0 THEN 'pending'
                         ELSE 'processing' END,
           completed_at = CASE WHEN q.status = 'cancelled' THEN q.completed_at END,
           updated_at = now()
     WHERE q.id = p_job_id;
END $$;

ALTER FUNCTION syncctl_refresh_job(uuid) SET enable_seqscan = off;
