-- save_checkpoint --
-- Record a page's progress and extend the lease, only while this claim holds the chunk.
UPDATE chunked_sync_jobs
   SET checkpoint = %(checkpoint)s,
       emails_synced = emails_synced + %(page_size)s,
       processing_time_ms = (extract(epoch FROM clock_timestamp() - started_at) * 1000)::integer,
       heartbeat_at = now(),
       lease_expires_at = now() + %(lease)s,
       updated_at = now()
 WHERE id = %(chunk_id)s AND status = 'processing' AND claim_seq = %(claim_seq)s
RETURNING emails_synced;

-- copy_emails --
-- A page of new messages, binary, its columns typed as ingest._COPY_TYPES says.
COPY emails (store_id, sync_job_id, provider_message_id, internet_message_id, conversation_id,
             subject, from_address, from_name, to_recipients, cc_recipients, bcc_recipients,
             received_at, sent_at, is_read, is_draft, has_attachments, importance,
             flag_status, body_content_type, body, folder_id, change_key)
FROM STDIN (FORMAT BINARY);

-- upsert_emails --
-- A page holding messages already stored, in one statement, sent as one JSON array of rows that the
-- server takes apart (no per-value quoting on the client); a message already
-- stored for the store is updated only where it changed, never duplicated.
INSERT INTO emails (store_id, sync_job_id, provider_message_id, internet_message_id,
                    conversation_id, subject, from_address, from_name, to_recipients,
                    cc_recipients, bcc_recipients, received_at, sent_at, is_read, is_draft,
                    has_attachments, importance, flag_status, body_content_type, body,
                    folder_id, change_key)
SELECT %(store_id)s, %(sync_job_id)s, m.provider_message_id, m.internet_message_id,
       m.conversation_id, m.subject, m.from_address, m.from_name, m.to_recipients,
       m.cc_recipients, m.bcc_recipients, m.received_at, m.sent_at, m.is_read, m.is_draft,
       m.has_attachments, m.importance, m.flag_status, m.body_content_type, m.body,
       m.folder_id, m.change_key
  FROM json_to_recordset(%(page)s::json)
       AS m (provider_message_id text, internet_message_id text, conversation_id text,
             subject text, from_address text, from_name text, to_recipients jsonb,
             cc_recipients jsonb, bcc_recipients jsonb, received_at timestamptz,
             sent_at timestamptz, is_read boolean, is_draft boolean, has_attachments boolean,
             importance text, flag_status text, body_content_type text, body text,
             folder_id text, change_key text)
ON CONFLICT (store_id, provider_message_id) DO UPDATE
   SET sync_job_id = EXCLUDED.sync_job_id,
       internet_message_id = EXCLUDED.internet_message_id,
       conversation_id = EXCLUDED.conversation_id,
       subject = EXCLUDED.subject,
       from_address = EXCLUDED.from_address,
       from_name = EXCLUDED.from_name,
       to_recipients = EXCLUDED.to_recipients,
       cc_recipients = EXCLUDED.cc_recipients,
       bcc_recipients = EXCLUDED.bcc_recipients,
       received_at = EXCLUDED.received_at,
       sent_at = EXCLUDED.sent_at,
       is_read = EXCLUDED.is_read,
       is_draft = EXCLUDED.is_draft,
       has_attachments = EXCLUDED.has_attachments,
       importance = EXCLUDED.importance,
       flag_status = EXCLUDED.flag_status,
       body_content_type = EXCLUDED.body_content_type,
       body = EXCLUDED.body,
       -- A message listed is in the mailbox, in the folder it is listed with.
       folder_id = coalesce(EXCLUDED.folder_id, emails.folder_id),
       change_key = coalesce(EXCLUDED.change_key, emails.change_key),
       deleted_at = NULL,
       synced_at = now()
 -- A retried or overlapping page rewrites nothing: no new row versions, synced_at kept.
 WHERE (emails.internet_message_id, emails.conversation_id, emails.subject,
        emails.from_address, emails.from_name, emails.to_recipients, emails.cc_recipients,
        emails.bcc_recipients, emails.received_at, emails.sent_at, emails.is_read,
        emails.is_draft, emails.has_attachments, emails.importance, emails.flag_status,
        emails.body_content_type, emails.body, emails.folder_id, emails.change_key,
        emails.deleted_at IS NULL)
       IS DISTINCT FROM
       (EXCLUDED.internet_message_id, EXCLUDED.conversation_id, EXCLUDED.subject,
        EXCLUDED.from_address, EXCLUDED.from_name, EXCLUDED.to_recipients,
        EXCLUDED.cc_recipients, EXCLUDED.bcc_recipients, EXCLUDED.received_at,
        EXCLUDED.sent_at, EXCLUDED.is_read, EXCLUDED.is_draft, EXCLUDED.has_attachments,
        EXCLUDED.importance, EXCLUDED.flag_status, EXCLUDED.body_content_type,
        EXCLUDED.body, coalesce(EXCLUDED.folder_id, emails.folder_id),
        coalesce(EXCLUDED.change_key, emails.change_key), true);
