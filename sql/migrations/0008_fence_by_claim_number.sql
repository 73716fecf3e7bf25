-- The fence is a claim number never reused; attempts are numbered per chunk
-- and count their own messages; complete_chunk_job cannot touch a chunk a
-- syncctl worker holds; the reaper never waits on a chunk another session
-- has locked.
--
-- Until now a worker's writes were fenced by worker id plus attempt. Every
-- slot of a process shares the worker id, and `retry` (and a release) can
-- give a chunk the same attempt number again, so one slot could write into a
-- claim that another slot of the same process had since made. Every claim
-- now takes a number from a sequence; heartbeats, checkpoints and finishes
-- apply only while the chunk still carries the number of their claim.
--
-- Workers of the previous release keep working until they are restarted:
-- syncctl_finish_chunk keeps its signature and its worker-and-attempt fence.

CREATE SEQUENCE IF NOT EXISTS syncctl_claim_numbers AS bigint;

ALTER TABLE chunked_sync_jobs
    -- The number of the claim holding the chunk (of the last one, once it ended).
    ADD COLUMN IF NOT EXISTS claim_seq bigint,
    -- Who made that claim: 'syncctl' (a syncctl worker) or 'claim_next_chunk_job'
    -- (a caller of the original system's function).
    ADD COLUMN IF NOT EXISTS claimed_via text;

ALTER TABLE chunk_attempts
    ADD COLUMN IF NOT EXISTS claim_seq bigint,
    -- The chunk's emails_synced when the attempt began: the attempt's own
    -- count is what it added.
    ADD COLUMN IF NOT EXISTS emails_at_start integer;

-- Chunks held right now (by workers of the previous release, or by callers of
-- claim_next_chunk_job) get a number, and so does the attempt that holds
-- each, so their finish closes the right row. Who holds them is not known,
-- so complete_chunk_job may still end them.
UPDATE chunked_sync_jobs
   SET claim_seq = nextval('syncctl_claim_numbers')
 WHERE status = 'processing';
UPDATE chunk_attempts a
   SET claim_seq = c.claim_seq
  FROM chunked_sync_jobs c
 WHERE a.chunk_id = c.id AND c.status = 'processing'
   AND a.outcome = 'running' AND a.attempt = c.attempts;

-- Claim the next chunk (the order is 0007's): the chunk gets a new claim
-- number, and its attempt row the next number of the chunk's attempts, so
-- a retry or a release never shows two rows with one number.
CREATE OR REPLACE FUNCTION syncctl_claim_chunk(p_worker_id text, p_lease interval)
RETURNS SETOF chunked_sync_jobs
LANGUAGE plpgsql AS $$
DECLARE
    v_job record;
    v_chunk chunked_sync_jobs;
BEGIN
    IF p_worker_id IS NULL OR p_lease IS NULL THEN
        RAISE EXCEPTION 'a claim needs a worker id and a lease' USING ERRCODE = '22023';
    END IF;
    IF pg_current_xact_id_if_assigned() IS NULL THEN
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
    -- Each pass claims, or repairs one job whose claimable_at was stale; the
    -- bound only guards against looping forever on a bug.
    FOR i IN 1..100 LOOP
        -- Lock the job, not the chunk: SKIP LOCKED on chunks would skip a
        -- locked chunk to its next sibling and break the order within a job.
        SELECT q.id, greatest(coalesce(q.parallel, 1), 1) AS parallel INTO v_job
          FROM sync_queue q
         WHERE q.claimable_at <= now()
         ORDER BY q.priority DESC NULLS LAST, q.chunks_in_flight, q.served_at ASC NULLS FIRST,
                  q.created_at, q.id
         LIMIT 1
           FOR NO KEY UPDATE SKIP LOCKED;
        IF NOT FOUND THEN
            RETURN;
        END IF;

        UPDATE chunked_sync_jobs c
           SET status = 'processing',
               worker_id = p_worker_id,
               attempts = c.attempts + 1,
               claim_seq = nextval('syncctl_claim_numbers'),
               claimed_via = 'syncctl',
               started_at = now(),
               completed_at = NULL,
               heartbeat_at = now(),
               lease_expires_at = now() + p_lease,
               not_before = NULL,
               updated_at = now()
         WHERE c.id = (SELECT o.id
                         FROM (SELECT h.id, h.chunk_index, h.status, h.attempts, h.max_attempts,
                                      h.not_before
                                 FROM chunked_sync_jobs h
                                WHERE h.parent_sync_job_id = v_job.id
                                  AND h.status IN ('pending', 'processing')
                                ORDER BY h.chunk_index
                                LIMIT v_job.parallel) AS o
                        WHERE o.status = 'pending'
                          AND o.attempts < o.max_attempts
                          AND (o.not_before IS NULL OR o.not_before <= now())
                        ORDER BY o.chunk_index
                        LIMIT 1)
           AND c.status = 'pending'
           AND (SELECT count(*) FROM chunked_sync_jobs p
                 WHERE p.parent_sync_job_id = v_job.id AND p.status = 'processing')
               < v_job.parallel
        RETURNING c.* INTO v_chunk;

        IF FOUND THEN
            UPDATE sync_queue
               SET served_at = now(), started_at = coalesce(started_at, now())
             WHERE id = v_job.id;
            INSERT INTO chunk_attempts (chunk_id, attempt, worker_id, claim_seq, emails_at_start)
            SELECT v_chunk.id, coalesce(max(a.attempt), 0) + 1, p_worker_id, v_chunk.claim_seq,
                   v_chunk.emails_synced
              FROM chunk_attempts a
             WHERE a.chunk_id = v_chunk.id;
            PERFORM syncctl_refresh_job(v_job.id);
            RETURN NEXT v_chunk;
            RETURN;
        END IF;

        PERFORM syncctl_refresh_job(v_job.id);
    END LOOP;
END $$;

-- End the attempt holding a chunk. The caller has locked the job, then the
-- chunk, and checked that the attempt still holds it.
CREATE OR REPLACE FUNCTION syncctl_end_attempt(
    p_chunk chunked_sync_jobs,
    p_outcome text,
    p_error text,
    p_processing_time_ms integer,
    p_retry_base interval
) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_status text;
    v_attempt_outcome text;
BEGIN
    IF p_outcome IS NULL OR p_outcome NOT IN ('completed', 'error', 'permanent', 'released') THEN
        RAISE EXCEPTION 'unknown outcome %', p_outcome USING ERRCODE = '22023';
    END IF;
    v_status := CASE
        WHEN p_outcome = 'completed' THEN 'completed'
        WHEN p_outcome = 'permanent' THEN 'failed'
        WHEN p_outcome = 'released' THEN 'pending'
        WHEN p_chunk.attempts >= p_chunk.max_attempts THEN 'failed'
        ELSE 'pending' END;
    v_attempt_outcome := CASE
        WHEN p_outcome = 'completed' THEN 'completed'
        WHEN p_outcome = 'released' THEN 'released'
        WHEN v_status = 'failed' THEN 'failed'
        ELSE 'retrying' END;

    UPDATE chunked_sync_jobs c
       SET status = v_status,
           -- A released attempt was not used; its chunk_attempts row keeps it.
           attempts = CASE WHEN p_outcome = 'released' THEN c.attempts - 1 ELSE c.attempts END,
           worker_id = CASE WHEN v_status = 'pending' THEN NULL ELSE c.worker_id END,
           lease_expires_at = NULL,
           completed_at = CASE WHEN v_status IN ('completed', 'failed') THEN now() END,
           processing_time_ms = coalesce(p_processing_time_ms,
               (extract(epoch FROM clock_timestamp() - c.started_at) * 1000)::integer),
           last_error = CASE WHEN p_outcome = 'completed' THEN NULL
                             WHEN p_outcome = 'released' THEN c.last_error
                             ELSE p_error END,
           -- Exponential backoff with jitter: base * 2^(attempt-1) * [0.5, 1),
           -- capped at ten minutes (the exponent too, so it cannot overflow).
           not_before = CASE WHEN v_attempt_outcome = 'retrying'
               THEN now() + least(interval '10 minutes',
                                  p_retry_base * power(2, least(greatest(c.attempts - 1, 0), 20)))
                          * (0.5 + random() / 2)
               END,
           updated_at = now()
     WHERE c.id = p_chunk.id;

    UPDATE chunk_attempts a
       SET finished_at = clock_timestamp(),
           outcome = v_attempt_outcome,
           error = p_error,
           duration_ms = (extract(epoch FROM clock_timestamp() - a.started_at) * 1000)::integer,
           emails_synced = p_chunk.emails_synced - coalesce(a.emails_at_start, 0)
     WHERE a.chunk_id = p_chunk.id AND a.claim_seq = p_chunk.claim_seq
       AND a.outcome = 'running';

    PERFORM syncctl_refresh_job(p_chunk.parent_sync_job_id);
    PERFORM pg_notify('syncctl_chunks', p_chunk.parent_sync_job_id::text);
    RETURN v_status;
END $$;

-- End a claim (completed, error, permanent or released): the chunk's new
-- status, or NULL when the chunk no longer carries this claim's number.
CREATE OR REPLACE FUNCTION syncctl_finish_claim(
    p_chunk_id uuid,
    p_claim_seq bigint,
    p_outcome text,
    p_error text DEFAULT NULL,
    p_processing_time_ms integer DEFAULT NULL,
    p_retry_base interval DEFAULT interval '5 seconds'
) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_job_id uuid;
    v_chunk chunked_sync_jobs;
BEGIN
    IF pg_current_xact_id_if_assigned() IS NULL THEN
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
    SELECT c.parent_sync_job_id INTO v_job_id FROM chunked_sync_jobs c WHERE c.id = p_chunk_id;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    PERFORM 1 FROM sync_queue q WHERE q.id = v_job_id FOR NO KEY UPDATE;
    SELECT * INTO v_chunk FROM chunked_sync_jobs c
     WHERE c.id = p_chunk_id AND c.status = 'processing' AND c.claim_seq = p_claim_seq
       FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    RETURN syncctl_end_attempt(v_chunk, p_outcome, p_error, p_processing_time_ms, p_retry_base);
END $$;

-- The previous release's finish, kept for its workers until they restart
-- (fenced by worker id and attempt, as they were), and for
-- complete_chunk_job (p_worker_id NULL), which may only end a claim made
-- through claim_next_chunk_job: never one a syncctl worker holds.
CREATE OR REPLACE FUNCTION syncctl_finish_chunk(
    p_chunk_id uuid,
    p_worker_id text,
    p_attempt integer,
    p_outcome text,
    p_error text DEFAULT NULL,
    p_processing_time_ms integer DEFAULT NULL,
    p_retry_base interval DEFAULT interval '5 seconds'
) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_claim_seq bigint;
BEGIN
    -- The claim these arguments name; syncctl_finish_claim then locks the job
    -- and the chunk and checks the claim still holds it.
    SELECT c.claim_seq INTO v_claim_seq FROM chunked_sync_jobs c
     WHERE c.id = p_chunk_id
       AND c.status = 'processing'
       AND CASE WHEN p_worker_id IS NULL THEN c.claimed_via IS DISTINCT FROM 'syncctl'
                ELSE c.worker_id = p_worker_id AND c.attempts = p_attempt END;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    RETURN syncctl_finish_claim(p_chunk_id, v_claim_seq, p_outcome, p_error,
                                p_processing_time_ms, p_retry_base);
END $$;

-- The original claim: a syncctl claim, marked as made through this function
-- so that complete_chunk_job may end it.
CREATE OR REPLACE FUNCTION claim_next_chunk_job(p_worker_id text) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_chunk chunked_sync_jobs;
BEGIN
    SELECT * INTO v_chunk
      FROM syncctl_claim_chunk(coalesce(nullif(p_worker_id, ''), 'claim_next_chunk_job'),
                               interval '10 minutes');
    IF NOT FOUND THEN
        RETURN jsonb_build_object('success', false, 'message', 'no chunk available');
    END IF;
    UPDATE chunked_sync_jobs SET claimed_via = 'claim_next_chunk_job' WHERE id = v_chunk.id;
    RETURN jsonb_build_object(
        'success', true,
        'chunk_id', v_chunk.id,
        'parent_sync_job_id', v_chunk.parent_sync_job_id,
        'chunk_index', v_chunk.chunk_index,
        'total_chunks', v_chunk.total_chunks,
        'start_offset', v_chunk.start_offset,
        'end_offset', v_chunk.end_offset,
        'store_id', v_chunk.store_id,
        'attempt', v_chunk.attempts);
END $$;

-- 'failed' from the original callers is a transient failure: the chunk is
-- retried with backoff until max_attempts. A chunk a syncctl worker holds
-- (the caller's claim was reaped and the chunk claimed again) is refused.
CREATE OR REPLACE FUNCTION complete_chunk_job(
    p_chunk_job_id uuid,
    p_status text DEFAULT 'completed',
    p_processing_time_ms integer DEFAULT NULL
) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_status text;
BEGIN
    IF p_status IS NULL OR p_status NOT IN ('completed', 'failed') THEN
        RETURN jsonb_build_object('success', false,
                                  'error', 'p_status must be completed or failed');
    END IF;
    v_status := syncctl_finish_chunk(
        p_chunk_job_id, NULL, NULL,
        CASE WHEN p_status = 'completed' THEN 'completed' ELSE 'error' END,
        CASE WHEN p_status = 'failed' THEN 'reported failed by complete_chunk_job' END,
        p_processing_time_ms);
    IF v_status IS NOT NULL THEN
        RETURN jsonb_build_object('success', true, 'chunk_id', p_chunk_job_id,
                                  'status', v_status);
    END IF;
    IF EXISTS (SELECT 1 FROM chunked_sync_jobs c
                WHERE c.id = p_chunk_job_id AND c.status = 'processing'
                  AND c.claimed_via = 'syncctl') THEN
        RETURN jsonb_build_object('success', false,
                                  'error', 'chunk is held by a syncctl worker now');
    END IF;
    RETURN jsonb_build_object('success', false, 'error', 'chunk not found or not processing');
END $$;

-- Expire lost leases (0002's rules). A chunk row locked by another session
-- (one that vanished mid-transaction holds its lock until the server notices)
-- is skipped for the next pass rather than waited on, and the attempt closed
-- is the one of the chunk's current claim, with the messages it added.
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
                                                          c.started_at, c.worker_id)
                                              ELSE format('lease expired at %s: worker %s stopped heartbeating',
                                                          c.lease_expires_at, c.worker_id) END)
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
               SET finished_at = now(), outcome = 'reaped',
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

-- Every statement above is meant to be an index look-up (see 0005).
ALTER FUNCTION syncctl_claim_chunk(text, interval) SET enable_seqscan = off;
ALTER FUNCTION syncctl_finish_claim(uuid, bigint, text, text, integer, interval)
    SET enable_seqscan = off;
ALTER FUNCTION syncctl_finish_chunk(uuid, text, integer, text, text, integer, interval)
    SET enable_seqscan = off;

-- Servers that answer calls by name cache function signatures.
NOTIFY pgrst, 'reload schema';
