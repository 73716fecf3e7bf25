-- forget_gone_folders --
-- Folders that no longer exist took their messages with them: mark the
-- store's rows in any folder not among folder_ids deleted, and drop the gone
-- folders' delta state. Counts what it did.
WITH marked AS (
    UPDATE emails SET deleted_at = now()
     WHERE store_id = %(store_id)s
       AND deleted_at IS NULL
       AND folder_id IS NOT NULL
       AND folder_id <> ALL(%(folder_ids)s::text[])
    RETURNING 1
), dropped AS (
    DELETE FROM folder_sync_state
     WHERE store_id = %(store_id)s AND folder_id <> ALL(%(folder_ids)s::text[])
    RETURNING 1
)
SELECT (SELECT count(*) FROM dropped)::integer AS folders,
       (SELECT count(*) FROM marked)::integer AS rows;

-- force_full_rounds --
-- These folders' next rounds are full ones (and so reconcile).
UPDATE folder_sync_state SET delta_link = NULL, updated_at = now()
 WHERE store_id = %(store_id)s AND folder_id = ANY(%(folder_ids)s::text[]);

-- folders_with_delta_link --
SELECT folder_id FROM folder_sync_state
 WHERE store_id = %(store_id)s AND delta_link IS NOT NULL;

-- insert_incremental_job --
INSERT INTO sync_queue (business_id, store_id, sync_type, status, priority, parallel,
                        metadata, max_attempts, estimated_emails)
VALUES (%(business_id)s, %(store_id)s, 'incremental', 'pending', %(priority)s, %(parallel)s,
        '{}', %(max_attempts)s, %(estimated_emails)s)
RETURNING id, created_at;

-- insert_folder_chunks --
-- An incremental job's chunks, one per folder, given as parallel arrays in chunk order.
INSERT INTO chunked_sync_jobs (parent_sync_job_id, business_id, store_id, chunk_index,
                               total_chunks, folder_id, folder_name, start_offset,
                               end_offset, estimated_emails, max_attempts)
SELECT %(job_id)s, %(business_id)s, %(store_id)s, c.chunk_index,
       cardinality(%(chunk_indexes)s::integer[]), c.folder_id, c.folder_name, 0,
       c.estimated_emails, c.estimated_emails, %(max_attempts)s
  FROM unnest(%(chunk_indexes)s::integer[], %(folder_ids)s::text[], %(folder_names)s::text[],
              %(estimates)s::integer[])
       AS c (chunk_index, folder_id, folder_name, estimated_emails);

-- due_stores --
-- Stores due a job of sync_type: none active, none of the type completed
-- within older_than.
SELECT s.id, s.email
  FROM stores s
 WHERE s.email IS NOT NULL
   AND NOT EXISTS (SELECT 1 FROM sync_queue q
                    WHERE q.store_id = s.id AND q.status IN ('pending', 'processing'))
   AND NOT EXISTS (SELECT 1 FROM sync_queue q
                    WHERE q.store_id = s.id AND q.sync_type = %(sync_type)s
                      AND q.status = 'completed'
                      AND q.completed_at > now() - %(older_than)s::interval)
 ORDER BY s.created_at NULLS FIRST, s.email;
