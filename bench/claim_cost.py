"""Benchmark 2: claim latency as history grows.

One database per size, each holding the same pending work (200 jobs of 10
chunks) behind a history of finished jobs of ten completed chunks, each with
its attempt row. Claims are taken round-robin across the databases, so
whatever else the machine does at a moment weighs on every size alike; each
claim is timed as a worker sees it (queue.claim_chunk, round trip included)
and its chunk then completed, untimed, so the next claim finds the next head.
"""

from __future__ import annotations

import sys
import time
from contextlib import ExitStack
from datetime import timedelta

import psycopg

from bench.common import (
    PgServer,
    Section,
    Target,
    bench_connect,
    bench_query,
    fresh_database,
    percentile,
    ratio,
)
from bench.queue_throughput import seed_syncctl
from syncctl import queue
from syncctl.db import Connection

PENDING_JOBS = 200
CHUNKS_PER_JOB = 10
HISTORY_STORES = 1_000
# History is written this many jobs (ten times as many chunks) per statement.
HISTORY_BATCH = 10_000
LEASE = timedelta(minutes=5)


def build(url: str, rows: int) -> dict[str, int]:
    """`rows` chunk rows: the pending jobs, and finished history for the rest."""
    seed_syncctl(url, jobs=PENDING_JOBS, chunks_per_job=CHUNKS_PER_JOB)
    history_jobs = (rows - PENDING_JOBS * CHUNKS_PER_JOB) // CHUNKS_PER_JOB
    with bench_connect(url) as conn:
        conn.execute(bench_query("seed_history_stores"), {"stores": HISTORY_STORES})
        for first in range(1, history_jobs + 1, HISTORY_BATCH):
            last = min(history_jobs, first + HISTORY_BATCH - 1)
            conn.execute(bench_query("seed_history"), {"first": first, "last": last})
        conn.execute(bench_query("vacuum_analyze"))
        row = conn.execute(bench_query("chunk_rows")).fetchone()
    assert row is not None
    return dict(row)


def claim_plans(conn: Connection) -> tuple[str, list[str]]:
    """What the claim's plans are from, and EXPLAIN (ANALYZE, BUFFERS) of every
    statement inside one claim; of the call alone where the server has no
    auto_explain (pgserver's embedded PostgreSQL ships without it)."""
    plans: list[str] = []
    try:
        conn.execute(bench_query("explain_claims"))
    except psycopg.errors.UndefinedFile:
        with conn.transaction(force_rollback=True):  # the claim it runs is undone
            rows = conn.execute(bench_query("explain_claim_call"), {"lease": LEASE}).fetchall()
        plan = "\n".join(row["QUERY PLAN"] for row in rows)
        return "EXPLAIN (ANALYZE, BUFFERS) of the call; this server has no auto_explain", [plan]
    conn.add_notice_handler(lambda notice: plans.append(notice.message_primary or ""))
    chunk = queue.claim_chunk(conn, worker_id="bench-explain", lease=LEASE)
    conn.execute(bench_query("reset_session"))
    if chunk is not None:
        queue.finish_chunk(conn, chunk, "completed")
    return "auto_explain (ANALYZE, BUFFERS, nested statements; the last is the call itself)", plans


def run(server: PgServer, *, quick: bool) -> Section:
    sizes = (10_000, 50_000) if quick else (10_000, 100_000, 1_000_000)
    samples = 300 if quick else 1_000
    section = Section(
        2,
        "Claim cost as history grows",
        f"Claim latency with {', '.join(f'{s:,}' for s in sizes)} chunk rows: "
        f"{PENDING_JOBS * CHUNKS_PER_JOB:,} pending chunks ({PENDING_JOBS} jobs of "
        f"{CHUNKS_PER_JOB}), the rest completed history in jobs of {CHUNKS_PER_JOB} over "
        f"{HISTORY_STORES:,} stores, one attempt row per chunk. {samples:,} claims per size, "
        "round-robin across the sizes, each timed around queue.claim_chunk (one round trip).",
    )
    with ExitStack() as stack:
        urls = {size: stack.enter_context(fresh_database(server, "claim")) for size in sizes}
        shape = {}
        for size, url in urls.items():
            shape[size] = build(url, size)
            print(f"  claim: built {size:,} rows", file=sys.stderr, flush=True)
        conns = {size: stack.enter_context(bench_connect(url)) for size, url in urls.items()}
        latencies: dict[int, list[float]] = {size: [] for size in sizes}
        for _ in range(samples):
            for size, conn in conns.items():
                started = time.perf_counter()
                chunk = queue.claim_chunk(conn, worker_id="bench", lease=LEASE)
                latencies[size].append((time.perf_counter() - started) * 1000)
                if chunk is None:
                    raise RuntimeError(f"nothing to claim at {size:,} rows")
                queue.finish_chunk(conn, chunk, "completed")
        source, plans = claim_plans(conns[sizes[-1]])

    section.table(
        "claim latency (ms)",
        ["chunk rows", "jobs", "pending", "p50", "p99", "max"],
        [
            [
                f"{shape[s]['chunks']:,}",
                f"{shape[s]['jobs']:,}",
                f"{shape[s]['pending']:,}",
                f"{percentile(latencies[s], 0.50):.3f}",
                f"{percentile(latencies[s], 0.99):.3f}",
                f"{max(latencies[s]):.3f}",
            ]
            for s in sizes
        ],
    )
    largest, smallest = sizes[-1], sizes[0]
    section.targets.append(
        Target(
            f"claim p99 at {largest:,} ÷ p99 at {smallest:,} rows",
            ratio(percentile(latencies[largest], 0.99), percentile(latencies[smallest], 0.99)),
            2.0,
            at_least=False,
        )
    )
    section.notes.append(f"The claim's statements at {largest:,} rows, from {source}:")
    section.blocks.append("\n\n".join(plan.strip() for plan in plans))
    return section
