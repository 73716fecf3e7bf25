-- save_checkpoint --
-- Record a page's progress and extend the lease, only while this attempt holds the chunk.
UPDATE chunked_sync_jobs
   SET checkpoint = %(checkpoint)s,
       emails_synced = emails_synced + %(page_size)s,
       heartbeat_at = now(),
       lease_expires_at = now() + %(lease)s,
       updated_at = now()
 WHERE id = %(chunk_id)s AND status = 'processing'
   AND worker_id = %(worker_id)s AND attempts = %(attempt)s
RETURNING emails_synced;

-- upsert_email --
-- One message; a message already stored for the store is refreshed, never duplicated.
INSERT INTO emails (store_id, sync_job_id, provider_message_id, internet_message_id,
                    conversation_id, subject, from_address, from_name, to_recipients,
                    cc_recipients, bcc_recipients, received_at, sent_at, is_read, is_draft,
                    has_attachments, importance, flag_status, body_content_type, body)
VALUES (%(store_id)s, %(sync_job_id)s, %(provider_message_id)s, %(internet_message_id)s,
        %(conversation_id)s, %(subject)s, %(from_address)s, %(from_name)s, %(to_recipients)s,
        %(cc_recipients)s, %(bcc_recipients)s, %(received_at)s, %(sent_at)s, %(is_read)s,
        %(is_draft)s, %(has_attachments)s, %(importance)s, %(flag_status)s,
        %(body_content_type)s, %(body)s)
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
       synced_at = now();
