-- demo_delete_jobs --
-- Delete the sample stores' jobs (an address ending in suffix); chunks and attempts go with them.
DELETE FROM sync_queue q
 USING stores s
 WHERE s.id = q.store_id AND right(lower(s.email), length(%(suffix)s)) = %(suffix)s;

-- demo_delete_emails --
-- Delete the sample stores' messages.
DELETE FROM emails e
 USING stores s
 WHERE s.id = e.store_id AND right(lower(s.email), length(%(suffix)s)) = %(suffix)s;

-- demo_delete_request_slots --
-- Free the sample mailboxes' Graph request slots, a killed worker's included.
DELETE FROM graph_request_slots
 WHERE right(mailbox, length(%(suffix)s)) = %(suffix)s;

-- demo_delete_stores --
-- Delete the sample stores themselves, once their jobs and messages are gone.
DELETE FROM stores
 WHERE right(lower(email), length(%(suffix)s)) = %(suffix)s;

-- demo_stored_messages --
-- How many messages each sample store holds.
SELECT lower(s.email) AS email, count(e.id) AS messages
  FROM stores s
  LEFT JOIN emails e ON e.store_id = s.id
 WHERE right(lower(s.email), length(%(suffix)s)) = %(suffix)s
 GROUP BY lower(s.email);
