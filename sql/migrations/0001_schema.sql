-- The tables of syncctl. The seed's tables (stores, sync_queue,
-- chunked_sync_jobs) are adopted as they are when they exist: syncctl only
-- adds columns, constraints and indexes, and never renames or drops theirs,
-- so the original runbook SQL and the original callers keep working.

CREATE TABLE IF NOT EXISTS stores (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    business_id uuid,
    name        text,
    email       text,
    provider    text DEFAULT 'microsoft'
);
ALTER TABLE stores
    ADD COLUMN IF NOT EXISTS business_id uuid,
    ADD COLUMN IF NOT EXISTS name text,
    ADD COLUMN IF NOT EXISTS email text,
    ADD COLUMN IF NOT EXISTS provider text DEFAULT 'microsoft',
    ADD COLUMN IF NOT EXISTS created_at timestamptz DEFAULT now();
CREATE INDEX IF NOT EXISTS stores_email_idx ON stores (lower(email));

-- Parent jobs. The seed also references user_profiles(business_id), a table
-- of the original application that syncctl does not own.
CREATE TABLE IF NOT EXISTS sync_queue (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    business_id uuid,
    store_id    uuid NOT NULL REFERENCES stores (id),
    sync_type   text NOT NULL DEFAULT 'manual',
    status      text NOT NULL DEFAULT 'pending',
    priority    integer DEFAULT 1,
    sync_from   timestamptz,
    sync_to     timestamptz,
    metadata    jsonb DEFAULT '{}',
    created_at  timestamptz DEFAULT now(),
    updated_at  timestamptz DEFAULT now()
);
ALTER TABLE sync_queue
    -- When the job's head chunk may next be claimed; NULL while a chunk of the
    -- job is processing or none is left. Kept by syncctl_refresh_job().
    ADD COLUMN IF NOT EXISTS claimable_at timestamptz,
    ADD COLUMN IF NOT EXISTS max_attempts integer NOT NULL DEFAULT 3,
    ADD COLUMN IF NOT EXISTS estimated_emails integer,
    ADD COLUMN IF NOT EXISTS started_at timestamptz,
    ADD COLUMN IF NOT EXISTS completed_at timestamptz,
    ADD COLUMN IF NOT EXISTS last_error text;

-- Chunks. Seed columns first, then what leases, retries and resuming need.
CREATE TABLE IF NOT EXISTS chunked_sync_jobs (
    id                 uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    parent_sync_job_id uuid NOT NULL REFERENCES sync_queue (id) ON DELETE CASCADE,
    business_id        uuid,
    store_id           uuid NOT NULL,
    chunk_index        integer NOT NULL,
    total_chunks       integer NOT NULL,
    start_offset       integer NOT NULL,
    end_offset         integer NOT NULL,
    estimated_emails   integer NOT NULL,
    status             text NOT NULL DEFAULT 'pending',
    attempts           integer DEFAULT 0,
    max_attempts       integer DEFAULT 3,
    worker_id          text,
    started_at         timestamptz,
    completed_at       timestamptz,
    created_at         timestamptz DEFAULT now()
);
ALTER TABLE chunked_sync_jobs
    ADD COLUMN IF NOT EXISTS lease_expires_at timestamptz,
    ADD COLUMN IF NOT EXISTS heartbeat_at timestamptz,
    ADD COLUMN IF NOT EXISTS last_error text,
    ADD COLUMN IF NOT EXISTS processing_time_ms integer,
    ADD COLUMN IF NOT EXISTS emails_synced integer NOT NULL DEFAULT 0,
    -- Where a retried chunk resumes: the next page's link and what was read.
    ADD COLUMN IF NOT EXISTS checkpoint jsonb,
    -- A retried chunk is not claimed before this time (backoff); NULL: no wait.
    ADD COLUMN IF NOT EXISTS not_before timestamptz,
    ADD COLUMN IF NOT EXISTS updated_at timestamptz DEFAULT now();

-- The seed left these nullable; attempt counting relies on them.
UPDATE chunked_sync_jobs SET attempts = 0 WHERE attempts IS NULL;
UPDATE chunked_sync_jobs SET max_attempts = 3 WHERE max_attempts IS NULL;
ALTER TABLE chunked_sync_jobs
    ALTER COLUMN attempts SET NOT NULL,
    ALTER COLUMN max_attempts SET NOT NULL;

-- The seed required a business on every job; a store registered without one
-- (`store add` without --business) must still be able to sync.
ALTER TABLE sync_queue ALTER COLUMN business_id DROP NOT NULL;
ALTER TABLE chunked_sync_jobs ALTER COLUMN business_id DROP NOT NULL;

ALTER TABLE sync_queue ADD CONSTRAINT sync_queue_status_valid
    CHECK (status IN ('pending', 'processing', 'completed', 'failed', 'cancelled'));
ALTER TABLE chunked_sync_jobs ADD CONSTRAINT chunked_sync_jobs_status_valid
    CHECK (status IN ('pending', 'processing', 'completed', 'failed', 'cancelled'));

-- Finding a job's head: its lowest chunk still pending or processing.
CREATE INDEX IF NOT EXISTS chunked_sync_jobs_active_idx
    ON chunked_sync_jobs (parent_sync_job_id, chunk_index)
    WHERE status IN ('pending', 'processing');
CREATE INDEX IF NOT EXISTS chunked_sync_jobs_parent_idx
    ON chunked_sync_jobs (parent_sync_job_id, chunk_index);
-- Reaping, and "is a chunk of this job running?": processing rows are few.
CREATE INDEX IF NOT EXISTS chunked_sync_jobs_lease_idx
    ON chunked_sync_jobs (lease_expires_at) WHERE status = 'processing';
CREATE INDEX IF NOT EXISTS chunked_sync_jobs_processing_idx
    ON chunked_sync_jobs (parent_sync_job_id) WHERE status = 'processing';
CREATE INDEX IF NOT EXISTS chunked_sync_jobs_created_idx ON chunked_sync_jobs (created_at);
-- The claim walks claimable jobs in priority then age order; finished jobs
-- are not in this index, so history does not slow the claim down.
CREATE INDEX IF NOT EXISTS sync_queue_claim_idx
    ON sync_queue (priority DESC NULLS LAST, created_at, id)
    WHERE claimable_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS sync_queue_created_idx ON sync_queue (created_at);
CREATE INDEX IF NOT EXISTS sync_queue_store_idx ON sync_queue (store_id);

-- One row per attempt of a chunk: who ran it, when, and how it ended.
CREATE TABLE chunk_attempts (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    chunk_id      uuid NOT NULL REFERENCES chunked_sync_jobs (id) ON DELETE CASCADE,
    attempt       integer NOT NULL,
    worker_id     text NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,
    outcome       text NOT NULL DEFAULT 'running' CHECK (outcome IN (
        'running', 'completed', 'retrying', 'failed', 'released', 'reaped', 'cancelled')),
    error         text,
    duration_ms   integer,
    emails_synced integer
);
CREATE INDEX chunk_attempts_chunk_idx ON chunk_attempts (chunk_id, id);
-- Attempts still open are few; the reaper finds those orphaned by hand-run SQL.
CREATE INDEX chunk_attempts_running_idx ON chunk_attempts (chunk_id) WHERE outcome = 'running';

-- One row per message per store. sync_job_id is not a foreign key: mail
-- stays when `syncctl cleanup` deletes the job that brought it.
CREATE TABLE IF NOT EXISTS emails (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    store_id            uuid NOT NULL REFERENCES stores (id) ON DELETE CASCADE,
    sync_job_id         uuid,
    provider_message_id text NOT NULL,
    internet_message_id text,
    conversation_id     text,
    subject             text,
    from_address        text,
    from_name           text,
    to_recipients       jsonb,
    cc_recipients       jsonb,
    bcc_recipients      jsonb,
    received_at         timestamptz,
    sent_at             timestamptz,
    is_read             boolean,
    is_draft            boolean,
    has_attachments     boolean,
    importance          text,
    flag_status         text,
    body_content_type   text,
    body                text,
    synced_at           timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX IF NOT EXISTS emails_store_message_key
    ON emails (store_id, provider_message_id);
