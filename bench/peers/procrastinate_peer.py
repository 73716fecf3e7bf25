"""procrastinate draining no-op jobs: one worker, `concurrency=N`, `wait=False`
(the worker stops once it has caught up with the queue), as its docs run it."""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

import procrastinate

from bench.common import Stopwatch, bench_connect, bench_query, print_child_result

# Enqueued in batches of this many jobs (one statement each).
DEFER_BATCH = 1_000


async def drain(url: str, concurrency: int, total: int) -> dict[str, Any]:
    connector = procrastinate.PsycopgConnector(
        conninfo=url, min_size=concurrency + 2, max_size=concurrency + 2
    )
    app = procrastinate.App(connector=connector)

    @app.task(name="noop")
    async def noop() -> None:
        return None

    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        for start in range(0, total, DEFER_BATCH):
            await noop.batch_defer_async(*({} for _ in range(min(DEFER_BATCH, total - start))))
        with bench_connect(url) as conn:
            conn.execute(bench_query("vacuum_analyze"))
        with Stopwatch() as watch:
            await app.run_worker_async(
                concurrency=concurrency, wait=False, install_signal_handlers=False
            )
    with bench_connect(url) as conn:
        statuses = {
            row["status"]: row["jobs"]
            for row in conn.execute(bench_query("procrastinate_statuses")).fetchall()
        }
    if statuses != {"succeeded": total}:
        raise RuntimeError(f"procrastinate left {statuses}, not {total} succeeded")
    return {"seconds": watch.seconds, "jobs": statuses["succeeded"]}


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.WARNING)
    _, url, concurrency, total = argv[0], argv[1], int(argv[2]), int(argv[3])
    print_child_result(asyncio.run(drain(url, concurrency, total)))


if __name__ == "__main__":
    main(sys.argv[1:])
