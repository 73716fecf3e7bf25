-- lock_job --
-- Take the job's lock first: the lock order of every chunk change.
SELECT id, status, store_id FROM sync_queue WHERE id = %(job_id)s FOR UPDATE;

-- cancel_chunks --
-- Cancel what has not finished; a worker holding one is fenced out.
UPDATE chunked_sync_jobs
   SET status = 'cancelled', lease_expires_at = NULL, updated_at = now(),
       last_error = coalesce(%(reason)s, last_error)
 WHERE parent_sync_job_id = %(job_id)s AND status IN ('pending', 'processing')
RETURNING id, attempts;

-- cancel_running_attempts --
UPDATE chunk_attempts
   SET finished_at = now(), outcome = 'cancelled', error = %(reason)s,
       duration_ms = (extract(epoch FROM now() - started_at) * 1000)::integer
 WHERE chunk_id = ANY(%(chunk_ids)s) AND outcome = 'running';

-- mark_job_cancelled --
UPDATE sync_queue
   SET status = 'cancelled', claimable_at = NULL, completed_at = now(), updated_at = now(),
       last_error = coalesce(%(reason)s, last_error)
 WHERE id = %(job_id)s;

-- other_active_job_of_store --
-- The store's active job other than this one: one active job per store.
SELECT id, status FROM sync_queue
 WHERE store_id = %(store_id)s AND status IN ('pending', 'processing') AND id <> %(job_id)s;

-- chunk_of_job --
SELECT id, chunk_index, total_chunks, status FROM chunked_sync_jobs
 WHERE parent_sync_job_id = %(job_id)s AND chunk_index = %(chunk_index)s;

-- requeue_chunks --
-- Failed and cancelled chunks (or only the chunk at chunk_index) back to pending with fresh
-- attempts; the checkpoint stays, so a chunk resumes where it stopped.
UPDATE chunked_sync_jobs
   SET status = 'pending', attempts = 0, worker_id = NULL, started_at = NULL,
       completed_at = NULL, heartbeat_at = NULL, lease_expires_at = NULL, not_before = NULL,
       last_error = NULL, updated_at = now()
 WHERE parent_sync_job_id = %(job_id)s
   AND status IN ('failed', 'cancelled')
   AND (%(chunk_index)s::integer IS NULL OR chunk_index = %(chunk_index)s::integer)
RETURNING chunk_index;

-- reopen_job --
-- A finished job runs again; syncctl_refresh_job then sets its status and claimability.
UPDATE sync_queue
   SET status = 'pending', completed_at = NULL, last_error = NULL, updated_at = now()
 WHERE id = %(job_id)s AND status IN ('completed', 'failed', 'cancelled');

-- job_status --
SELECT status FROM sync_queue WHERE id = %(job_id)s;

-- stuck_cutoff --
-- now() - older_than by the database's clock, the one clock every host shares.
SELECT now() - %(older_than)s AS cutoff;

-- finished_jobs_before --
-- The runbook's "Cleanup Old Jobs", for every finished status: what `syncctl cleanup` deletes.
SELECT q.id AS job_id, s.email AS store_email, q.status, q.created_at, q.completed_at,
       (SELECT count(*) FROM chunked_sync_jobs c WHERE c.parent_sync_job_id = q.id) AS chunks
  FROM sync_queue q
  LEFT JOIN stores s ON s.id = q.store_id
 WHERE q.status IN ('completed', 'failed', 'cancelled')
   AND q.created_at < now() - %(older_than)s
 ORDER BY q.created_at, q.id;

-- delete_finished_jobs --
-- Delete the named jobs if they are still finished; chunks and attempts go with them, emails stay.
DELETE FROM sync_queue
 WHERE id = ANY(%(job_ids)s) AND status IN ('completed', 'failed', 'cancelled')
RETURNING id;

-- jobs_by_id_prefix --
-- Jobs whose id starts with a prefix typed by an operator, newest first, with how many match.
-- A range on the primary key: low is the prefix padded with 0s, high with fs, and uuids
-- sort as their hex text does, so this reads one range of the index however large
-- sync_queue grows (4 hex digits narrow it to 1/65536 of the jobs). The obvious LIKE on
-- id::text cannot use that index: it formats and tests every row's id, a sequential scan
-- of the whole queue on each command. (No percent sign in these comments: psycopg reads it.)
SELECT q.id, q.store_id, s.email AS store_email, q.status, q.created_at,
       count(*) OVER () AS matches
  FROM sync_queue q
  LEFT JOIN stores s ON s.id = q.store_id
 WHERE q.id BETWEEN %(low)s AND %(high)s
 ORDER BY q.created_at DESC, q.id
 LIMIT %(limit)s;
