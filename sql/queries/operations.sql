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
