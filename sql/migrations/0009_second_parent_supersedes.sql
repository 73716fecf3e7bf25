-- A second active parent for a store, inserted by the original frontend
-- (its createSyncJob, when a user reconnects a mailbox mid-sync), used to
-- fail on the one-active-job-per-store index. It now supersedes the store's
-- active job, as `syncctl create --force` does: that job and its unfinished
-- chunks are cancelled with the reason, a worker holding one of them is
-- fenced out at its next page, and the new parent is inserted. The mail
-- already stored stays. syncctl's own `create` marks its insert and keeps
-- refusing a store with an active job unless --force.

CREATE OR REPLACE FUNCTION syncctl_supersede_active_job() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_active uuid;
    v_reason text;
BEGIN
    IF NEW.store_id IS NULL OR NEW.status NOT IN ('pending', 'processing')
       OR current_setting('syncctl.creating_job', true) = 'on' THEN
        RETURN NEW;
    END IF;
    SELECT q.id INTO v_active
      FROM sync_queue q
     WHERE q.store_id = NEW.store_id AND q.status IN ('pending', 'processing')
       FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN NEW;
    END IF;
    v_reason := format('superseded by job %s, inserted for the same store', NEW.id);
    UPDATE chunk_attempts a
       SET finished_at = now(), outcome = 'cancelled', error = v_reason,
           duration_ms = (extract(epoch FROM now() - a.started_at) * 1000)::integer
     WHERE a.outcome = 'running'
       AND a.chunk_id IN (SELECT c.id FROM chunked_sync_jobs c
                           WHERE c.parent_sync_job_id = v_active AND c.status = 'processing');
    UPDATE chunked_sync_jobs c
       SET status = 'cancelled', lease_expires_at = NULL, last_error = v_reason,
           updated_at = now()
     WHERE c.parent_sync_job_id = v_active AND c.status IN ('pending', 'processing');
    UPDATE sync_queue q
       SET status = 'cancelled', claimable_at = NULL, chunks_in_flight = 0,
           completed_at = now(), last_error = v_reason, updated_at = now()
     WHERE q.id = v_active;
    PERFORM pg_notify('syncctl_chunks', v_active::text);
    RETURN NEW;
END $$;

DROP TRIGGER IF EXISTS sync_queue_supersede_active_job ON sync_queue;
CREATE TRIGGER sync_queue_supersede_active_job
    BEFORE INSERT ON sync_queue
    FOR EACH ROW EXECUTE FUNCTION syncctl_supersede_active_job();
