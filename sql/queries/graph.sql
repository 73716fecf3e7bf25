-- ensure_request_slots --
-- Create a mailbox's slot rows (once; rows already there are left alone).
INSERT INTO graph_request_slots (mailbox, slot)
SELECT %(mailbox)s, s FROM generate_series(0, %(limit)s - 1) AS s
ON CONFLICT DO NOTHING;

-- take_request_slot --
-- Take a free slot of the mailbox without waiting on another process; no row when all are busy.
UPDATE graph_request_slots r
   SET holder = %(holder)s, expires_at = clock_timestamp() + %(lease)s
 WHERE (r.mailbox, r.slot) = (
        SELECT f.mailbox, f.slot
          FROM graph_request_slots f
         WHERE f.mailbox = %(mailbox)s AND f.slot < %(limit)s
           AND (f.expires_at IS NULL OR f.expires_at <= clock_timestamp())
         ORDER BY f.slot
         LIMIT 1
           FOR UPDATE SKIP LOCKED)
RETURNING r.slot;

-- release_request_slot --
-- Give a slot back, unless its lease ran out and someone else holds it now.
UPDATE graph_request_slots
   SET holder = NULL, expires_at = NULL
 WHERE mailbox = %(mailbox)s AND slot = %(slot)s AND holder = %(holder)s;

-- request_slots_in_use --
-- The mailbox's slots held right now (for tests and diagnostics).
SELECT slot, holder, expires_at
  FROM graph_request_slots
 WHERE mailbox = %(mailbox)s AND expires_at > clock_timestamp()
 ORDER BY slot;

-- request_slots_of_host --
-- The mailbox's slots held now by processes of one host (holders start 'host:').
SELECT slot, holder
  FROM graph_request_slots
 WHERE mailbox = %(mailbox)s AND expires_at > clock_timestamp()
   AND left(holder, length(%(prefix)s)) = %(prefix)s;
