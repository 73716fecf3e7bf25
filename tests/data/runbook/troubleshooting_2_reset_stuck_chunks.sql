UPDATE chunked_sync_jobs 
SET status = 'pending', worker_id = NULL, started_at = NULL
WHERE status = 'processing' 
  AND started_at < NOW() - INTERVAL '5 minutes';
