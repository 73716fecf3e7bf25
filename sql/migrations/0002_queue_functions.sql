-- The chunk lifecycle, in the database so that syncctl workers and callers
-- of the original system (claim_next_chunk_job, complete_chunk_job through
-- PostgREST) share one implementation of every rule.
--
-- Lock order, everywhere: the parent job (sync_queue row) first, then its
-- chunks. Keeping to it is what makes concurrent claims, completions, reaps
-- and operator commands deadlock-free.

-- Recompute a job's derived state after any change to its chunks: when its
-- head chunk may be claimed, and the roll-up of its status. The caller holds
-- the lock on the job.
CREATE OR REPLACE FUNCTION syncctl_refresh_job(p_job_id uuid) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_busy boolean;
    v_head record;
    v_has_head boolean;
BEGIN
    SELECT EXISTS (
        SELECT 1 FROM chunked_sync_jobs c
         WHERE c.parent_sync_job_id = p_job_id AND c.status = 'processing'
    ) INTO v_busy;

    LOOP
        -- Sequential rule: only the lowest chunk still pending or processing may run.
        SELECT c.id, c.status, c.not_before, c.attempts, c.max_attempts INTO v_head
          FROM chunked_sync_jobs c
         WHERE c.parent_sync_job_id = p_job_id AND c.status IN ('pending', 'processing')
         ORDER BY c.chunk_index
         LIMIT 1;
        v_has_head := FOUND;
        EXIT WHEN NOT v_has_head OR v_head.status <> 'pending'
                  OR v_head.attempts < v_head.max_attempts;
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
         WHERE c.id = v_head.id;
    END LOOP;

    IF NOT v_has_head THEN
        -- Every chunk is terminal: the job is done, in this same transaction.
        UPDATE sync_queue q
           SET status = CASE
                   WHEN q.status = 'cancelled' THEN 'cancelled'
                   WHEN EXISTS (SELECT 1 FROM chunked_sync_jobs c
                                 WHERE c.parent_sync_job_id = q.id AND c.status = 'failed')
                       THEN 'failed'
                   ELSE 'completed' END,
               claimable_at = NULL,
               completed_at = coalesce(q.completed_at, now()),
               updated_at = now()
         WHERE q.id = p_job_id;
        RETURN;
    END IF;

    -- A cancelled job stays cancelled whatever was done to its chunks by hand:
    -- reviving it could clash with its store's next job (one active per store).
    UPDATE sync_queue q
       SET claimable_at = CASE WHEN q.status = 'cancelled' OR v_busy OR v_head.status <> 'pending'
                               THEN NULL
                               ELSE coalesce(v_head.not_before, now()) END,
           status = CASE WHEN q.status = 'cancelled' THEN 'cancelled'
                         WHEN q.status = 'pending' AND NOT v_busy THEN 'pending'
                         ELSE 'processing' END,
           completed_at = CASE WHEN q.status = 'cancelled' THEN q.completed_at END,
           updated_at = now()
     WHERE q.id = p_job_id;
END $$;

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

-- Whether a processing chunk is to be taken back: its lease ran out (one with
-- no lease, left by hand-run SQL, gets five minutes from its start), or it
-- started before the operator's cutoff.
CREATE OR REPLACE FUNCTION syncctl_chunk_expired(
    p_lease_expires_at timestamptz,
    p_started_at timestamptz,
    p_started_before timestamptz
) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT coalesce(p_lease_expires_at, p_started_at + interval '5 minutes', '-infinity') < now()
           OR coalesce(p_started_at < p_started_before, false)
$$;

-- Expire lost leases: a chunk whose worker stopped heartbeating goes back to
-- pending when attempts are left, else to failed with the reason. With
-- p_started_before, chunks processing since before then are taken back too
-- (`syncctl reset-stuck`), whatever their lease says. Also repairs jobs whose
-- chunks were changed by hand-run SQL. Jobs locked by a worker right now are
-- left for the next pass.
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
               FOR NO KEY UPDATE
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
                   duration_ms = (extract(epoch FROM now() - a.started_at) * 1000)::integer
             WHERE a.chunk_id = v_chunk.id AND a.attempt = v_chunk.attempts
               AND a.outcome = 'running';
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

-- How many messages a chunk holds when the operator does not say: about 50
-- chunks a job, in whole Graph pages of 1000, between 1000 and 50000.
CREATE OR REPLACE FUNCTION syncctl_chunk_size(p_email_count integer) RETURNS integer
LANGUAGE sql IMMUTABLE AS $$
    SELECT least(50000, greatest(1000, ceil(p_email_count / 50.0 / 1000) * 1000))::integer
$$;

-- The seed's functions, with their names, parameter names and call shapes
-- kept. Older deployments also had overloads that made calls by name
-- ambiguous; every overload goes, whatever its signature, so exactly one of
-- each remains.
DO $$
DECLARE
    v_function regprocedure;
BEGIN
    FOR v_function IN
        SELECT p.oid::regprocedure FROM pg_proc p
         WHERE p.proname IN ('create_sync_chunks', 'claim_next_chunk_job', 'complete_chunk_job')
           AND p.pronamespace = current_schema()::regnamespace
    LOOP
        EXECUTE format('DROP FUNCTION %s', v_function);
    END LOOP;
END $$;

-- Plan and insert the chunks of an existing parent job. The chunk size is
-- the parent's metadata.chunk_size when set, else syncctl_chunk_size().
CREATE FUNCTION create_sync_chunks(
    p_parent_sync_job_id uuid,
    p_sync_type text DEFAULT 'manual',
    p_estimated_email_count integer DEFAULT NULL,
    p_sync_from text DEFAULT NULL,
    p_sync_to text DEFAULT NULL
) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_job sync_queue;
    v_count integer;
    v_size integer;
    v_total integer;
BEGIN
    SELECT * INTO v_job FROM sync_queue q WHERE q.id = p_parent_sync_job_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('success', false,
                                  'error', 'parent sync job not found');
    END IF;
    IF v_job.status NOT IN ('pending', 'processing') THEN
        RETURN jsonb_build_object('success', false,
                                  'error', format('parent sync job is %s', v_job.status));
    END IF;
    IF EXISTS (SELECT 1 FROM chunked_sync_jobs c WHERE c.parent_sync_job_id = v_job.id) THEN
        RETURN jsonb_build_object('success', false,
                                  'error', 'chunks already exist for this sync job');
    END IF;

    -- 100 when nothing is known: the original frontend's fallback count.
    v_count := greatest(0, coalesce(p_estimated_email_count, v_job.estimated_emails, 100));
    -- Metadata written by other callers may hold anything; only a positive
    -- whole number is taken as a chunk size.
    v_size := coalesce(
        nullif(substring(v_job.metadata ->> 'chunk_size' FROM '^\s*([0-9]{1,9})\s*$')::integer, 0),
        syncctl_chunk_size(v_count));
    v_total := ceil(v_count::numeric / v_size)::integer;

    -- The window is frozen at creation: mail arriving later does not shift
    -- the offsets of a running job. Callers pass '' for "not set".
    UPDATE sync_queue q
       SET sync_type = coalesce(p_sync_type, q.sync_type),
           sync_from = coalesce(nullif(p_sync_from, '')::timestamptz, q.sync_from),
           sync_to = coalesce(nullif(p_sync_to, '')::timestamptz, q.sync_to, q.created_at, now()),
           estimated_emails = v_count,
           metadata = coalesce(q.metadata, '{}') || jsonb_build_object('chunk_size', v_size),
           updated_at = now()
     WHERE q.id = v_job.id;

    INSERT INTO chunked_sync_jobs (parent_sync_job_id, business_id, store_id, chunk_index,
                                   total_chunks, start_offset, end_offset, estimated_emails,
                                   max_attempts)
    SELECT v_job.id, v_job.business_id, v_job.store_id, i, v_total,
           (i - 1) * v_size, least(i * v_size, v_count) - 1,
           least(i * v_size, v_count) - (i - 1) * v_size,
           v_job.max_attempts
      FROM generate_series(1, v_total) AS i;

    -- With no chunks (an empty window) this completes the job at once.
    PERFORM syncctl_refresh_job(v_job.id);
    PERFORM pg_notify('syncctl_chunks', v_job.id::text);
    RETURN jsonb_build_object(
        'success', true,
        'parent_sync_job_id', v_job.id,
        'total_chunks', v_total,
        'chunk_size', v_size,
        'estimated_email_count', v_count);
END $$;

-- For callers of the original system. They do not heartbeat, so the lease is
-- long; a chunk they lose is still reaped.
CREATE FUNCTION claim_next_chunk_job(p_worker_id text) RETURNS jsonb
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
-- retried with backoff until max_attempts, as the original documentation
-- promises.
CREATE FUNCTION complete_chunk_job(
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
    IF v_status IS NULL THEN
        RETURN jsonb_build_object('success', false,
                                  'error', 'chunk not found or not processing');
    END IF;
    RETURN jsonb_build_object('success', true, 'chunk_id', p_chunk_job_id,
                              'status', v_status);
END $$;

-- Servers that answer calls by name cache function signatures; ask them to
-- reload, so the dropped overloads are forgotten. Nobody listening: no effect.
NOTIFY pgrst, 'reload schema';
