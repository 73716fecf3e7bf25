SELECT 
  status,
  COUNT(*) as count,
  ROUND(COUNT(*) * 100.0 / SUM(COUNT(*)) OVER(), 2) as percentage
FROM chunked_sync_jobs 
WHERE created_at > NOW() - INTERVAL '24 hours'
GROUP BY status;
