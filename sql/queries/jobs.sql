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

-- insert_job --
INSERT INTO sync_queue (business_id, store_id, sync_type, status, priority, sync_from,
                        sync_to, metadata, max_attempts, estimated_emails)
VALUES (%(business_id)s, %(store_id)s, %(sync_type)s, 'pending', %(priority)s,
        %(sync_from)s, %(sync_to)s, %(metadata)s, %(max_attempts)s, %(estimated_emails)s)
RETURNING id, created_at;

-- create_chunks --
-- The seed's create_sync_chunks, called by name as the original frontend did.
SELECT create_sync_chunks(p_parent_sync_job_id => %(job_id)s,
                          p_sync_type => %(sync_type)s,
                          p_estimated_email_count => %(estimated_emails)s) AS result;

-- chunks_of_job --
SELECT chunk_index, total_chunks, start_offset, end_offset, estimated_emails, status
  FROM chunked_sync_jobs
 WHERE parent_sync_job_id = %(job_id)s
 ORDER BY chunk_index;
