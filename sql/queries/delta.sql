-- folder_state --
-- Where a folder's next round starts (NULL delta_link: a full round).
SELECT folder_id, folder_name, delta_link, last_round_at, last_full_round_at
  FROM folder_sync_state
 WHERE store_id = %(store_id)s AND folder_id = %(folder_id)s;

-- count_synced --
UPDATE chunked_sync_jobs SET emails_synced = emails_synced + %(count)s
 WHERE id = %(chunk_id)s
RETURNING emails_synced;

-- stored_versions --
-- What the store holds of a page's messages: their version, folder, whether marked deleted.
SELECT provider_message_id, change_key, folder_id, deleted_at IS NOT NULL AS deleted
  FROM emails
 WHERE store_id = %(store_id)s AND provider_message_id = ANY(%(ids)s::text[]);

-- lock_page_rows --
-- The stored rows a page touches, locked in one order (by id) before any is
-- written: two folders' rounds of a store run at once and a move touches a
-- row from both, so locks taken in page order could cross and deadlock.
SELECT 1 FROM emails
 WHERE store_id = %(store_id)s AND provider_message_id = ANY(%(ids)s::text[])
 ORDER BY provider_message_id
   FOR UPDATE;

-- mark_removed --
-- Messages that left the folder: marked deleted only if syncctl still has them
-- in this folder (a move arrives as a removal here and an addition in the
-- other folder, in whichever order the two folders' rounds run).
UPDATE emails
   SET deleted_at = now()
 WHERE store_id = %(store_id)s
   AND provider_message_id = ANY(%(ids)s::text[])
   AND folder_id = %(folder_id)s
   AND deleted_at IS NULL;

-- remember_seen --
-- Ids a full round returned, for the reconciliation at its end.
INSERT INTO delta_round_seen (chunk_id, provider_message_id)
SELECT %(chunk_id)s, unnest(%(ids)s::text[])
ON CONFLICT DO NOTHING;

-- reconcile_full_round --
-- A full round of the folder has ended: its rows that the round did not
-- return have left the mailbox (or the folder, and the other folder's round
-- says where to).
UPDATE emails e
   SET deleted_at = now()
  FROM (SELECT r.id FROM emails r
         WHERE r.store_id = %(store_id)s
           AND r.folder_id = %(folder_id)s
           AND r.deleted_at IS NULL
           AND NOT EXISTS (SELECT 1 FROM delta_round_seen s
                            WHERE s.chunk_id = %(chunk_id)s
                              AND s.provider_message_id = r.provider_message_id)
         ORDER BY r.provider_message_id
           FOR UPDATE OF r) AS gone  -- locked in the order lock_page_rows uses
 WHERE e.id = gone.id;

-- forget_seen --
DELETE FROM delta_round_seen WHERE chunk_id = %(chunk_id)s;

-- save_folder_state --
-- The round ended: the next one starts from its delta link. It started when
-- its chunk's first attempt was claimed (a resumed round goes on from there).
INSERT INTO folder_sync_state AS f (store_id, folder_id, folder_name, delta_link,
                                    last_round_at, last_full_round_at, last_round_started_at)
VALUES (%(store_id)s, %(folder_id)s, %(folder_name)s, %(delta_link)s, now(),
        CASE WHEN %(full)s THEN now() END,
        coalesce((SELECT min(a.started_at) FROM chunk_attempts a
                   WHERE a.chunk_id = %(chunk_id)s),
                 (SELECT c.started_at FROM chunked_sync_jobs c WHERE c.id = %(chunk_id)s),
                 now()))
ON CONFLICT (store_id, folder_id) DO UPDATE
   SET folder_name = EXCLUDED.folder_name,
       delta_link = EXCLUDED.delta_link,
       last_round_at = EXCLUDED.last_round_at,
       last_round_started_at = EXCLUDED.last_round_started_at,
       last_full_round_at = coalesce(EXCLUDED.last_full_round_at, f.last_full_round_at),
       updated_at = now();

-- drop_delta_link --
-- Graph no longer has the folder's state: its next round is a full one.
UPDATE folder_sync_state SET delta_link = NULL, updated_at = now()
 WHERE store_id = %(store_id)s AND folder_id = %(folder_id)s;

-- folder_gone --
-- The folder was deleted: its messages went with it, and its state.
WITH marked AS (
    UPDATE emails SET deleted_at = now()
     WHERE store_id = %(store_id)s AND folder_id = %(folder_id)s AND deleted_at IS NULL
    RETURNING 1
), dropped AS (
    DELETE FROM folder_sync_state WHERE store_id = %(store_id)s AND folder_id = %(folder_id)s
)
SELECT count(*) AS marked FROM marked;
