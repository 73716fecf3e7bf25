-- demo_delete_jobs --
-- Delete the sample stores' jobs (an address ending in suffix); chunks and attempts go with them.
DELETE FROM sync_queue q
 USING stores s
 WHERE s.id = q.store_id AND right(lower(s.email), length(%(suffix)s)) = %(suffix)s;

-- demo_delete_emails --
-- Delete the sample stores' messages.
DELETE FROM emails e
 USING stores s
 WHERE s.id = e.store_id AND right(lower(s.email), length(%(suffix)s)) = %(suffix)s;

-- demo_delete_request_slots --
-- Free the sample mailboxes' Graph request slots, a killed worker's included.
DELETE FROM graph_request_slots
 WHERE right(mailbox, length(%(suffix)s)) = %(suffix)s;

-- demo_delete_stores --
-- Delete the sample stores themselves, once their jobs and messages are gone.
DELETE FROM stores
 WHERE right(lower(email), length(%(suffix)s)) = %(suffix)s;

-- demo_stored_messages --
-- How many messages each sample store holds.
SELECT lower(s.email) AS email, count(e.id) AS messages
  FROM stores s
  LEFT JOIN emails e ON e.store_id = s.id
 WHERE right(lower(s.email), length(%(suffix)s)) = %(suffix)s
 GROUP BY lower(s.email);

-- demo_chunks_at_once --
-- The most chunks of each job worked on at one moment, from their attempts:
-- +1 where an attempt started, -1 where it ended, summed in time order.
WITH edges AS (
    SELECT c.parent_sync_job_id AS job_id, a.started_at AS at, 1 AS delta
      FROM chunk_attempts a JOIN chunked_sync_jobs c ON c.id = a.chunk_id
     WHERE c.parent_sync_job_id = ANY(%(job_ids)s)
    UNION ALL
    SELECT c.parent_sync_job_id, coalesce(a.finished_at, now()), -1
      FROM chunk_attempts a JOIN chunked_sync_jobs c ON c.id = a.chunk_id
     WHERE c.parent_sync_job_id = ANY(%(job_ids)s)
),
running AS (
    SELECT job_id,
           sum(delta) OVER (PARTITION BY job_id ORDER BY at, delta
                            ROWS UNBOUNDED PRECEDING) AS at_once
      FROM edges
)
SELECT job_id, max(at_once)::integer AS most FROM running GROUP BY job_id;

-- demo_job_written --
-- Rows a job wrote (inserted, changed or marked deleted), over its chunks.
SELECT coalesce(sum(emails_synced), 0) AS written
  FROM chunked_sync_jobs WHERE parent_sync_job_id = %(job_id)s;

-- demo_rows_of --
-- The store's rows of these messages: where syncctl has them, and whether deleted.
SELECT e.provider_message_id, e.folder_id, e.deleted_at
  FROM emails e JOIN stores s ON s.id = e.store_id
 WHERE lower(s.email) = lower(%(email)s) AND e.provider_message_id = ANY(%(ids)s::text[]);

-- demo_forget_folder_state --
-- The demo's server is new each run: delta links of an earlier run point at one gone.
DELETE FROM folder_sync_state f USING stores s
 WHERE s.id = f.store_id AND lower(s.email) = lower(%(email)s);
