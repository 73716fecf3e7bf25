-- lock_migrations --
-- Serialise migrations across hosts for this session.
SELECT pg_advisory_lock(%(key)s);

-- unlock_migrations --
SELECT pg_advisory_unlock(%(key)s);

-- create_schema_migrations --
CREATE TABLE IF NOT EXISTS schema_migrations (
    name       text PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- schema_migrations_exists --
SELECT to_regclass('schema_migrations') IS NOT NULL AS present;

-- list_migrations --
SELECT name, applied_at FROM schema_migrations ORDER BY name;

-- record_migration --
INSERT INTO schema_migrations (name) VALUES (%(name)s);
