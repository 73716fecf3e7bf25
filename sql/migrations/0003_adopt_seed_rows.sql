-- Bring rows written by the original system under syncctl's rules, keeping
-- every row. On an empty database this changes nothing.

-- The original claim set no lease: give its processing chunks one that runs
-- out five minutes after they started (the runbook's "stuck" threshold), so
-- the reaper recovers them.
UPDATE chunked_sync_jobs
   SET lease_expires_at = coalesce(started_at, now()) + interval '5 minutes'
 WHERE status = 'processing' AND lease_expires_at IS NULL;

-- Every attempt is recorded from now on, the ones in flight included, so the
-- reaper or the finishing caller closes them like any other.
INSERT INTO chunk_attempts (chunk_id, attempt, worker_id, started_at)
SELECT c.id, c.attempts, coalesce(c.worker_id, 'unknown'), coalesce(c.started_at, now())
  FROM chunked_sync_jobs c
 WHERE c.status = 'processing';

-- The original never rolled parents up; a parent created without chunks
-- (its create_sync_chunks failed) can never run.
UPDATE sync_queue q
   SET status = 'failed',
       last_error = 'created without chunks by the original system',
       completed_at = now(),
       updated_at = now()
 WHERE q.status IN ('pending', 'processing')
   AND NOT EXISTS (SELECT 1 FROM chunked_sync_jobs c WHERE c.parent_sync_job_id = q.id);

SELECT syncctl_refresh_job(q.id)
  FROM sync_queue q
 WHERE q.status IN ('pending', 'processing');

-- One active job per store from now on. Where the original left several
-- active jobs for one store, the newest stays active and the older ones are
-- cancelled with the reason; `syncctl retry` can bring one back later.
WITH ranked AS (
    SELECT id, row_number() OVER (PARTITION BY store_id
                                  ORDER BY created_at DESC NULLS LAST, id DESC) AS n
      FROM sync_queue
     WHERE status IN ('pending', 'processing')
)
UPDATE sync_queue q
   SET status = 'cancelled',
       claimable_at = NULL,
       completed_at = now(),
       last_error = 'cancelled on upgrade to syncctl: a newer job of this store was active',
       updated_at = now()
  FROM ranked
 WHERE q.id = ranked.id AND ranked.n > 1;

UPDATE chunked_sync_jobs c
   SET status = 'cancelled', lease_expires_at = NULL, updated_at = now()
  FROM sync_queue q
 WHERE c.parent_sync_job_id = q.id AND q.status = 'cancelled'
   AND c.status IN ('pending', 'processing');

UPDATE chunk_attempts a
   SET finished_at = now(), outcome = 'cancelled',
       error = 'job cancelled on upgrade to syncctl',
       duration_ms = (extract(epoch FROM now() - a.started_at) * 1000)::integer
  FROM chunked_sync_jobs c
 WHERE a.chunk_id = c.id AND c.status = 'cancelled' AND a.outcome = 'running';

CREATE UNIQUE INDEX sync_queue_one_active_per_store
    ON sync_queue (store_id) WHERE status IN ('pending', 'processing');
