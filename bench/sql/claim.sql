-- Statements of the claim-cost benchmark (2), loaded by name as sql/queries are.

-- seed_history_stores --
INSERT INTO stores (name, email)
SELECT 'history ' || i, 'history' || i || '@bench.test'
  FROM generate_series(1, %(stores)s) AS i;

-- seed_history --
-- Finished jobs of ten completed chunks each, every chunk with its attempt, as
-- months of syncing leave them; older than any pending job.
WITH store_ids AS (
    SELECT array_agg(id ORDER BY id) AS ids FROM stores WHERE email LIKE 'history%%'
),
jobs AS (
    INSERT INTO sync_queue (store_id, status, priority, created_at, updated_at, started_at,
                            completed_at, estimated_emails, sync_to)
    SELECT s.ids[1 + mod(i, cardinality(s.ids))], 'completed', 1, t.at, t.at, t.at,
           t.at + interval '10 minutes', 10000, t.at
      FROM store_ids AS s,
           generate_series(%(first)s::integer, %(last)s::integer) AS i,
           LATERAL (SELECT now() - interval '1 day' - i * interval '1 minute' AS at) AS t
    RETURNING id, store_id, created_at
),
chunks AS (
    INSERT INTO chunked_sync_jobs (parent_sync_job_id, store_id, chunk_index, total_chunks,
                                   start_offset, end_offset, estimated_emails, status,
                                   attempts, worker_id, started_at, completed_at,
                                   processing_time_ms, emails_synced, created_at, updated_at)
    SELECT j.id, j.store_id, k, 10, (k - 1) * 1000, k * 1000 - 1, 1000, 'completed',
           1, 'history', j.created_at + k * interval '30 seconds',
           j.created_at + k * interval '30 seconds' + interval '25 seconds',
           25000, 1000, j.created_at, j.created_at
      FROM jobs AS j, generate_series(1, 10) AS k
    RETURNING id, started_at, completed_at
)
INSERT INTO chunk_attempts (chunk_id, attempt, worker_id, started_at, finished_at, outcome,
                            duration_ms, emails_synced)
SELECT id, 1, 'history', started_at, completed_at, 'completed', 25000, 1000 FROM chunks;

-- chunk_rows --
SELECT count(*) AS chunks, count(*) FILTER (WHERE status = 'pending') AS pending,
       count(DISTINCT parent_sync_job_id) AS jobs
  FROM chunked_sync_jobs;

-- explain_claims --
-- Show the plan of every statement the claim runs, with its timing and buffers.
LOAD 'auto_explain';
SET auto_explain.log_min_duration = 0;
SET auto_explain.log_analyze = on;
SET auto_explain.log_buffers = on;
SET auto_explain.log_timing = on;
SET auto_explain.log_nested_statements = on;
SET auto_explain.log_level = 'notice';

-- explain_claim_call --
-- Where auto_explain is missing: the claim call's own plan (its statements are inside it).
EXPLAIN (ANALYZE, BUFFERS) SELECT * FROM syncctl_claim_chunk('bench-explain', %(lease)s);

-- reset_session --
RESET ALL;

-- run_chunks_in_parallel --
-- Jobs as `syncctl create` makes them: up to four chunks of a job at once.
WITH changed AS (
    UPDATE sync_queue SET parallel = %(parallel)s
     WHERE status IN ('pending', 'processing')
    RETURNING id
)
SELECT count(syncctl_refresh_job(id)) AS jobs FROM changed;
