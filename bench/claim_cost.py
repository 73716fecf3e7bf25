"""Benchmark 2: claim latency as history grows, and as a few jobs grow long.

One database per case. The history cases hold the same pending work (200
jobs of 10 chunks) behind a history of finished jobs of ten completed
chunks, each with its attempt row. The wide case holds no history and 20
jobs of 50,000 pending chunks each: the claim looks at a job's first
unfinished chunks, never the rest. Every pending job runs up to four chunks
at once, as `syncctl create` makes it. Claims are taken round-robin across
the databases, so whatever else the machine does at a moment weighs on every
case alike; each claim is timed as a worker sees it (queue.claim_chunk,
round trip included) and its chunk then completed, untimed, so the next
claim finds the next head.
"""

from __future__ import annotations

import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
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
WIDE_JOBS = 20
WIDE_CHUNKS_PER_JOB = 50_000
PARALLEL = 4
HISTORY_STORES = 1_000
# History is written this many jobs (ten times as many chunks) per statement.
HISTORY_BATCH = 10_000
LEASE = timedelta(minutes=5)


@dataclass(frozen=True)
class Case:
    """One database's shape: pending jobs of some chunks, behind some history."""

    jobs: int
    chunks_per_job: int
    history_rows: int

    @property
    def label(self) -> str:
        if self.history_rows:
            return f"{self.rows:,} rows"
        return f"{self.jobs} jobs × {self.chunks_per_job:,} pending"

    @property
    def rows(self) -> int:
        return self.jobs * self.chunks_per_job + self.history_rows


def build(url: str, case: Case) -> dict[str, int]:
    """The case's pending jobs, and its finished history."""
    seed_syncctl(url, jobs=case.jobs, chunks_per_job=case.chunks_per_job)
    history_jobs = case.history_rows // CHUNKS_PER_JOB
    with bench_connect(url) as conn:
        conn.execute(bench_query("run_chunks_in_parallel"), {"parallel": PARALLEL})
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
    pending = PENDING_JOBS * CHUNKS_PER_JOB
    history = (10_000, 50_000) if quick else (10_000, 100_000, 1_000_000)
    wide = Case(WIDE_JOBS, 2_500 if quick else WIDE_CHUNKS_PER_JOB, 0)
    cases = [Case(PENDING_JOBS, CHUNKS_PER_JOB, rows - pending) for rows in history] + [wide]
    samples = 300 if quick else 1_000
    section = Section(
        2,
        "Claim cost as history grows, and as jobs grow long",
        f"Claim latency with {', '.join(f'{rows:,}' for rows in history)} chunk rows: "
        f"{pending:,} pending chunks ({PENDING_JOBS} jobs of {CHUNKS_PER_JOB}), the rest "
        f"completed history in jobs of {CHUNKS_PER_JOB} over {HISTORY_STORES:,} stores, one "
        f"attempt row per chunk; and {wide.label} chunks with no history. Every pending job "
        f"runs up to {PARALLEL} chunks at once. {samples:,} claims per case, round-robin "
        "across the cases, each timed around queue.claim_chunk (one round trip).",
    )
    with ExitStack() as stack:
        urls = [stack.enter_context(fresh_database(server, "claim")) for _ in cases]
        shape = []
        for case, url in zip(cases, urls, strict=True):
            shape.append(build(url, case))
            print(f"  claim: built {case.label}", file=sys.stderr, flush=True)
        conns = [stack.enter_context(bench_connect(url)) for url in urls]
        latencies: list[list[float]] = [[] for _ in cases]
        for _ in range(samples):
            for case, conn, timings in zip(cases, conns, latencies, strict=True):
                started = time.perf_counter()
                chunk = queue.claim_chunk(conn, worker_id="bench", lease=LEASE)
                timings.append((time.perf_counter() - started) * 1000)
                if chunk is None:
                    raise RuntimeError(f"nothing to claim at {case.label}")
                queue.finish_chunk(conn, chunk, "completed")
        plans = [claim_plans(conns[-2]), claim_plans(conns[-1])]

    section.table(
        "claim latency (ms)",
        ["case", "chunk rows", "jobs", "pending", "p50", "p99", "max"],
        [
            [
                case.label,
                f"{rows['chunks']:,}",
                f"{rows['jobs']:,}",
                f"{rows['pending']:,}",
                f"{percentile(timings, 0.50):.3f}",
                f"{percentile(timings, 0.99):.3f}",
                f"{max(timings):.3f}",
            ]
            for case, rows, timings in zip(cases, shape, latencies, strict=True)
        ],
    )
    smallest = percentile(latencies[0], 0.99)
    for case, timings in [(cases[-2], latencies[-2]), (cases[-1], latencies[-1])]:
        section.targets.append(
            Target(
                f"claim p99 at {case.label} ÷ p99 at {cases[0].label}",
                ratio(percentile(timings, 0.99), smallest),
                2.0,
                at_least=False,
            )
        )
    section.notes.append(
        f"The claim's statements at {cases[-2].label} and at {cases[-1].label}, from {plans[0][0]}:"
    )
    for case, (_, statements) in zip(cases[-2:], plans, strict=True):
        section.blocks.append(
            "\n\n".join([f"-- {case.label}", *(plan.strip() for plan in statements)])
        )
    return section
