-- report_jobs --
-- Jobs with their progress: the ones named in job_ids, the active ones when active is true,
-- and the `recent` most recent others. Stuck chunks (processing since before now - stuck_after,
-- or past their lease, as report_stuck_chunks) and retried attempts (cut short by an error or a
-- lost lease with attempts left) are what `status --watch` highlights; sampled_at is the
-- database's clock, which rates are measured against. last_error: the job's own, else (the
-- roll-up in the queue functions leaves the job's empty) its last failed chunk's.
WITH shown AS (
    SELECT id FROM sync_queue
     WHERE %(active)s AND status IN ('pending', 'processing')
    UNION
    (SELECT id FROM sync_queue
      ORDER BY created_at DESC
      LIMIT %(recent)s)
    UNION
    SELECT id FROM sync_queue WHERE id = ANY(%(job_ids)s::uuid[])
)
SELECT q.id AS job_id, s.name AS store_name, s.email AS store_email, q.sync_type, q.status,
       q.priority, q.parallel, p.chunks_done, p.chunks_failed, p.chunks_processing, p.total_chunks,
       p.emails_synced, q.estimated_emails, q.synced_through, r.retried, p.stuck_chunks,
       q.created_at, q.started_at, q.completed_at,
       coalesce(nullif(q.last_error, ''), p.failed_chunk_error) AS last_error,
       now() AS sampled_at
  FROM shown
  JOIN sync_queue q ON q.id = shown.id
  LEFT JOIN stores s ON s.id = q.store_id
 CROSS JOIN LATERAL (
       SELECT count(*) FILTER (WHERE c.status = 'completed') AS chunks_done,
              count(*) FILTER (WHERE c.status = 'failed') AS chunks_failed,
              count(*) FILTER (WHERE c.status = 'processing') AS chunks_processing,
              count(*) AS total_chunks,
              coalesce(sum(c.emails_synced), 0) AS emails_synced,
              (array_agg(c.last_error ORDER BY c.completed_at DESC NULLS LAST,
                                               c.chunk_index DESC)
                   FILTER (WHERE c.status = 'failed' AND c.last_error <> ''))[1]
                  AS failed_chunk_error,
              coalesce(jsonb_agg(jsonb_build_object(
                           'chunk_index', c.chunk_index,
                           'worker_id', c.worker_id,
                           'started_at', c.started_at,
                           'lease_expires_at', c.lease_expires_at,
                           'reason', CASE WHEN c.lease_expires_at < now() THEN 'lease expired'
                                          ELSE 'processing too long' END)
                           ORDER BY c.chunk_index)
                       FILTER (WHERE c.status = 'processing'
                                 AND (c.started_at < now() - %(stuck_after)s
                                      OR c.lease_expires_at < now())),
                       '[]') AS stuck_chunks
         FROM chunked_sync_jobs c
        WHERE c.parent_sync_job_id = q.id) AS p
 CROSS JOIN LATERAL (
       SELECT count(*) AS retried
         FROM chunk_attempts a
         JOIN chunked_sync_jobs c ON c.id = a.chunk_id
        WHERE c.parent_sync_job_id = q.id
          AND (a.outcome = 'retrying'
               OR (a.outcome IN ('reaped', 'reset') AND a.attempt < c.max_attempts))
       ) AS r
 ORDER BY q.status IN ('pending', 'processing') DESC, q.created_at DESC, q.id;

-- report_job_page --
-- One page of jobs for `status`, newest first, matching the filters (each NULL: any): status
-- one of states, of store_id, created within since; total: how many match in all.
SELECT q.id AS job_id, count(*) OVER () AS total
  FROM sync_queue q
 WHERE (%(states)s::text[] IS NULL OR q.status = ANY(%(states)s::text[]))
   AND (%(store_id)s::uuid IS NULL OR q.store_id = %(store_id)s::uuid)
   AND (%(since)s::interval IS NULL OR q.created_at > now() - %(since)s::interval)
 ORDER BY q.created_at DESC NULLS LAST, q.id DESC
 LIMIT %(limit)s;

-- report_job_states --
-- Jobs by status, of store_id and created within since (each NULL: any).
SELECT q.status, count(*) AS jobs
  FROM sync_queue q
 WHERE (%(store_id)s::uuid IS NULL OR q.store_id = %(store_id)s::uuid)
   AND (%(since)s::interval IS NULL OR q.created_at > now() - %(since)s::interval)
 GROUP BY q.status;

-- report_jobs_needing_attention --
-- Jobs with stuck chunks (processing since before now - stuck_after, or past the lease, as
-- report_jobs counts them) and failed jobs, the stuck first (they hold workers now), each
-- newest first; of store_id and created within since (each NULL: any), at most limit.
-- total: how many in all, stuck_total: how many of them have stuck chunks. last_error as
-- report_jobs.
WITH stuck AS (
    SELECT c.parent_sync_job_id AS job_id, count(*) AS stuck_chunks
      FROM chunked_sync_jobs c
     WHERE c.status = 'processing'
       AND (c.started_at < now() - %(stuck_after)s OR c.lease_expires_at < now())
     GROUP BY c.parent_sync_job_id
)
SELECT q.id AS job_id, s.email AS store_email, q.sync_type, q.status,
       coalesce(k.stuck_chunks, 0) AS stuck_chunks, q.created_at, q.completed_at,
       coalesce(nullif(q.last_error, ''),
                (SELECT c.last_error FROM chunked_sync_jobs c
                  WHERE c.parent_sync_job_id = q.id AND c.status = 'failed'
                    AND c.last_error <> ''
                  ORDER BY c.completed_at DESC NULLS LAST, c.chunk_index DESC
                  LIMIT 1)) AS last_error,
       count(*) OVER () AS total,
       count(k.job_id) OVER () AS stuck_total
  FROM sync_queue q
  LEFT JOIN stuck k ON k.job_id = q.id
  LEFT JOIN stores s ON s.id = q.store_id
 WHERE (q.status = 'failed' OR k.job_id IS NOT NULL)
   AND (%(store_id)s::uuid IS NULL OR q.store_id = %(store_id)s::uuid)
   AND (%(since)s::interval IS NULL OR q.created_at > now() - %(since)s::interval)
 ORDER BY k.job_id IS NULL, q.created_at DESC NULLS LAST, q.id DESC
 LIMIT %(limit)s;

-- report_job --
-- One job with its store, window and watermark. last_error: the job's own, else its last
-- failed chunk's (the roll-up in the queue functions leaves the job's empty).
SELECT q.id AS job_id, q.store_id, s.name AS store_name, s.email AS store_email, q.sync_type,
       q.status, q.priority, q.sync_from, q.sync_to, q.synced_through, q.estimated_emails,
       (q.metadata ->> 'chunk_size')::integer AS chunk_size, q.parallel, q.max_attempts,
       q.created_at, q.started_at, q.completed_at,
       coalesce(nullif(q.last_error, ''),
                (SELECT c.last_error FROM chunked_sync_jobs c
                  WHERE c.parent_sync_job_id = q.id AND c.status = 'failed'
                    AND c.last_error <> ''
                  ORDER BY c.completed_at DESC NULLS LAST, c.chunk_index DESC
                  LIMIT 1)) AS last_error
  FROM sync_queue q
  LEFT JOIN stores s ON s.id = q.store_id
 WHERE q.id = %(job_id)s;

-- report_job_chunks --
-- Every chunk of a job, in order.
-- An incremental chunk also names its folder, its round (full or delta, and
-- why a full one), and when the folder's last round completed.
SELECT c.id AS chunk_id, c.chunk_index, c.total_chunks, c.status, c.window_start, c.window_end,
       c.folder_id, c.folder_name,
       CASE WHEN c.folder_id IS NULL THEN NULL
            WHEN (c.checkpoint ->> 'full')::boolean THEN 'full'
            WHEN c.checkpoint IS NOT NULL THEN 'delta' END AS round,
       c.checkpoint ->> 'full_reason' AS full_round_reason, f.last_round_at,
       c.start_offset, c.end_offset, c.estimated_emails, c.emails_synced, c.attempts,
       c.max_attempts, c.worker_id, c.started_at, c.completed_at, c.lease_expires_at,
       c.not_before, c.processing_time_ms, c.last_error
  FROM chunked_sync_jobs c
  LEFT JOIN folder_sync_state f ON f.store_id = c.store_id AND f.folder_id = c.folder_id
 WHERE c.parent_sync_job_id = %(job_id)s
 ORDER BY c.chunk_index;

-- report_job_attempts --
-- Every attempt of every chunk of a job: who ran it, when, and how it ended.
SELECT a.chunk_id, c.chunk_index, a.attempt, a.worker_id, a.started_at, a.finished_at,
       a.outcome, a.error, a.duration_ms, a.emails_synced
  FROM chunk_attempts a
  JOIN chunked_sync_jobs c ON c.id = a.chunk_id
 WHERE c.parent_sync_job_id = %(job_id)s
 ORDER BY c.chunk_index, a.id;

-- report_stuck_chunks --
-- The runbook's "Check Stuck Chunks": processing since before now - older_than, or past the lease.
SELECT c.id AS chunk_id, c.parent_sync_job_id AS job_id, s.email AS store_email,
       c.chunk_index, c.total_chunks, c.attempts, c.max_attempts, c.worker_id, c.started_at,
       c.heartbeat_at, c.lease_expires_at,
       CASE WHEN c.lease_expires_at < now() THEN 'lease expired'
            ELSE 'processing too long' END AS reason
  FROM chunked_sync_jobs c
  LEFT JOIN stores s ON s.id = c.store_id
 WHERE c.status = 'processing'
   AND (c.started_at < now() - %(older_than)s OR c.lease_expires_at < now())
 ORDER BY c.started_at, c.id;

-- report_chunk_success_rate --
-- The runbook's "Monitor Chunk Success Rate": chunks created since now - since, by status.
-- One definition of success: completed out of finished (completed + failed).
-- percentage is each status's share of those; NULL for the statuses outside
-- it (pending, processing: not finished; cancelled: stopped by a person).
-- share_of_all is the runbook's figure, each status's share of every chunk.
SELECT status,
       count(*) AS count,
       CASE WHEN status IN ('completed', 'failed')
            THEN round(count(*) * 100.0
                       / sum(count(*)) FILTER (WHERE status IN ('completed', 'failed')) OVER (),
                       2) END AS percentage,
       round(count(*) * 100.0 / sum(count(*)) OVER (), 2) AS share_of_all
  FROM chunked_sync_jobs
 WHERE created_at > now() - %(since)s
 GROUP BY status
 ORDER BY count(*) DESC, status;

-- report_problem_stores --
-- The runbook's "Identify Problem Stores": stores with failed chunks created since now - since.
SELECT s.id AS store_id, s.name, s.email,
       count(CASE WHEN csj.status = 'failed' THEN 1 END) AS failed_chunks,
       count(*) AS total_chunks,
       (array_agg(csj.last_error ORDER BY csj.completed_at DESC NULLS LAST)
            FILTER (WHERE csj.status = 'failed'))[1] AS last_error
  FROM stores s
  JOIN chunked_sync_jobs csj ON s.id = csj.store_id
 WHERE csj.created_at > now() - %(since)s
 GROUP BY s.id, s.name, s.email
HAVING count(CASE WHEN csj.status = 'failed' THEN 1 END) > 0
 ORDER BY failed_chunks DESC, s.email;

-- report_store_currency --
-- Per store kept current by incremental jobs: its folders, and when the
-- oldest and newest of their last rounds completed (a folder never round
-- yet counts as oldest). behind: how long ago the oldest was. Only store_id's when it is
-- not NULL; the `limit` furthest behind (NULL: all); total: how many stores in all.
SELECT s.id AS store_id, s.name, s.email, count(*) AS folders,
       count(*) FILTER (WHERE f.last_round_at IS NULL) AS folders_never_synced,
       min(f.last_round_at) AS oldest_round_at, max(f.last_round_at) AS newest_round_at,
       now() - min(f.last_round_at) AS behind, count(*) OVER () AS total
  FROM folder_sync_state f
  JOIN stores s ON s.id = f.store_id
 WHERE %(store_id)s::uuid IS NULL OR f.store_id = %(store_id)s::uuid
 GROUP BY s.id, s.name, s.email
 ORDER BY min(f.last_round_at) NULLS FIRST, s.email
 LIMIT %(limit)s;

-- report_stale_stores --
-- Stores kept current whose oldest folder round completed before now - stale_after.
SELECT s.id AS store_id, s.name, s.email, min(f.last_round_at) AS oldest_round_at,
       now() - min(f.last_round_at) AS behind
  FROM folder_sync_state f
  JOIN stores s ON s.id = f.store_id
 GROUP BY s.id, s.name, s.email
HAVING min(f.last_round_at) < now() - %(stale_after)s
 ORDER BY min(f.last_round_at), s.email;

-- report_stores --
-- Registered stores for `store list`, newest first, with their active job: those whose email
-- or name holds search (any case) and added within since (each NULL: any), at most limit;
-- total: how many match in all.
SELECT s.id, s.name, s.email, s.business_id, s.provider, s.created_at,
       (SELECT q.id FROM sync_queue q
         WHERE q.store_id = s.id AND q.status IN ('pending', 'processing')) AS active_job_id,
       count(*) OVER () AS total
  FROM stores s
 WHERE (%(search)s::text IS NULL
        OR strpos(lower(s.email), lower(%(search)s::text)) > 0
        OR strpos(lower(s.name), lower(%(search)s::text)) > 0)
   AND (%(since)s::interval IS NULL OR s.created_at > now() - %(since)s::interval)
 ORDER BY s.created_at DESC NULLS LAST, s.email, s.id
 LIMIT %(limit)s;

-- report_database --
-- Which database this is, for `syncctl db status`.
SELECT current_database() AS database, current_user AS user_name,
       current_setting('server_version') AS server_version;
