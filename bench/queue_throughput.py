"""Benchmark 1: queue throughput of no-op chunks against peers and a bare loop.

Every system drains the same number of no-op jobs at 1, 4 and 16 concurrent
consumers, each in a fresh database on the same server, in a process of its
own. syncctl's consumers are threads, each with its own connection, calling
queue.claim_chunk and queue.finish_chunk (the calls a `syncctl run` slot
makes); the bare loop is the same threads running a plain
`UPDATE ... FOR UPDATE SKIP LOCKED` claim and an `UPDATE` completion on a
table with nothing else in it.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from bench.common import (
    PgServer,
    Section,
    Stopwatch,
    Target,
    bench_connect,
    bench_query,
    fresh_database,
    print_child_result,
    rate,
    ratio,
    run_child,
)
from syncctl import queue
from syncctl.db import Connection

CONCURRENCY = (1, 4, 16)
CHUNKS_PER_JOB = 10
LEASE = timedelta(minutes=5)
PEERS = ("procrastinate", "pgqueuer")


def seed_syncctl(url: str, *, jobs: int, chunks_per_job: int) -> None:
    """`jobs` parent jobs of `chunks_per_job` pending chunks each, planned by create_sync_chunks."""
    with bench_connect(url) as conn:
        with conn.transaction():
            conn.execute(bench_query("seed_jobs"), {"jobs": jobs, "chunk_size": 1})
            conn.execute(bench_query("plan_chunks"), {"emails_per_job": chunks_per_job})
        conn.execute(bench_query("vacuum_analyze"))


def threaded_drain(
    url: str, concurrency: int, consume: Callable[[Connection, str], bool]
) -> tuple[float, int]:
    """Run `concurrency` threads, each with its own connection, calling
    consume(conn, worker) until it returns False; (seconds, items consumed)."""
    conns = [bench_connect(url) for _ in range(concurrency)]
    start = threading.Barrier(concurrency + 1)
    counts = [0] * concurrency
    errors: list[BaseException] = []

    def loop(number: int) -> None:
        start.wait()
        try:
            while consume(conns[number], f"bench-{number}"):
                counts[number] += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=loop, args=(n,)) for n in range(concurrency)]
    for thread in threads:
        thread.start()
    with Stopwatch() as watch:
        start.wait()
        for thread in threads:
            thread.join()
    for conn in conns:
        conn.close()
    if errors:
        raise errors[0]
    return watch.seconds, sum(counts)


def syncctl_consume(conn: Connection, worker: str) -> bool:
    """Claim a chunk and complete it at once; False when the queue is empty."""
    while True:
        chunk = queue.claim_chunk(conn, worker_id=worker, lease=LEASE)
        if chunk is not None:
            queue.finish_chunk(conn, chunk, "completed")
            return True
        # Nothing claimable now, yet chunks may wait behind a head another worker holds.
        if not queue.queue_has_work(conn):
            return False
        time.sleep(0.001)


def bare_consume(conn: Connection, worker: str) -> bool:
    row = conn.execute(bench_query("bare_claim"), {"worker": worker}).fetchone()
    if row is None:
        return False
    conn.execute(bench_query("bare_complete"), {"id": row["id"]})
    return True


def _statuses(conn: Connection, name: str) -> dict[str, int]:
    return {row["status"]: row["chunks"] for row in conn.execute(bench_query(name)).fetchall()}


def drain_syncctl(url: str, concurrency: int, total: int) -> dict[str, Any]:
    seed_syncctl(url, jobs=total // CHUNKS_PER_JOB, chunks_per_job=CHUNKS_PER_JOB)
    seconds, done = threaded_drain(url, concurrency, syncctl_consume)
    with bench_connect(url) as conn:
        statuses = _statuses(conn, "chunk_statuses")
    if statuses != {"completed": total}:
        raise RuntimeError(f"syncctl left the queue as {statuses}, not {total} completed")
    return {"seconds": seconds, "jobs": done}


def drain_bare(url: str, concurrency: int, total: int) -> dict[str, Any]:
    with bench_connect(url) as conn:
        conn.execute(bench_query("bare_create"))
        conn.execute(bench_query("bare_seed"), {"jobs": total})
        conn.execute(bench_query("vacuum_analyze"))
    seconds, done = threaded_drain(url, concurrency, bare_consume)
    with bench_connect(url) as conn:
        statuses = _statuses(conn, "bare_statuses")
    if statuses != {"done": total}:
        raise RuntimeError(f"the bare loop left {statuses}, not {total} done")
    return {"seconds": seconds, "jobs": done}


def _measure(server: PgServer, system: str, concurrency: int, total: int) -> float:
    """Seconds `system` takes to drain `total` no-op jobs, in a fresh database and process."""
    with fresh_database(server, f"q_{system}", migrated=system == "syncctl") as url:
        module = f"bench.peers.{system}_peer" if system in PEERS else "bench.queue_throughput"
        result = run_child(module, system, url, str(concurrency), str(total))
    if result["jobs"] != total:
        raise RuntimeError(f"{system} ran {result['jobs']} jobs, not {total}")
    return float(result["seconds"])


def run(server: PgServer, *, quick: bool) -> Section:
    total = 500 if quick else 20_000
    systems = ("syncctl", *PEERS, "bare loop")
    section = Section(
        1,
        "Queue throughput",
        f"{total:,} no-op chunks ({total // CHUNKS_PER_JOB:,} jobs of {CHUNKS_PER_JOB}, the "
        "sequential rule on) drained by 1, 4 and 16 concurrent consumers; the peers drain "
        f"{total:,} no-op jobs at the same concurrency. syncctl and the bare loop: threads in "
        "one process, one connection each, a claim and a completion per chunk; procrastinate: "
        "one worker with `concurrency=N`; pgqueuer: N QueueManagers (one asyncpg connection "
        "each) in drain mode. Figures are chunks (jobs) per second.",
    )
    rates: dict[tuple[str, int], float] = {}
    for concurrency in CONCURRENCY:
        for system in systems:
            key = "bare" if system == "bare loop" else system
            seconds = _measure(server, key, concurrency, total)
            rates[system, concurrency] = total / seconds
            print(
                f"  queue: {system} x{concurrency}: {rate(total, seconds)}/s",
                file=sys.stderr,
                flush=True,
            )
    section.table(
        "chunks (jobs) per second",
        ["consumers", *systems],
        [[str(c)] + [f"{rates[s, c]:,.0f}" for s in systems] for c in CONCURRENCY],
    )
    section.table(
        "ratios",
        ["consumers", "syncctl ÷ procrastinate", "syncctl ÷ pgqueuer", "syncctl ÷ bare loop"],
        [
            [
                str(c),
                *(
                    f"{ratio(rates['syncctl', c], rates[other, c]):.2f}×"
                    for other in (*PEERS, "bare loop")
                ),
            ]
            for c in CONCURRENCY
        ],
    )
    for c in CONCURRENCY:
        section.targets += [
            Target(
                f"syncctl ÷ procrastinate, {c} consumers",
                ratio(rates["syncctl", c], rates["procrastinate", c]),
                2.0,
                at_least=True,
            ),
            Target(
                f"syncctl ÷ pgqueuer, {c} consumers",
                ratio(rates["syncctl", c], rates["pgqueuer", c]),
                1.0,
                at_least=True,
            ),
            Target(
                f"syncctl ÷ bare loop, {c} consumers",
                ratio(rates["syncctl", c], rates["bare loop", c]),
                0.5,
                at_least=True,
            ),
        ]
    return section


def _child(argv: list[str]) -> None:
    system, url, concurrency, total = argv[0], argv[1], int(argv[2]), int(argv[3])
    drain = drain_syncctl if system == "syncctl" else drain_bare
    print_child_result(drain(url, concurrency, total))


if __name__ == "__main__":
    _child(sys.argv[1:])
