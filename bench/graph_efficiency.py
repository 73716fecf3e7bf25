"""Benchmark 4: Graph requests and wall time for one mailbox, four chunks at once and one.

`syncctl create --parallel N` counts the mailbox and looks up the chunk
boundaries; `syncctl run --drain --concurrency 4` reads it. The local Graph
server adds a fixed latency to every request: 0.5 s, about what real Graph
takes for a page of 1,000 messages with bodies, where the wall time measures
the wait for Graph; and 50 ms, where it measures this machine's cores.

Requests are counted by the server. The wall time is the time Graph was busy
for the mailbox: create's requests (first received to last answered), plus
the first page request received to the last page answered; the start-up of
the worker process between the two is left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bench.common import PgServer, Section, Target, fresh_database, ratio
from bench.ingest_throughput import mailboxes
from bench.mail import CachedGraphServer, run_worker, syncctl, syncctl_env
from syncctl.fakegraph import ServedRequest
from syncctl.graph import SELECT_FIELDS
from syncctl.mailsource import MAILBOX_CONCURRENCY, PAGE_SIZE

LATENCY_GRAPH = 0.5  # what a page of real Graph takes: the target's case
LATENCY_CPU = 0.05  # short enough that the cores, not Graph, set the pace
WORKER_SLOTS = 4


@dataclass(frozen=True)
class Run:
    latency: float
    parallel: int
    requests: int
    boundary_lookups: int
    most_in_flight: int
    wall: float

    @property
    def limit(self) -> float:
        """Every request of the run, MAILBOX_CONCURRENCY at a time, each taking the latency."""
        return self.requests * self.latency / MAILBOX_CONCURRENCY


def run(server: PgServer, graph: CachedGraphServer, *, quick: bool) -> Section:
    (email, size), _ = mailboxes(quick=quick)
    graph.warm(email, select=list(SELECT_FIELDS))
    minimum = 1 + math.ceil(size / PAGE_SIZE)
    runs = [
        sync(server, graph, email, latency=latency, parallel=parallel)
        for latency, parallel in [
            (LATENCY_GRAPH, 4),
            (LATENCY_GRAPH, 1),
            (LATENCY_CPU, 4),
            (LATENCY_CPU, 1),
        ]
    ]
    section = Section(
        4,
        "Graph efficiency",
        f"A {size:,}-message mailbox read by one `syncctl run --concurrency {WORKER_SLOTS}`, "
        "the local Graph server adding a fixed latency to every request. The minimum is one "
        f"count plus one request per page of {PAGE_SIZE:,} ({minimum:,}); the latency-bound "
        f"limit is the run's requests × the latency ÷ {MAILBOX_CONCURRENCY} in flight "
        "(Graph's per-mailbox limit). At 0.5 s the mailbox waits for Graph; at 50 ms it "
        "waits for this machine's two cores, which parse and write every page.",
    )
    section.table(
        "",
        [
            "latency",
            "--parallel",
            "requests",
            "÷ minimum",
            "boundary look-ups",
            "most in flight",
            "wall time (s)",
            "latency-bound limit (s)",
            "÷ limit",
        ],
        [
            [
                f"{r.latency * 1000:.0f} ms",
                str(r.parallel),
                f"{r.requests:,}",
                f"{r.requests / minimum:.2f}×",
                str(r.boundary_lookups),
                str(r.most_in_flight),
                f"{r.wall:.2f}",
                f"{r.limit:.2f}",
                f"{r.wall / r.limit:.2f}×",
            ]
            for r in runs
        ],
    )
    four, one = runs[0], runs[1]
    section.targets += [
        Target(
            "requests ÷ minimum (0.5 s, --parallel 4)",
            ratio(four.requests, minimum),
            1.10,
            at_least=False,
        ),
        Target(
            "wall time ÷ latency-bound limit (0.5 s, --parallel 4)",
            ratio(four.wall, four.limit),
            1.5,
            at_least=False,
        ),
        Target(
            "wall time --parallel 4 ÷ --parallel 1 (0.5 s)",
            ratio(four.wall, one.wall),
            0.35,
            at_least=False,
        ),
    ]
    return section


def sync(
    server: PgServer, graph: CachedGraphServer, email: str, *, latency: float, parallel: int
) -> Run:
    """Create and drain one job of the mailbox on a fresh database."""
    graph.latency = latency
    try:
        with fresh_database(server, "graph") as url:
            env = syncctl_env(url, graph)
            syncctl("store", "add", "--name", "graph", "--email", email, env=env)
            graph.reset_record()
            syncctl("create", email, "--parallel", str(parallel), env=env)
            planned = [r for r in graph.requests if r.mailbox == email]
            run_worker("--drain", "--concurrency", str(WORKER_SLOTS), env=env)
            served = [r for r in graph.requests if r.mailbox == email]
            in_flight = graph.max_in_flight(email)
    finally:
        graph.latency = 0.0
    pages = served[len(planned) :]
    if not pages or any(r.status != 200 for r in served):
        raise RuntimeError(f"unexpected answers: {sorted({r.status for r in served})}")
    return Run(
        latency=latency,
        parallel=parallel,
        requests=len(served),
        boundary_lookups=sum(not r.path.endswith("/$count") for r in planned),
        most_in_flight=in_flight,
        wall=_span(planned) + _span(pages),
    )


def _span(requests: list[ServedRequest]) -> float:
    """From the first request received to the last answered."""
    return max(r.answered_at for r in requests) - min(r.received_at for r in requests)
