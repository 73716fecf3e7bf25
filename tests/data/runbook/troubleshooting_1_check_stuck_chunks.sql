SELECT chunk_index, status, attempts, started_at, worker_id
FROM chunked_sync_jobs 
WHERE status = 'processing' 
  AND started_at < NOW() - INTERVAL '5 minutes';
