SELECT 
  s.name,
  s.email,
  COUNT(CASE WHEN csj.status = 'failed' THEN 1 END) as failed_chunks,
  COUNT(*) as total_chunks
FROM stores s
JOIN chunked_sync_jobs csj ON s.id = csj.store_id
WHERE csj.created_at > NOW() - INTERVAL '24 hours'
GROUP BY s.id, s.name, s.email
HAVING COUNT(CASE WHEN csj.status = 'failed' THEN 1 END) > 0
ORDER BY failed_chunks DESC;
