"""pgqueuer draining no-op jobs: N QueueManagers, each on its own asyncpg
connection (pgqueuer's main driver), run in drain mode with the default batch
size, as its docs run a worker."""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type information
from pgqueuer import AsyncpgDriver, Job, Queries, QueueManager
from pgqueuer.types import QueueExecutionMode

from bench.common import Stopwatch, bench_connect, bench_query, print_child_result

# Enqueued in batches of this many jobs (one statement each).
ENQUEUE_BATCH = 1_000


def _manager(connection: asyncpg.Connection) -> QueueManager:
    manager = QueueManager(Queries(AsyncpgDriver(connection)))

    @manager.entrypoint("noop")
    async def noop(job: Job) -> None:
        return None

    return manager


async def drain(url: str, concurrency: int, total: int) -> dict[str, Any]:
    setup = await asyncpg.connect(url)
    try:
        queries = Queries(AsyncpgDriver(setup))
        await queries.install()
        for start in range(0, total, ENQUEUE_BATCH):
            size = min(ENQUEUE_BATCH, total - start)
            await queries.enqueue(["noop"] * size, [None] * size, [0] * size)
    finally:
        await setup.close()
    with bench_connect(url) as conn:
        conn.execute(bench_query("vacuum_analyze"))
    connections = [await asyncpg.connect(url) for _ in range(concurrency)]
    try:
        managers = [_manager(connection) for connection in connections]
        with Stopwatch() as watch:
            await asyncio.gather(
                *(manager.run(mode=QueueExecutionMode.drain) for manager in managers)
            )
    finally:
        for connection in connections:
            await connection.close()
    with bench_connect(url) as conn:
        row = conn.execute(bench_query("pgqueuer_left")).fetchone()
    left = row["jobs"] if row else -1
    if left != 0:
        raise RuntimeError(f"pgqueuer left {left} of {total} jobs in its queue")
    return {"seconds": watch.seconds, "jobs": total}


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.WARNING)
    _, url, concurrency, total = argv[0], argv[1], int(argv[2]), int(argv[3])
    print_child_result(asyncio.run(drain(url, concurrency, total)))


if __name__ == "__main__":
    main(sys.argv[1:])
