-- The original deployment's database, as an upgrade finds it: the two tables
-- of the reference document's "DATABASE SCHEMA" copied verbatim, the tables
-- they reference, and the database functions of its history, overloads and
-- all.

CREATE TABLE user_profiles (
    id          UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    business_id UUID UNIQUE,
    full_name   TEXT,
    created_at  TIMESTAMPTZ DEFAULT NOW()
);

CREATE TABLE stores (
    id            UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    business_id   UUID REFERENCES user_profiles(business_id),
    name          TEXT NOT NULL,
    email         TEXT NOT NULL,
    provider      TEXT NOT NULL DEFAULT 'outlook',
    access_token  TEXT,
    refresh_token TEXT,
    sync_enabled  BOOLEAN DEFAULT TRUE,
    created_at    TIMESTAMPTZ DEFAULT NOW()
);

-- Stores the main sync job metadata
CREATE TABLE sync_queue (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    business_id UUID NOT NULL REFERENCES user_profiles(business_id),
    store_id UUID NOT NULL REFERENCES stores(id),
    sync_type TEXT NOT NULL DEFAULT 'manual',
    status TEXT NOT NULL DEFAULT 'pending',
    priority INTEGER DEFAULT 1,
    sync_from TIMESTAMPTZ,
    sync_to TIMESTAMPTZ,
    metadata JSONB DEFAULT '{}',
    created_at TIMESTAMPTZ DEFAULT NOW(),
    updated_at TIMESTAMPTZ DEFAULT NOW()
);

-- Stores individual chunk jobs that make up a larger sync
CREATE TABLE chunked_sync_jobs (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    parent_sync_job_id UUID NOT NULL REFERENCES sync_queue(id) ON DELETE CASCADE,
    business_id UUID NOT NULL,
    store_id UUID NOT NULL,
    chunk_index INTEGER NOT NULL,           -- 1, 2, 3, 4, 5...
    total_chunks INTEGER NOT NULL,          -- Total number of chunks
    start_offset INTEGER NOT NULL,          -- Email start position (0, 100, 200...)
    end_offset INTEGER NOT NULL,            -- Email end position (99, 199, 299...)
    estimated_emails INTEGER NOT NULL,      -- Expected emails in this chunk
    status TEXT NOT NULL DEFAULT 'pending', -- pending, processing, completed, failed
    attempts INTEGER DEFAULT 0,             -- Current retry attempts
    max_attempts INTEGER DEFAULT 3,         -- Maximum allowed retries
    worker_id TEXT,                         -- Background processor worker ID
    started_at TIMESTAMPTZ,                 -- When chunk processing started
    completed_at TIMESTAMPTZ,               -- When chunk processing completed
    created_at TIMESTAMPTZ DEFAULT NOW()
);

-- The two-parameter helper the first bridge called (the reference's bug 3).
CREATE OR REPLACE FUNCTION create_sync_chunks(p_parent_sync_job_id UUID, p_chunk_count INTEGER)
RETURNS JSONB AS $$
BEGIN
    RETURN jsonb_build_object('success', false, 'error', 'not implemented');
END;
$$ LANGUAGE plpgsql;

-- The TIMESTAMPTZ overload that made calls by name ambiguous (the reference's bug 2).
CREATE OR REPLACE FUNCTION create_sync_chunks(
    p_parent_sync_job_id UUID,
    p_sync_type TEXT DEFAULT 'manual',
    p_estimated_email_count INTEGER DEFAULT NULL,
    p_sync_from TIMESTAMPTZ DEFAULT NULL,
    p_sync_to TIMESTAMPTZ DEFAULT NULL
) RETURNS JSONB AS $$
BEGIN
    RETURN create_sync_chunks(p_parent_sync_job_id, 5);
END;
$$ LANGUAGE plpgsql;

-- The compatibility bridge: five chunks, created directly.
CREATE OR REPLACE FUNCTION create_sync_chunks(
    p_parent_sync_job_id UUID,
    p_sync_type TEXT DEFAULT 'manual',
    p_estimated_email_count INTEGER DEFAULT NULL,
    p_sync_from TEXT DEFAULT NULL,
    p_sync_to TEXT DEFAULT NULL
) RETURNS JSONB AS $$
DECLARE
    v_job sync_queue%ROWTYPE;
    v_count INTEGER := coalesce(p_estimated_email_count, 100);
    v_size INTEGER;
BEGIN
    SELECT * INTO v_job FROM sync_queue WHERE id = p_parent_sync_job_id;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('success', false, 'error', 'Parent sync job not found');
    END IF;
    v_size := greatest(1, ceil(v_count / 5.0)::integer);
    INSERT INTO chunked_sync_jobs (parent_sync_job_id, business_id, store_id, chunk_index,
                                   total_chunks, start_offset, end_offset, estimated_emails)
    SELECT v_job.id, v_job.business_id, v_job.store_id, i, 5, (i - 1) * v_size,
           i * v_size - 1, v_size
      FROM generate_series(1, 5) AS i;
    RETURN jsonb_build_object('success', true, 'chunks_created', 5);
END;
$$ LANGUAGE plpgsql;

CREATE OR REPLACE FUNCTION claim_next_chunk_job(p_worker_id TEXT)
RETURNS JSONB AS $$
DECLARE
    v_chunk chunked_sync_jobs%ROWTYPE;
BEGIN
    -- CRITICAL: Orders by chunk_index ASC for sequential processing (1,2,3,4,5)
    UPDATE chunked_sync_jobs
    SET status = 'processing', started_at = NOW(), attempts = attempts + 1, worker_id = p_worker_id
    WHERE id = (
        SELECT id FROM chunked_sync_jobs
        WHERE status = 'pending' AND attempts < max_attempts
        ORDER BY chunk_index ASC, created_at ASC  -- Sequential processing!
        LIMIT 1 FOR UPDATE SKIP LOCKED
    )
    RETURNING * INTO v_chunk;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('success', false);
    END IF;
    RETURN jsonb_build_object(
        'success', true, 'chunk_id', v_chunk.id, 'chunk_index', v_chunk.chunk_index,
        'total_chunks', v_chunk.total_chunks, 'start_offset', v_chunk.start_offset,
        'end_offset', v_chunk.end_offset, 'store_id', v_chunk.store_id);
END;
$$ LANGUAGE plpgsql;

CREATE OR REPLACE FUNCTION complete_chunk_job(p_chunk_job_id UUID, p_status TEXT)
RETURNS JSONB AS $$
BEGIN
    UPDATE chunked_sync_jobs SET status = p_status, completed_at = NOW()
    WHERE id = p_chunk_job_id;
    RETURN jsonb_build_object('success', true);
END;
$$ LANGUAGE plpgsql;

-- Writes processing_time_ms, which the table above lacks: fails when called.
CREATE OR REPLACE FUNCTION complete_chunk_job(
    p_chunk_job_id UUID,
    p_status TEXT,
    p_processing_time_ms INTEGER
) RETURNS JSONB AS $$
BEGIN
    UPDATE chunked_sync_jobs
    SET status = p_status, completed_at = NOW(), processing_time_ms = p_processing_time_ms
    WHERE id = p_chunk_job_id;
    RETURN jsonb_build_object('success', true);
END;
$$ LANGUAGE plpgsql;
