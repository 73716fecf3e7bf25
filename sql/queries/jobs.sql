-- add_store --
INSERT INTO stores (name, email, business_id, provider)
VALUES (%(name)s, %(email)s, %(business_id)s, 'microsoft')
RETURNING id, name, email, business_id, provider, created_at;

-- list_stores --
SELECT s.id, s.name, s.email, s.business_id, s.provider, s.created_at,
       (SELECT q.id FROM sync_queue q
         WHERE q.store_id = s.id AND q.status IN ('pending', 'processing')) AS active_job_id
  FROM stores s
 ORDER BY s.created_at NULLS FIRST, s.name;

-- store_by_id --
SELECT id, name, email, business_id FROM stores WHERE id = %(id)s;

-- stores_by_email --
SELECT id, name, email, business_id FROM stores WHERE lower(email) = lower(%(email)s);

-- lock_store --
-- Serialise job creation for one store.
SELECT id FROM stores WHERE id = %(store_id)s FOR NO KEY UPDATE;

-- active_job_of_store --
SELECT id, status, created_at FROM sync_queue
 WHERE store_id = %(store_id)s AND status IN ('pending', 'processing');

-- mark_own_job_insert --
-- For the rest of this transaction, a job inserted is syncctl's own, which
-- refuses a store's second active job rather than superseding the first
-- (see migration 0009).
SELECT set_config('syncctl.creating_job', 'on', true);

-- insert_job --
INSERT INTO sync_queue (business_id, store_id, sync_type, status, priority, parallel,
                        sync_from, sync_to, metadata, max_attempts, estimated_emails)
VALUES (%(business_id)s, %(store_id)s, %(sync_type)s, 'pending', %(priority)s, %(parallel)s,
        %(sync_from)s, %(sync_to)s, %(metadata)s, %(max_attempts)s, %(estimated_emails)s)
RETURNING id, created_at;

-- insert_window_chunks --
-- A job's time-window chunks, given as parallel arrays in chunk order.
INSERT INTO chunked_sync_jobs (parent_sync_job_id, business_id, store_id, chunk_index,
                               total_chunks, window_start, window_end, start_offset,
                               end_offset, estimated_emails, max_attempts)
SELECT %(job_id)s, %(business_id)s, %(store_id)s, c.chunk_index,
       cardinality(%(chunk_indexes)s::integer[]), c.window_start, c.window_end,
       c.start_offset, c.end_offset, c.estimated_emails, %(max_attempts)s
  FROM unnest(%(chunk_indexes)s::integer[], %(window_starts)s::timestamptz[],
              %(window_ends)s::timestamptz[], %(start_offsets)s::integer[],
              %(end_offsets)s::integer[], %(estimates)s::integer[])
       AS c (chunk_index, window_start, window_end, start_offset, end_offset,
             estimated_emails);

-- job_planned --
-- A job's chunks are in: set its claimability and status (a job with none completes now),
-- and wake idle workers.
SELECT syncctl_refresh_job(%(job_id)s), pg_notify('syncctl_chunks', %(job_id)s::text);
