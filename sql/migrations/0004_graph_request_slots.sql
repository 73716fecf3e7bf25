-- Graph serves at most four requests at once per mailbox (it answers the
-- fifth with 429 MailboxConcurrency). Every syncctl process on every host
-- takes one of a mailbox's slots before a request and gives it back after,
-- so the limit holds across all of them. A slot is a lease: one held by a
-- process that crashed comes free when expires_at passes.
--
-- Unlogged: slots live for seconds, and losing them all in a server crash
-- only frees them.
CREATE UNLOGGED TABLE IF NOT EXISTS graph_request_slots (
    mailbox    text NOT NULL,    -- lower-cased, as in /users/{mailbox}/...
    slot       integer NOT NULL, -- 0 .. limit - 1
    holder     text,             -- host:pid:random of the request holding it; NULL when free
    expires_at timestamptz,      -- the slot is free from then on, whoever holds it
    PRIMARY KEY (mailbox, slot)
);
