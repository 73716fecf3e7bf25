-- Statements of the mail benchmarks (3, 4 and 5), loaded by name as sql/queries are.

-- attempts_span --
-- From the first attempt's start to the last one's end, as the database saw them.
SELECT extract(epoch FROM max(finished_at) - min(started_at))::float8 AS seconds,
       count(*) AS attempts,
       count(*) FILTER (WHERE outcome = 'completed') AS completed
  FROM chunk_attempts;

-- emails_stored --
SELECT count(*) AS emails FROM emails;

-- store_id --
SELECT id FROM stores WHERE email = %(email)s;

-- insert_one_email --
-- The naive writer: one statement, and one transaction, per message.
INSERT INTO emails (store_id, sync_job_id, provider_message_id, internet_message_id,
                    conversation_id, subject, from_address, from_name, to_recipients,
                    cc_recipients, bcc_recipients, received_at, sent_at, is_read, is_draft,
                    has_attachments, importance, flag_status, body_content_type, body)
VALUES (%(store_id)s, NULL, %(provider_message_id)s, %(internet_message_id)s,
        %(conversation_id)s, %(subject)s, %(from_address)s, %(from_name)s, %(to_recipients)s,
        %(cc_recipients)s, %(bcc_recipients)s, %(received_at)s, %(sent_at)s, %(is_read)s,
        %(is_draft)s, %(has_attachments)s, %(importance)s, %(flag_status)s,
        %(body_content_type)s, %(body)s)
ON CONFLICT (store_id, provider_message_id) DO NOTHING;

-- copy_emails --
-- Columns in the order of syncctl.mailsource.Message's fields, after the two ids.
COPY emails (store_id, sync_job_id, provider_message_id, received_at, internet_message_id,
             conversation_id, subject, from_address, from_name, to_recipients,
             cc_recipients, bcc_recipients, sent_at, is_read, is_draft, has_attachments,
             importance, flag_status, body_content_type, body)
FROM STDIN (FORMAT BINARY);

-- delete_emails --
TRUNCATE emails;

-- seed_mail_jobs --
-- Scale-out: the stores of the local server's mailboxes and one pending job each.
WITH s AS (
    INSERT INTO stores (name, email)
    SELECT 'scale ' || i, 'scale' || i || '@bench.test'
      FROM generate_series(1, %(jobs)s) AS i
    RETURNING id
)
INSERT INTO sync_queue (store_id, metadata, sync_to)
SELECT id, jsonb_build_object('chunk_size', %(chunk_size)s), now() FROM s;
