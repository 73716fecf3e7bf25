-- Clean up completed jobs older than 7 days
DELETE FROM sync_queue 
WHERE status = 'completed' 
  AND created_at < NOW() - INTERVAL '7 days';
