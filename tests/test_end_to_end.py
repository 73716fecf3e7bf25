"""syncctl as an operator runs it: the installed command, separate worker
processes, the local Graph-compatible server over real HTTP, real PostgreSQL."""

from __future__ import annotations

import signal
import time
from typing import Any

import psycopg
import pytest

from commandline import environment, start_worker, stored_ids, syncctl
from helpers import wait_for
from syncctl.fakegraph import FakeGraphServer

SIZES = {
    "empty@contoso.test": 0,
    "one@contoso.test": 1,
    "n999@contoso.test": 999,
    "n1000@contoso.test": 1000,
    "n1001@contoso.test": 1001,
    "n25000@contoso.test": 25_000,
}


@pytest.mark.slow
def test_mailboxes_sync_exactly_once_through_throttling_and_server_errors(
    database_url: str, db: psycopg.Connection[dict[str, Any]]
) -> None:
    with FakeGraphServer(
        SIZES, seed=7, throttle_rate=0.05, retry_after=0.05, error_rate=0.05
    ) as server:
        env = environment(database_url, server)
        for email in SIZES:
            syncctl("store", "add", "--name", email.split("@")[0], "--email", email, env=env)
            syncctl("create", email, env=env)
        workers = [start_worker("--drain", "--concurrency", "3", env=env) for _ in range(2)]
        for worker in workers:
            _, err = worker.communicate(timeout=600)
            assert worker.returncode == 0, err

        throttled = [r for r in server.requests if r.status == 429]
        failed = [r for r in server.requests if r.status >= 500]
        assert throttled, "throttling was switched on but never hit"
        assert failed, "server errors were switched on but never hit"
        for email, size in SIZES.items():
            ids = stored_ids(db, email)
            expected = {server.message(email, i)["id"] for i in range(size)}
            assert len(ids) == len(set(ids))
            assert set(ids) == expected, f"{email}: {len(expected - set(ids))} missing"
            assert server.max_in_flight(email) <= 4
        jobs = db.execute("SELECT status FROM sync_queue").fetchall()
        assert {job["status"] for job in jobs} == {"completed"}


@pytest.mark.slow
def test_killed_worker_chunk_is_finished_by_another_from_its_checkpoint(
    database_url: str, db: psycopg.Connection[dict[str, Any]]
) -> None:
    email = "big@contoso.test"
    size = 6000
    # Slow pages keep the first worker mid-chunk long enough to be killed there.
    with FakeGraphServer({email: size}, seed=3, latency=0.4) as server:
        env = environment(database_url, server)
        syncctl("store", "add", "--name", "big", "--email", email, env=env)
        syncctl("create", email, "--chunk-size", str(size), env=env)

        victim = start_worker("--lease", "5s", env=env)

        def pages_written() -> int:
            row = db.execute("SELECT checkpoint FROM chunked_sync_jobs").fetchone()
            checkpoint = row["checkpoint"] if row else None
            return int(checkpoint["read"]) if checkpoint else 0

        wait_for(lambda: pages_written() >= 2000, timeout=120, what="two pages written")
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
        killed_at = time.monotonic()
        read_before_kill = pages_written()

        # The survivor reaps the lease when it expires and resumes the chunk.
        survivor = start_worker("--drain", "--lease", "5s", env=env)
        _, err = survivor.communicate(timeout=300)
        assert survivor.returncode == 0, err

        assert len(stored_ids(db, email)) == size
        assert set(stored_ids(db, email)) == {server.message(email, i)["id"] for i in range(size)}
        chunk = db.execute("SELECT status, attempts FROM chunked_sync_jobs").fetchone()
        assert chunk == {"status": "completed", "attempts": 2}
        outcomes = [
            row["outcome"]
            for row in db.execute("SELECT outcome FROM chunk_attempts ORDER BY id").fetchall()
        ]
        assert outcomes == ["reaped", "completed"]
        # Resumed, not restarted: the survivor asked only for the pages after the checkpoint.
        pages_total = -(-size // 1000)
        pages_left = pages_total - read_before_kill // 1000
        survivor_pages = [
            r for r in server.requests if r.path.endswith("/messages") and r.received_at > killed_at
        ]
        assert len(survivor_pages) == pages_left
