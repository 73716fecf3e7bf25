"""Benchmark 5: chunks per second with 1, 2 and 4 `syncctl run` processes.

Each process stands for a host: its own slots, connections, heartbeats and
reaping, all pointed at one database. Jobs of ten one-message chunks read
from the local Graph server with 50 ms of latency per request, as a real
Graph answers, so a chunk waits on the network as in production and the
figure shows whether adding processes adds throughput or queues them on a
lock.
"""

from __future__ import annotations

from bench.common import PgServer, Section, bench_connect, bench_query, fresh_database, ratio
from bench.mail import CachedGraphServer, WorkerProcess, syncctl_env

PROCESSES = (1, 2, 4)
SLOTS = 4
CHUNKS_PER_JOB = 10
LATENCY = 0.05


def _drain(server: PgServer, graph: CachedGraphServer, *, processes: int, jobs: int) -> float:
    """Seconds from the first attempt's start to the last one's end."""
    with fresh_database(server, f"scale{processes}") as url:
        with bench_connect(url) as conn:
            with conn.transaction():
                conn.execute(bench_query("seed_mail_jobs"), {"jobs": jobs, "chunk_size": 1})
                conn.execute(bench_query("plan_chunks"), {"emails_per_job": CHUNKS_PER_JOB})
            conn.execute(bench_query("vacuum_analyze"))
        env = syncctl_env(url, graph)
        workers = [
            WorkerProcess("--drain", "--concurrency", str(SLOTS), env=env) for _ in range(processes)
        ]
        for worker in workers:
            worker.wait()
        with bench_connect(url) as conn:
            span = conn.execute(bench_query("attempts_span")).fetchone()
            stored = conn.execute(bench_query("emails_stored")).fetchone()
    if not span or span["completed"] != jobs * CHUNKS_PER_JOB:
        raise RuntimeError(f"{processes} processes completed {span} chunks")
    if not stored or stored["emails"] != jobs * CHUNKS_PER_JOB:
        raise RuntimeError(f"{processes} processes stored {stored} messages")
    return float(span["seconds"])


def run(server: PgServer, graph: CachedGraphServer, *, quick: bool) -> Section:
    jobs = 10 if quick else 200
    chunks = jobs * CHUNKS_PER_JOB
    for number in range(1, jobs + 1):
        graph.add_mailbox(f"scale{number}@bench.test", CHUNKS_PER_JOB)
    section = Section(
        5,
        "Scale-out",
        f"{chunks:,} chunks ({jobs} jobs of {CHUNKS_PER_JOB} one-message chunks, one mailbox "
        f"each) drained by 1, 2 and 4 `syncctl run --drain --concurrency {SLOTS}` processes "
        f"at once, the local Graph server adding {LATENCY * 1000:.0f} ms to every request. "
        "Timed from the first attempt's start to the last one's end.",
    )
    graph.latency = LATENCY
    try:
        seconds = {p: _drain(server, graph, processes=p, jobs=jobs) for p in PROCESSES}
    finally:
        graph.latency = 0.0
    base = chunks / seconds[1]
    section.table(
        "",
        ["processes", "slots in all", "seconds", "chunks/s", "÷ 1 process"],
        [
            [
                str(p),
                str(p * SLOTS),
                f"{seconds[p]:.1f}",
                f"{chunks / seconds[p]:,.0f}",
                f"{ratio(chunks / seconds[p], base):.2f}×",
            ]
            for p in PROCESSES
        ],
    )
    return section
