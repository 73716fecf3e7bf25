"""Other PostgreSQL queues, drained the way their own documentation runs a worker."""
