"""Where a page of mail goes: the cost of each step syncctl takes with one page.

Not one of the five benchmarks: a breakdown to read beside benchmark 3, in
milliseconds per page of 1,000 messages from the local Graph server's
generator (the same mailbox contents the benchmarks serve), each step timed
alone in this process, the median of several rounds.

    python -m bench.page_costs          (from the repository root)
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench.common import bench_connect, bench_query, fresh_database, pg_server
from bench.mail import CachedGraphServer
from syncctl import queue
from syncctl.cleantext import clean_escapes
from syncctl.graph import SELECT_FIELDS, parse_page
from syncctl.ingest import write_page
from syncctl.mailsource import PAGE_SIZE
from syncctl.worker import tune_garbage_collector

PAGES = 5
ROUNDS = 5
EMAIL = "pagecosts@bench.test"
LEASE = timedelta(minutes=5)


def median_ms(step: Callable[[int], Any]) -> float:
    """The median over ROUNDS of the mean milliseconds step(page) takes over the pages."""
    rounds = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        for page in range(PAGES):
            step(page)
        rounds.append((time.perf_counter() - started) * 1000 / PAGES)
    return statistics.median(rounds)


def main() -> None:
    select = ",".join(SELECT_FIELDS)
    with CachedGraphServer({EMAIL: PAGES * PAGE_SIZE}) as server, httpx.Client() as client:
        server.warm(EMAIL, select=list(SELECT_FIELDS))

        def fetch(page: int) -> bytes:
            reply = client.get(
                f"{server.url}/users/{EMAIL}/messages",
                params={"$top": PAGE_SIZE, "$skip": page * PAGE_SIZE, "$select": select},
                headers={"Authorization": f"Bearer {server.token}"},
            )
            reply.raise_for_status()
            return reply.content

        bodies = [fetch(page) for page in range(PAGES)]
        rows: list[tuple[str, float]] = [
            ("fetch from the local server (JSON made, as in benchmark 3)", median_ms(fetch)),
        ]
    rows.append(("clean the page's escapes (bytes)", median_ms(lambda p: clean_escapes(bodies[p]))))
    cleaned = [clean_escapes(body) for body in bodies]
    rows += [
        ("parse with json", median_ms(lambda p: json.loads(cleaned[p]))),
        ("parse with orjson", median_ms(lambda p: orjson.loads(cleaned[p]))),
        ("parse_page (clean, orjson, messages)", median_ms(lambda p: parse_page(bodies[p]))),
    ]
    pages = [parse_page(body).messages for body in bodies]
    with (
        tempfile.TemporaryDirectory() as workdir,
        pg_server(Path(workdir)) as pg,
        fresh_database(pg, "pagecosts") as url,
        bench_connect(url) as conn,
    ):
        conn.execute(bench_query("seed_jobs"), {"jobs": 1, "chunk_size": 1})
        conn.execute(bench_query("plan_chunks"), {"emails_per_job": 1})
        chunk = queue.claim_chunk(conn, worker_id="page-costs", lease=LEASE)
        assert chunk is not None

        def write(page: int) -> None:
            write_page(conn, chunk, pages[page], checkpoint={}, lease=LEASE)

        # The first round stores new messages (COPY); later rounds find them stored (upsert).
        started = time.perf_counter()
        for page in range(PAGES):
            write(page)
        rows.append(("write_page, new messages", (time.perf_counter() - started) * 1000 / PAGES))
        rows.append(("write_page, the same page again", median_ms(write)))

    # Last: it changes the collector for the rest of this process, as `syncctl run` does.
    tune_garbage_collector()
    rows.append(
        ("parse_page, collector tuned as a worker", median_ms(lambda p: parse_page(bodies[p])))
    )

    size = statistics.mean(len(body) for body in bodies) / 1e6
    print(
        f"ms per page of {PAGE_SIZE:,} messages ({size:.2f} MB of JSON), "
        f"median of {ROUNDS} rounds of {PAGES} pages:"
    )
    width = max(len(name) for name, _ in rows)
    for name, ms in rows:
        print(f"  {name:<{width}}  {ms:7.1f}")


if __name__ == "__main__":
    sys.exit(main())
