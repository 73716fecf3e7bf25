-- Incremental sync by Graph delta: one chunk per mail folder, the folder's
-- delta state kept between rounds, and the folder and deletion of each message.
--
-- Safe on a live database with workers running: every column added is
-- nullable without a default (no table rewrite, no long lock), and nothing
-- older workers read changes.

-- The folder a message is in (Graph's parentFolderId), its version (Graph's
-- changeKey), and when syncctl saw it leave the mailbox (NULL: still there).
-- Rows are never removed by a sync: what was deleted stays readable, marked.
ALTER TABLE emails
    ADD COLUMN IF NOT EXISTS folder_id text,
    ADD COLUMN IF NOT EXISTS change_key text,
    ADD COLUMN IF NOT EXISTS deleted_at timestamptz;

-- An incremental job's chunk runs one delta round of one folder.
ALTER TABLE chunked_sync_jobs
    ADD COLUMN IF NOT EXISTS folder_id text,
    ADD COLUMN IF NOT EXISTS folder_name text;

-- Per store and folder: where the next round starts (Graph's deltaLink;
-- NULL: the next round is a full one), and when rounds last completed.
CREATE TABLE IF NOT EXISTS folder_sync_state (
    store_id           uuid NOT NULL REFERENCES stores (id) ON DELETE CASCADE,
    folder_id          text NOT NULL,
    folder_name        text NOT NULL,
    delta_link         text,
    last_round_at      timestamptz,
    last_full_round_at timestamptz,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (store_id, folder_id)
);

-- The ids a full round of a folder has returned so far, kept across the
-- chunk's attempts: when the round completes, the folder's rows it did not
-- return are marked deleted. Emptied as the round completes.
CREATE TABLE IF NOT EXISTS delta_round_seen (
    chunk_id            uuid NOT NULL REFERENCES chunked_sync_jobs (id) ON DELETE CASCADE,
    provider_message_id text NOT NULL,
    PRIMARY KEY (chunk_id, provider_message_id)
);
