-- chunk_context --
-- The mailbox a claimed chunk reads and its job's frozen received-time window.
SELECT s.email, q.sync_from, q.sync_to
  FROM chunked_sync_jobs c
  JOIN sync_queue q ON q.id = c.parent_sync_job_id
  JOIN stores s ON s.id = c.store_id
 WHERE c.id = %(chunk_id)s;

-- name_session --
-- Name this connection in pg_stat_activity after the worker and its role.
SELECT set_config('application_name', %(name)s, false);

-- listen_chunks --
-- Be told when chunks become claimable (the queue functions notify this channel).
LISTEN syncctl_chunks;

-- seconds_until_claimable --
-- How soon the next job waiting on a retry backoff may be claimed; NULL when none waits.
SELECT extract(epoch FROM min(claimable_at) - clock_timestamp())::float8 AS seconds
  FROM sync_queue
 WHERE claimable_at IS NOT NULL;

-- stores_of_chunks --
-- The mailbox of each chunk, for log lines about chunks this worker did not claim.
SELECT c.id, s.email
  FROM chunked_sync_jobs c
  JOIN stores s ON s.id = c.store_id
 WHERE c.id = ANY(%(chunk_ids)s);
