-- An operator's reset is recorded as one, and times in reasons read as
-- syncctl prints them everywhere else.
--
-- `syncctl reset-stuck` (syncctl_reap with a reason) ends the attempts it
-- cuts short as `reset`, not `reaped`: the attempt history says whether a
-- person or the reaper put the chunk back. Reasons that quote a time write
-- it as "2026-12-02 14:01:14Z", not PostgreSQL's "2026-12-02
-- 14:01:14.123456+00".
--
-- Safe under running workers: the new check allows every value the old one
-- did (added NOT VALID: rows already there passed the narrower check, so no
-- scan of chunk_attempts and no long lock), and the function keeps its
-- signature.

ALTER TABLE chunk_attempts DROP CONSTRAINT IF EXISTS chunk_attempts_outcome_check;
ALTER TABLE chunk_attempts ADD CONSTRAINT chunk_attempts_outcome_check CHECK (outcome IN (
    'running', 'completed', 'retrying', 'failed', 'released', 'reaped', 'reset', 'cancelled'))
    NOT VALID;

-- A time as syncctl shows one: UTC, to the second.
CREATE OR REPLACE FUNCTION syncctl_time_text(p_time timestamptz) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT to_char(p_time AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS"Z"')
$$;

-- 0008's reaper, with the outcome and the times above.
CREATE OR REPLACE FUNCTION syncctl_reap(
    p_dry_run boolean DEFAULT false,
    p_started_before timestamptz DEFAULT NULL,
    p_reason text DEFAULT NULL
)
RETURNS TABLE (chunk_id uuid, job_id uuid, chunk_index integer, worker_id text,
               started_at timestamptz, lease_expires_at timestamptz, new_status text)
LANGUAGE plpgsql AS $$
-- The output columns share names with table columns: every column reference
-- below is qualified, and an unqualified one is an error rather than a guess.
#variable_conflict error
DECLARE
    v_job record;
    v_chunk chunked_sync_jobs;
    v_exhausted boolean;
BEGIN
    IF p_dry_run THEN
        RETURN QUERY
        SELECT c.id, c.parent_sync_job_id, c.chunk_index, c.worker_id, c.started_at,
               c.lease_expires_at,
               CASE WHEN c.attempts >= c.max_attempts THEN 'failed' ELSE 'pending' END
          FROM chunked_sync_jobs c
         WHERE c.status = 'processing'
           AND syncctl_chunk_expired(c.lease_expires_at, c.started_at, p_started_before)
         ORDER BY c.started_at;
        RETURN;
    END IF;

    FOR v_job IN
        SELECT q.id FROM sync_queue q
         WHERE q.id IN (SELECT c.parent_sync_job_id FROM chunked_sync_jobs c
                         WHERE c.status = 'processing'
                           AND syncctl_chunk_expired(c.lease_expires_at, c.started_at,
                                                     p_started_before))
         ORDER BY q.id
           FOR NO KEY UPDATE SKIP LOCKED
    LOOP
        -- Re-checked under the lock: a heartbeat may have landed meanwhile.
        FOR v_chunk IN
            SELECT * FROM chunked_sync_jobs c
             WHERE c.parent_sync_job_id = v_job.id
               AND c.status = 'processing'
               AND syncctl_chunk_expired(c.lease_expires_at, c.started_at, p_started_before)
               FOR NO KEY UPDATE SKIP LOCKED
        LOOP
            v_exhausted := v_chunk.attempts >= v_chunk.max_attempts;
            UPDATE chunked_sync_jobs c
               SET status = CASE WHEN v_exhausted THEN 'failed' ELSE 'pending' END,
                   last_error = coalesce(p_reason,
                                         CASE WHEN c.lease_expires_at IS NULL
                                              THEN format('processing since %s with no lease: worker %s',
                                                          syncctl_time_text(c.started_at), c.worker_id)
                                              ELSE format('lease expired at %s: worker %s stopped heartbeating',
                                                          syncctl_time_text(c.lease_expires_at),
                                                          c.worker_id) END)
                                || CASE WHEN v_exhausted
                                        THEN format(' (attempt %s of %s, none left)',
                                                    c.attempts, c.max_attempts)
                                        ELSE '' END,
                   worker_id = CASE WHEN v_exhausted THEN c.worker_id END,
                   lease_expires_at = NULL,
                   completed_at = CASE WHEN v_exhausted THEN now() END,
                   not_before = NULL,
                   updated_at = now()
             WHERE c.id = v_chunk.id;
            UPDATE chunk_attempts a
               SET finished_at = now(),
                   -- An operator's reset-stuck gives a reason; the reaper does not.
                   outcome = CASE WHEN p_reason IS NULL THEN 'reaped' ELSE 'reset' END,
                   error = coalesce(p_reason, 'lease expired'),
                   duration_ms = (extract(epoch FROM now() - a.started_at) * 1000)::integer,
                   emails_synced = v_chunk.emails_synced - coalesce(a.emails_at_start, 0)
             WHERE a.chunk_id = v_chunk.id AND a.outcome = 'running'
               AND a.claim_seq IS NOT DISTINCT FROM v_chunk.claim_seq;
            chunk_id := v_chunk.id;
            job_id := v_job.id;
            chunk_index := v_chunk.chunk_index;
            worker_id := v_chunk.worker_id;
            started_at := v_chunk.started_at;
            lease_expires_at := v_chunk.lease_expires_at;
            new_status := CASE WHEN v_exhausted THEN 'failed' ELSE 'pending' END;
            RETURN NEXT;
        END LOOP;
        PERFORM syncctl_refresh_job(v_job.id);
        PERFORM pg_notify('syncctl_chunks', v_job.id::text);
    END LOOP;

    -- Jobs left wrong by hand-run SQL (the runbook's reset, a chunk edited by
    -- hand): nothing is processing, yet the job is neither claimable nor
    -- rolled up. A job still waiting for its chunks to be created is not one.
    FOR v_job IN
        SELECT q.id FROM sync_queue q
         WHERE q.status IN ('pending', 'processing') AND q.claimable_at IS NULL
           AND EXISTS (SELECT 1 FROM chunked_sync_jobs c WHERE c.parent_sync_job_id = q.id)
           AND NOT EXISTS (SELECT 1 FROM chunked_sync_jobs c
                            WHERE c.parent_sync_job_id = q.id AND c.status = 'processing')
         ORDER BY q.id
           FOR NO KEY UPDATE SKIP LOCKED
    LOOP
        -- No chunk of the job is processing, so an attempt still open was cut short.
        UPDATE chunk_attempts a
           SET finished_at = now(), outcome = 'reaped',
               error = 'put back to pending by hand',
               duration_ms = (extract(epoch FROM now() - a.started_at) * 1000)::integer
         WHERE a.outcome = 'running'
           AND a.chunk_id IN (SELECT c.id FROM chunked_sync_jobs c
                               WHERE c.parent_sync_job_id = v_job.id);
        PERFORM syncctl_refresh_job(v_job.id);
        PERFORM pg_notify('syncctl_chunks', v_job.id::text);
    END LOOP;
END $$;
