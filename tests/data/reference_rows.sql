-- Rows as the original system leaves them, on top of reference_schema.sql:
-- parents never rolled up, a chunk stuck in processing with no lease, two
-- active jobs for one store, a parent with no chunks, a chunk put back to
-- pending after its last attempt, and NULLs where the original allowed them.
--
-- Ids: business b..., stores 5...0N, jobs 1...0N, chunk k of job N: c...0N-...0k.

INSERT INTO user_profiles (business_id, full_name)
VALUES ('b0000000-0000-0000-0000-000000000001', 'Example Ltd');

INSERT INTO stores (id, business_id, name, email, provider) VALUES
    ('50000000-0000-0000-0000-000000000001', 'b0000000-0000-0000-0000-000000000001', 'Sales', 'sales@example.com', 'outlook'),
    ('50000000-0000-0000-0000-000000000002', 'b0000000-0000-0000-0000-000000000001', 'Support', 'support@example.com', 'outlook'),
    ('50000000-0000-0000-0000-000000000003', 'b0000000-0000-0000-0000-000000000001', 'Billing', 'billing@example.com', 'outlook'),
    ('50000000-0000-0000-0000-000000000004', 'b0000000-0000-0000-0000-000000000001', 'Jobs', 'jobs@example.com', 'outlook'),
    ('50000000-0000-0000-0000-000000000005', 'b0000000-0000-0000-0000-000000000001', 'Press', 'press@example.com', 'outlook'),
    ('50000000-0000-0000-0000-000000000006', 'b0000000-0000-0000-0000-000000000001', 'Legal', 'legal@example.com', 'outlook');

-- Job 1: the reference's "current issue": chunks 1-2 done, chunk 3 stuck in
-- processing for an hour, 4-5 waiting; the parent still 'pending'.
-- Job 2: every chunk completed ten days ago; the parent still 'pending'.
-- Job 3: one chunk failed after its three attempts.
-- Jobs 4 and 5: two active parents for one store; 5 is the newer.
-- Job 6: a parent whose chunks were never created.
-- Job 7: chunk 2 put back to pending after its last attempt.
INSERT INTO sync_queue (id, business_id, store_id, sync_type, status, priority, metadata, created_at, updated_at) VALUES
    ('10000000-0000-0000-0000-000000000001', 'b0000000-0000-0000-0000-000000000001', '50000000-0000-0000-0000-000000000001', 'manual',  'pending', 1,    NULL, now() - interval '2 hours',  now() - interval '2 hours'),
    ('10000000-0000-0000-0000-000000000002', 'b0000000-0000-0000-0000-000000000001', '50000000-0000-0000-0000-000000000002', 'initial', 'pending', 1,    '{}', now() - interval '10 days',  now() - interval '10 days'),
    ('10000000-0000-0000-0000-000000000003', 'b0000000-0000-0000-0000-000000000001', '50000000-0000-0000-0000-000000000003', 'manual',  'pending', 1,    '{}', now() - interval '5 hours',  now() - interval '5 hours'),
    ('10000000-0000-0000-0000-000000000004', 'b0000000-0000-0000-0000-000000000001', '50000000-0000-0000-0000-000000000004', 'manual',  'pending', 1,    '{}', now() - interval '2 days',   now() - interval '2 days'),
    ('10000000-0000-0000-0000-000000000005', 'b0000000-0000-0000-0000-000000000001', '50000000-0000-0000-0000-000000000004', 'manual',  'pending', NULL, '{}', now() - interval '30 minutes', now() - interval '30 minutes'),
    ('10000000-0000-0000-0000-000000000006', 'b0000000-0000-0000-0000-000000000001', '50000000-0000-0000-0000-000000000005', 'manual',  'pending', 1,    '{}', now() - interval '1 day',    now() - interval '1 day'),
    ('10000000-0000-0000-0000-000000000007', 'b0000000-0000-0000-0000-000000000001', '50000000-0000-0000-0000-000000000006', 'manual',  'pending', 1,    '{}', now() - interval '4 hours',  now() - interval '4 hours');

INSERT INTO chunked_sync_jobs (id, parent_sync_job_id, business_id, store_id, chunk_index, total_chunks,
                               start_offset, end_offset, estimated_emails, status, attempts, max_attempts,
                               worker_id, started_at, completed_at, created_at) VALUES
    ('c0000001-0000-0000-0000-000000000001', '10000000-0000-0000-0000-000000000001', 'b0000000-0000-0000-0000-000000000001', '50000000-0000-0000-0000-000000000001', 1, 5,   0,  99, 100, 'completed',  1, 3, 'bg-1', now() - interval '115 minutes', now() - interval '110 minutes', now() - interval '2 hours'),
    ('c0000001-0000-0000-0000-000000000002', '10000000-0000-0000-0000-000000000001', 'b0000000-0000-0000-0000-000000000001', '50000000-0000-0000-0000-000000000001', 2, 5, 100, 199, 100, 'completed',  1, 3, 'bg-1', now() - interval '100 minutes', now() - interval '95 minutes',  now() - interval '2 hours'),
    ('c0000001-0000-0000-0000-000000000003', '10000000-0000-0000-0000-000000000001', 'b0000000-0000-0000-0000-000000000001', '50000000-0000-0000-0000-000000000001', 3, 5, 200, 299, 100, 'processing', 1, 3, 'bg-2', now() - interval '1 hour',      NULL,                          now() - interval '2 hours'),
    ('c0000001-0000-0000-0000-000000000004', '10000000-0000-0000-0000-000000000001', 'b0000000-0000-0000-0000-000000000001', '50000000-0000-0000-0000-000000000001', 4, 5, 300, 399, 100, 'pending',    0, 3, NULL,   NULL,                          NULL,                          now() - interval '2 hours'),
    ('c0000001-0000-0000-0000-000000000005', '10000000-0000-0000-0000-000000000001', 'b0000000-0000-0000-0000-000000000001', '50000000-0000-0000-0000-000000000001', 5, 5, 400, 499, 100, 'pending',    0, 3, NULL,   NULL,                          NULL,                          now() - interval '2 hours'),
    ('c0000002-0000-0000-0000-000000000001', '10000000-0000-0000-0000-000000000002', 'b0000000-0000-0000-0000-000000000001', '50000000-0000-0000-0000-000000000002', 1, 3,   0,  99, 100, 'completed',  1, 3, 'bg-1', now() - interval '10 days',      now() - interval '10 days',     now() - interval '10 days'),
    ('c0000002-0000-0000-0000-000000000002', '10000000-0000-0000-0000-000000000002', 'b0000000-0000-0000-0000-000000000001', '50000000-0000-0000-0000-000000000002', 2, 3, 100, 199, 100, 'completed',  2, 3, 'bg-1', now() - interval '10 days',      now() - interval '10 days',     now() - interval '10 days'),
    ('c0000002-0000-0000-0000-000000000003', '10000000-0000-0000-0000-000000000002', 'b0000000-0000-0000-0000-000000000001', '50000000-0000-0000-0000-000000000002', 3, 3, 200, 299, 100, 'completed',  1, 3, 'bg-1', now() - interval '10 days',      now() - interval '10 days',     now() - interval '10 days'),
    ('c0000003-0000-0000-0000-000000000001', '10000000-0000-0000-0000-000000000003', 'b0000000-0000-0000-0000-000000000001', '50000000-0000-0000-0000-000000000003', 1, 3,   0,  99, 100, 'completed',  1, 3, 'bg-1', now() - interval '5 hours',      now() - interval '5 hours',     now() - interval '5 hours'),
    ('c0000003-0000-0000-0000-000000000002', '10000000-0000-0000-0000-000000000003', 'b0000000-0000-0000-0000-000000000001', '50000000-0000-0000-0000-000000000003', 2, 3, 100, 199, 100, 'failed',     3, 3, 'bg-2', now() - interval '5 hours',      now() - interval '4 hours',     now() - interval '5 hours'),
    ('c0000003-0000-0000-0000-000000000003', '10000000-0000-0000-0000-000000000003', 'b0000000-0000-0000-0000-000000000001', '50000000-0000-0000-0000-000000000003', 3, 3, 200, 299, 100, 'completed',  1, 3, 'bg-1', now() - interval '4 hours',      now() - interval '4 hours',     now() - interval '5 hours'),
    ('c0000004-0000-0000-0000-000000000001', '10000000-0000-0000-0000-000000000004', 'b0000000-0000-0000-0000-000000000001', '50000000-0000-0000-0000-000000000004', 1, 2,   0,  99, 100, 'pending',    0, 3, NULL,   NULL,                          NULL,                          now() - interval '2 days'),
    ('c0000004-0000-0000-0000-000000000002', '10000000-0000-0000-0000-000000000004', 'b0000000-0000-0000-0000-000000000001', '50000000-0000-0000-0000-000000000004', 2, 2, 100, 199, 100, 'pending',    0, 3, NULL,   NULL,                          NULL,                          now() - interval '2 days'),
    ('c0000005-0000-0000-0000-000000000001', '10000000-0000-0000-0000-000000000005', 'b0000000-0000-0000-0000-000000000001', '50000000-0000-0000-0000-000000000004', 1, 2,   0,  99, 100, 'pending',    0, 3, NULL,   NULL,                          NULL,                          now() - interval '30 minutes'),
    ('c0000005-0000-0000-0000-000000000002', '10000000-0000-0000-0000-000000000005', 'b0000000-0000-0000-0000-000000000001', '50000000-0000-0000-0000-000000000004', 2, 2, 100, 199, 100, 'pending', NULL, NULL, NULL,   NULL,                          NULL,                          now() - interval '30 minutes'),
    ('c0000007-0000-0000-0000-000000000001', '10000000-0000-0000-0000-000000000007', 'b0000000-0000-0000-0000-000000000001', '50000000-0000-0000-0000-000000000006', 1, 3,   0,  99, 100, 'completed',  1, 3, 'bg-1', now() - interval '4 hours',      now() - interval '4 hours',     now() - interval '4 hours'),
    ('c0000007-0000-0000-0000-000000000002', '10000000-0000-0000-0000-000000000007', 'b0000000-0000-0000-0000-000000000001', '50000000-0000-0000-0000-000000000006', 2, 3, 100, 199, 100, 'pending',    3, 3, NULL,   NULL,                          NULL,                          now() - interval '4 hours'),
    ('c0000007-0000-0000-0000-000000000003', '10000000-0000-0000-0000-000000000007', 'b0000000-0000-0000-0000-000000000001', '50000000-0000-0000-0000-000000000006', 3, 3, 200, 299, 100, 'pending',    0, 3, NULL,   NULL,                          NULL,                          now() - interval '4 hours');
