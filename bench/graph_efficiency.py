"""Benchmark 4: Graph requests and wall time for one mailbox behind 50 ms of latency.

`syncctl create` counts the mailbox and `syncctl run --drain` reads it, the
local Graph server adding 50 ms to every request. Requests are counted by
the server; the wall time is the time Graph was busy for the mailbox: the
count request, plus first page request received to last page answered.
"""

from __future__ import annotations

import math

from bench.common import PgServer, Section, Target, fresh_database, ratio
from bench.ingest_throughput import mailboxes
from bench.mail import CachedGraphServer, run_worker, syncctl, syncctl_env
from syncctl.graph import SELECT_FIELDS
from syncctl.mailsource import MAILBOX_CONCURRENCY, PAGE_SIZE

LATENCY = 0.05


def run(server: PgServer, graph: CachedGraphServer, *, quick: bool) -> Section:
    (email, size), _ = mailboxes(quick=quick)
    graph.warm(email, select=list(SELECT_FIELDS))
    section = Section(
        4,
        "Graph efficiency",
        f"A {size:,}-message mailbox, {LATENCY * 1000:.0f} ms added to every request by the "
        "local Graph server. The minimum is one count plus one request per page of "
        f"{PAGE_SIZE:,}; the latency-bound limit is requests × {LATENCY * 1000:.0f} ms ÷ "
        f"{MAILBOX_CONCURRENCY} in flight (Graph's per-mailbox limit).",
    )
    graph.latency = LATENCY
    try:
        with fresh_database(server, "graph") as url:
            env = syncctl_env(url, graph)
            syncctl("store", "add", "--name", "graph", "--email", email, env=env)
            graph.reset_record()
            syncctl("create", email, env=env)
            run_worker("--drain", env=env)
            served = [r for r in graph.requests if r.mailbox == email]
            in_flight = graph.max_in_flight(email)
    finally:
        graph.latency = 0.0
    counts = [r for r in served if r.path.endswith("/$count")]
    pages = [r for r in served if not r.path.endswith("/$count")]
    if not pages or any(r.status != 200 for r in served):
        raise RuntimeError(f"unexpected answers: {sorted({r.status for r in served})}")
    minimum = 1 + math.ceil(size / PAGE_SIZE)
    wall = sum(r.answered_at - r.received_at for r in counts) + (
        max(r.answered_at for r in pages) - min(r.received_at for r in pages)
    )
    limit = len(served) * LATENCY / MAILBOX_CONCURRENCY
    # The server's own time: the added latency, and selecting and serialising each page.
    serving = sum(r.answered_at - r.received_at for r in served)
    section.table(
        "",
        [
            "requests",
            "minimum",
            "most in flight",
            "wall time (s)",
            "latency-bound limit (s)",
            "one request at a time (s)",
            "server busy (s)",
        ],
        [
            [
                f"{len(served):,}",
                f"{minimum:,}",
                str(in_flight),
                f"{wall:.2f}",
                f"{limit:.2f}",
                f"{len(served) * LATENCY:.2f}",
                f"{serving:.2f}",
            ]
        ],
    )
    section.targets += [
        Target("requests ÷ minimum", ratio(len(served), minimum), 1.05, at_least=False),
        Target("wall time ÷ latency-bound limit", ratio(wall, limit), 1.5, at_least=False),
    ]
    return section
