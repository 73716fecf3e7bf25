-- Time-window chunks, up to four chunks of a job at once, the ordered
-- watermark, and fair claims across jobs.
--
-- Jobs that exist when this runs were planned for one chunk at a time
-- (offset chunks, the sequential rule): they keep `parallel` 1 and their
-- offsets. Jobs created from now on default to 4 chunks at once, the
-- number of requests Graph serves a mailbox at a time.

-- A chunk owns [window_start, window_end) on receivedDateTime; NULL window_end:
-- an offset chunk of an older job (or of the original create_sync_chunks).
-- A NULL window_start on a window chunk means "from the mailbox's first message".
ALTER TABLE chunked_sync_jobs
    ADD COLUMN IF NOT EXISTS window_start timestamptz,
    ADD COLUMN IF NOT EXISTS window_end timestamptz;

-- Added with 1 so rows already there keep the sequential rule, then defaulted to 4.
ALTER TABLE sync_queue
    ADD COLUMN IF NOT EXISTS parallel integer NOT NULL DEFAULT 1,
    -- Every message received before this is stored: the end of the longest
    -- run of completed chunks from the first. Only moves forward.
    ADD COLUMN IF NOT EXISTS synced_through timestamptz,
    -- Chunks of the job processing now, and when a chunk of it was last
    -- claimed: what fair claims order equal-priority jobs by.
    ADD COLUMN IF NOT EXISTS chunks_in_flight integer NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS served_at timestamptz;
ALTER TABLE sync_queue ALTER COLUMN parallel SET DEFAULT 4;
ALTER TABLE sync_queue ADD CONSTRAINT sync_queue_parallel_valid CHECK (parallel BETWEEN 1 AND 4);

UPDATE sync_queue q
   SET chunks_in_flight = (SELECT count(*) FROM chunked_sync_jobs c
                            WHERE c.parent_sync_job_id = q.id AND c.status = 'processing')
 WHERE q.status IN ('pending', 'processing');

-- The claim's walk: among claimable jobs, higher priority, then fewer chunks
-- in flight, then served longest ago (never served first), then the oldest.
-- Finished jobs are not in it, so history does not slow the claim down.
DROP INDEX IF EXISTS sync_queue_claim_idx;
CREATE INDEX IF NOT EXISTS sync_queue_claim_order_idx
    ON sync_queue (priority DESC NULLS LAST, chunks_in_flight, served_at ASC NULLS FIRST,
                   created_at, id)
    WHERE claimable_at IS NOT NULL;

-- The watermark's look-up: a job's first chunk not completed. History holds
-- few such rows (failed and cancelled chunks), so the index stays small.
CREATE INDEX IF NOT EXISTS chunked_sync_jobs_unfinished_idx
    ON chunked_sync_jobs (parent_sync_job_id, chunk_index)
    WHERE status <> 'completed';

-- Recompute a job's derived state after any change to its chunks: how many
-- of its chunks are in flight, when one may next be claimed, the watermark,
-- and the roll-up of its status: `completed` only when every chunk completed,
-- else `failed` if one failed, else `cancelled` (a job cancelled, then retried
-- for one chunk, is not complete). The caller holds the lock on the job.
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

-- Claim the next chunk: from the highest-priority claimable job, the one
-- with the fewest chunks in flight, then the one served longest ago, then
-- the oldest; of that job, the lowest chunk that may run. Never waits on
-- another worker. Commits without waiting for the disk, as 0005 explains.
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
        -- Only jobs with a claimable chunk are in sync_queue_claim_order_idx,
        -- so neither history nor the chunks waiting in each job are read here.
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

        -- Re-checked here rather than trusted from claimable_at: hand-run SQL
        -- may have changed the job's chunks since.
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
            INSERT INTO chunk_attempts (chunk_id, attempt, worker_id)
            VALUES (v_chunk.id, v_chunk.attempts, p_worker_id);
            -- Its chunks in flight, its status, and whether another chunk may run.
            PERFORM syncctl_refresh_job(v_job.id);
            RETURN NEXT v_chunk;
            RETURN;
        END IF;

        PERFORM syncctl_refresh_job(v_job.id);
    END LOOP;
END $$;

-- The original frontend's chunk planner, unchanged but for one thing: the
-- offset chunks it makes run one at a time, as the original system assumed.
CREATE OR REPLACE FUNCTION create_sync_chunks(
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
           -- Offsets shift under a chunk running beside another: one at a time.
           parallel = 1,
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

-- Every statement above is meant to be an index look-up, whatever the
-- statistics of a young table say (see 0005).
ALTER FUNCTION syncctl_claim_chunk(text, interval) SET enable_seqscan = off;
ALTER FUNCTION syncctl_refresh_job(uuid) SET enable_seqscan = off;

-- The state derived by syncctl_refresh_job, for the jobs active now.
SELECT syncctl_refresh_job(q.id)
  FROM sync_queue q
 WHERE q.status IN ('pending', 'processing');
