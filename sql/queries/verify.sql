-- verify_snapshot --
-- The reads of one store's proof see the database at one moment (the first
-- statement of their transaction).
SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY;

-- verify_store_facts --
-- What a store's proof goes by: whether incremental rounds keep it current
-- (it has folder state), its last completed full job (whose window is proved
-- when it has none), and its active job.
SELECT EXISTS (SELECT 1 FROM folder_sync_state f
                WHERE f.store_id = %(store_id)s) AS has_folder_state,
       full_job.id AS full_job_id,
       full_job.sync_from AS full_job_from,
       full_job.sync_to AS full_job_to,
       full_job.completed_at AS full_job_completed_at,
       active.id AS active_job_id,
       active.sync_type AS active_job_type
  FROM (SELECT 1) AS one
  LEFT JOIN LATERAL (
        -- A job without sync_to (the original system's) read up to when it was created.
        SELECT q.id, q.sync_from, coalesce(q.sync_to, q.created_at) AS sync_to, q.completed_at
          FROM sync_queue q
         WHERE q.store_id = %(store_id)s AND q.status = 'completed'
           AND q.sync_type <> 'incremental'
         ORDER BY q.completed_at DESC NULLS LAST, q.created_at DESC
         LIMIT 1) AS full_job ON true
  LEFT JOIN LATERAL (
        SELECT q.id, q.sync_type
          FROM sync_queue q
         WHERE q.store_id = %(store_id)s AND q.status IN ('pending', 'processing')
         ORDER BY q.created_at DESC
         LIMIT 1) AS active ON true;

-- verify_folders --
-- Each folder syncctl knows for the store (it has rows there, or a round
-- state): its rows not marked deleted, when its last round started and
-- ended, and whether a chunk of an active job is about to run or running its
-- round. Rows with no folder (stored before syncctl recorded folders) come
-- as folder_id NULL.
WITH counted AS (
    SELECT e.folder_id, count(*) AS rows
      FROM emails e
     WHERE e.store_id = %(store_id)s AND e.deleted_at IS NULL
     GROUP BY e.folder_id
), in_flight AS (
    SELECT DISTINCT c.folder_id
      FROM sync_queue q
      JOIN chunked_sync_jobs c ON c.parent_sync_job_id = q.id
     WHERE q.store_id = %(store_id)s AND q.status IN ('pending', 'processing')
       AND c.status IN ('pending', 'processing') AND c.folder_id IS NOT NULL
), state AS (
    SELECT f.folder_id, f.folder_name, f.last_round_at, f.last_round_started_at
      FROM folder_sync_state f
     WHERE f.store_id = %(store_id)s
)
SELECT coalesce(s.folder_id, r.folder_id) AS folder_id,
       s.folder_name,
       coalesce(r.rows, 0) AS rows,
       s.folder_id IS NOT NULL AS synced,
       s.last_round_started_at,
       s.last_round_at,
       EXISTS (SELECT 1 FROM in_flight i
                WHERE i.folder_id = coalesce(s.folder_id, r.folder_id)) AS in_flight
  FROM state s
  FULL JOIN counted r ON r.folder_id = s.folder_id
 ORDER BY s.folder_name NULLS LAST, 1;

-- verify_window_rows --
-- The store's rows received in a full job's window, not marked deleted.
SELECT count(*) AS rows
  FROM emails e
 WHERE e.store_id = %(store_id)s AND e.deleted_at IS NULL
   AND (%(received_from)s::timestamptz IS NULL OR e.received_at >= %(received_from)s)
   AND e.received_at < %(received_to)s;
