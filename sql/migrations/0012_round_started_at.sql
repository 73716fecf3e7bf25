-- When each folder's last round started, for `syncctl verify`: mail received
-- after a round started may not be in the copy until the next round, so a
-- folder that Graph counts more messages in than syncctl holds is explained
-- when Graph has at least that many received since then.
--
-- Safe on a live database with workers running: the column is nullable
-- without a default (a catalog change, no table rewrite, a lock held for
-- milliseconds). Workers of the previous release leave it NULL; verify then
-- goes by when the round ended.
ALTER TABLE folder_sync_state
    ADD COLUMN IF NOT EXISTS last_round_started_at timestamptz;
