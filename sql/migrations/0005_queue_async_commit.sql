-- Queue transitions commit without waiting for their WAL to reach disk.
--
-- A claim or a finish is a few row changes whose loss in a server crash the
-- queue already recovers from: a lost claim leaves the chunk pending (its
-- worker lost its connection in the same crash), a lost finish leaves it
-- processing until its lease is reaped and the chunk is run again from its
-- checkpoint, and pages and checkpoints are written by transactions that
-- still wait for the disk (and so flush every queue change logged before
-- them). Not waiting for the disk on every claim and finish is what lets a
-- queue of short chunks keep more than a few hundred transitions a second.
--
-- Only a transaction that had written nothing before the call is switched:
-- a caller that wrote its own rows first, in the same transaction, keeps
-- waiting for the disk.

-- Claim the next chunk: the head of the highest-priority, oldest claimable
-- job. Never waits on another worker.
CREATE OR REPLACE FUNCTION syncctl_claim_chunk(p_worker_id text, p_lease interval)
RETURNS SETOF chunked_sync_jobs
LANGUAGE plpgsql AS $$
DECLARE
    v_job_id uuid;
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
        -- locked head to its next sibling and break the sequential rule.
        -- Only jobs with a claimable head are in sync_queue_claim_idx, so
        -- neither history nor the chunks behind each head are read here.
        SELECT q.id INTO v_job_id
          FROM sync_queue q
         WHERE q.claimable_at <= now()
         ORDER BY q.priority DESC NULLS LAST, q.created_at, q.id
         LIMIT 1
           FOR NO KEY UPDATE SKIP LOCKED;
        IF NOT FOUND THEN
            RETURN;
        END IF;

        -- The head is re-checked here rather than trusted from claimable_at:
        -- hand-run SQL may have changed the job's chunks since.
        UPDATE chunked_sync_jobs c
           SET status = 'processing',
               worker_id = p_worker_id,
               attempts = c.attempts + 1,
               started_at = now(),
               completed_at = NULL,
               heartbeat_at = now(),
               lease_expires_at = now() + p_lease,
               not_before = NULL,
               updated_at = now()
         WHERE c.id = (SELECT h.id FROM chunked_sync_jobs h
                        WHERE h.parent_sync_job_id = v_job_id
                          AND h.status IN ('pending', 'processing')
                        ORDER BY h.chunk_index
                        LIMIT 1)
           AND c.status = 'pending'
           AND c.attempts < c.max_attempts
           AND (c.not_before IS NULL OR c.not_before <= now())
           AND NOT EXISTS (SELECT 1 FROM chunked_sync_jobs p
                            WHERE p.parent_sync_job_id = v_job_id AND p.status = 'processing')
        RETURNING c.* INTO v_chunk;

        IF FOUND THEN
            UPDATE sync_queue
               SET status = 'processing', claimable_at = NULL,
                   started_at = coalesce(started_at, now()), updated_at = now()
             WHERE id = v_job_id;
            INSERT INTO chunk_attempts (chunk_id, attempt, worker_id)
            VALUES (v_chunk.id, v_chunk.attempts, p_worker_id);
            RETURN NEXT v_chunk;
            RETURN;
        END IF;

        PERFORM syncctl_refresh_job(v_job_id);
    END LOOP;
END $$;

-- End an attempt. p_outcome is one of:
--   completed  the chunk is done;
--   error      a transient failure: retry with backoff, or fail once
--              max_attempts is reached;
--   permanent  fail now (mailbox not found, credentials refused);
--   released   handed back on shutdown: pending again, attempt not counted.
-- Fenced: applies only while the chunk is processing under this worker and
-- attempt (p_worker_id NULL skips the fence, for the seed's complete_chunk_job).
-- Returns the chunk's new status, or NULL when this worker no longer holds it.
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
    v_job_id uuid;
    v_chunk chunked_sync_jobs;
    v_status text;
    v_attempt_outcome text;
BEGIN
    IF p_outcome IS NULL OR p_outcome NOT IN ('completed', 'error', 'permanent', 'released') THEN
        RAISE EXCEPTION 'unknown outcome %', p_outcome USING ERRCODE = '22023';
    END IF;
    IF pg_current_xact_id_if_assigned() IS NULL THEN
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;

    SELECT c.parent_sync_job_id INTO v_job_id FROM chunked_sync_jobs c WHERE c.id = p_chunk_id;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    PERFORM 1 FROM sync_queue q WHERE q.id = v_job_id FOR NO KEY UPDATE;

    SELECT * INTO v_chunk FROM chunked_sync_jobs c
     WHERE c.id = p_chunk_id
       AND c.status = 'processing'
       AND (p_worker_id IS NULL OR (c.worker_id = p_worker_id AND c.attempts = p_attempt))
       FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;

    v_status := CASE
        WHEN p_outcome = 'completed' THEN 'completed'
        WHEN p_outcome = 'permanent' THEN 'failed'
        WHEN p_outcome = 'released' THEN 'pending'
        WHEN v_chunk.attempts >= v_chunk.max_attempts THEN 'failed'
        ELSE 'pending' END;
    v_attempt_outcome := CASE
        WHEN p_outcome = 'completed' THEN 'completed'
        WHEN p_outcome = 'released' THEN 'released'
        WHEN v_status = 'failed' THEN 'failed'
        ELSE 'retrying' END;

    UPDATE chunked_sync_jobs c
       SET status = v_status,
           -- A released attempt was not used; the chunk_attempts row keeps it.
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
     WHERE c.id = p_chunk_id;

    UPDATE chunk_attempts a
       SET finished_at = clock_timestamp(),
           outcome = v_attempt_outcome,
           error = p_error,
           duration_ms = (extract(epoch FROM clock_timestamp() - a.started_at) * 1000)::integer,
           emails_synced = v_chunk.emails_synced
     WHERE a.chunk_id = p_chunk_id AND a.attempt = v_chunk.attempts AND a.outcome = 'running';

    PERFORM syncctl_refresh_job(v_job_id);
    PERFORM pg_notify('syncctl_chunks', v_job_id::text);
    RETURN v_status;
END $$;

-- Sessions cache the plans of these functions' statements. A plan made while a
-- table was nearly empty (a new database, before autovacuum first analyses
-- it) scans that table, and would keep scanning it as it grows for as long
-- as the worker's connection lives. Every statement here is meant to be an
-- index lookup, whatever the statistics say.
ALTER FUNCTION syncctl_claim_chunk(text, interval) SET enable_seqscan = off;
ALTER FUNCTION syncctl_finish_chunk(uuid, text, integer, text, text, integer, interval)
    SET enable_seqscan = off;
