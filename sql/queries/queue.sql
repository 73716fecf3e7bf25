-- claim_chunk --
-- Claim a chunk: highest priority first, then the job with the fewest chunks in
-- flight, served longest ago, oldest; within it, the lowest claimable chunk.
SELECT * FROM syncctl_claim_chunk(%(worker_id)s, %(lease)s);

-- heartbeat --
-- Extend the lease of a chunk this claim still holds; no row when it lost it.
UPDATE chunked_sync_jobs
   SET heartbeat_at = now(), lease_expires_at = now() + %(lease)s
 WHERE id = %(chunk_id)s AND status = 'processing' AND claim_seq = %(claim_seq)s
RETURNING lease_expires_at;

-- finish_chunk --
-- End an attempt (completed, error, permanent or released); NULL when fenced out.
SELECT syncctl_finish_claim(%(chunk_id)s, %(claim_seq)s, %(outcome)s,
                            %(error)s, %(processing_time_ms)s, %(retry_base)s) AS status;

-- reap --
-- Expire lost leases (and, with started_before, chunks processing since then); dry_run lists only.
SELECT * FROM syncctl_reap(%(dry_run)s, %(started_before)s, %(reason)s);

-- queue_has_work --
-- Whether any chunk is processing, or pending under a job that is not finished
-- (an upgraded database can hold pending chunks of a finished job, which no
-- claim takes).
SELECT EXISTS (SELECT 1 FROM chunked_sync_jobs c
                 JOIN sync_queue q ON q.id = c.parent_sync_job_id
                WHERE c.status = 'processing'
                   OR (c.status = 'pending' AND q.status IN ('pending', 'processing'))) AS busy;

-- job_of_chunk --
SELECT parent_sync_job_id AS job_id FROM chunked_sync_jobs WHERE id = %(chunk_id)s;

-- notify_chunks --
-- Wake idle workers.
SELECT pg_notify('syncctl_chunks', %(payload)s);

-- fail_unfinished_chunks --
-- Fail every chunk of the job not finished yet with one reason (the mailbox
-- itself is gone or refused); a worker holding one is fenced out. The caller
-- holds the job's lock.
WITH failed AS (
    UPDATE chunked_sync_jobs
       SET status = 'failed', completed_at = now(), lease_expires_at = NULL, not_before = NULL,
           last_error = %(reason)s, updated_at = now()
     WHERE parent_sync_job_id = %(job_id)s AND status IN ('pending', 'processing')
    RETURNING id
)
UPDATE chunk_attempts a
   SET finished_at = now(), outcome = 'failed', error = %(reason)s,
       duration_ms = (extract(epoch FROM now() - a.started_at) * 1000)::integer
  FROM failed f
 WHERE a.chunk_id = f.id AND a.outcome = 'running';

-- refresh_job --
-- Recompute the job's state from its chunks (roll-up, claimability, watermark).
SELECT syncctl_refresh_job(%(job_id)s);

-- set_job_error --
-- The reason a job failed, at the job's level.
UPDATE sync_queue SET last_error = %(reason)s WHERE id = %(job_id)s;
