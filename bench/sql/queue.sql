-- Statements of the queue benchmarks (1, 2 and 5), loaded by name as sql/queries are.

-- seed_jobs --
-- One store and one pending parent job per store (a store has one active job at a time).
WITH s AS (
    INSERT INTO stores (name, email)
    SELECT 'bench ' || i, 'bench' || i || '@bench.test'
      FROM generate_series(1, %(jobs)s) AS i
    RETURNING id
)
INSERT INTO sync_queue (store_id, metadata)
SELECT id, jsonb_build_object('chunk_size', %(chunk_size)s) FROM s;

-- plan_chunks --
-- Plan every pending job's chunks through the seed's own function.
SELECT count(*) AS jobs
  FROM (SELECT create_sync_chunks(q.id, 'manual', %(emails_per_job)s)
          FROM sync_queue q WHERE q.status = 'pending') AS planned;

-- chunk_statuses --
SELECT status, count(*) AS chunks FROM chunked_sync_jobs GROUP BY status ORDER BY status;

-- bare_create --
-- The ceiling: a table with nothing but what a claim needs, and its pending index.
CREATE TABLE bench_bare_jobs (
    id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    status text NOT NULL DEFAULT 'pending',
    worker text
);
CREATE INDEX bench_bare_jobs_pending_idx ON bench_bare_jobs (id) WHERE status = 'pending';

-- bare_seed --
INSERT INTO bench_bare_jobs (status) SELECT 'pending' FROM generate_series(1, %(jobs)s);

-- bare_claim --
UPDATE bench_bare_jobs
   SET status = 'running', worker = %(worker)s
 WHERE id = (SELECT id FROM bench_bare_jobs WHERE status = 'pending'
              ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)
RETURNING id;

-- bare_complete --
UPDATE bench_bare_jobs SET status = 'done' WHERE id = %(id)s;

-- bare_statuses --
SELECT status, count(*) AS chunks FROM bench_bare_jobs GROUP BY status ORDER BY status;

-- vacuum_analyze --
VACUUM ANALYZE;

-- procrastinate_statuses --
SELECT status::text AS status, count(*) AS jobs FROM procrastinate_jobs GROUP BY status;

-- pgqueuer_left --
SELECT count(*) AS jobs FROM pgqueuer;
