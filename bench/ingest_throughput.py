"""Benchmark 3: messages per second from the local Graph server into `emails`.

syncctl: `syncctl create` and `syncctl run --drain` as processes, end to end
(Graph paging, parsing, cleaning, writing, checkpoints, the queue), timed
from the first attempt's start to the last one's end. The naive baseline
reads the same pages with the same Graph client and writes each message with
one INSERT in its own transaction, as the reference system does. The ceiling
is a raw binary COPY of the same rows, built in memory beforehand, into the
same table. The worker's peak memory is compared between a small and a large
mailbox.
"""

from __future__ import annotations

import json
import sys
from dataclasses import fields
from typing import Any

from psycopg.types.json import Jsonb

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
from bench.mail import CachedGraphServer, WorkerRun, run_worker, syncctl, syncctl_env
from syncctl.cleantext import clean_json, clean_text
from syncctl.graph import SELECT_FIELDS, GraphMailSource, GraphSettings, message_from_graph
from syncctl.mailsource import Message, Window

COLUMNS = [f.name for f in fields(Message)]
NAMES = ["store_id", "sync_job_id", *COLUMNS]


def mailboxes(*, quick: bool) -> tuple[tuple[str, int], tuple[str, int]]:
    """(large, small) mailboxes: the throughput run and the memory comparison."""
    if quick:
        return ("ingest10k@bench.test", 10_000), ("ingest1k@bench.test", 1_000)
    return ("ingest100k@bench.test", 100_000), ("ingest10k@bench.test", 10_000)


def sync_mailbox(url: str, server: CachedGraphServer, email: str) -> tuple[float, WorkerRun]:
    """Sync one mailbox with `syncctl create` and `syncctl run --drain`; the
    seconds from the first attempt's start to the last one's end, and the run."""
    env = syncctl_env(url, server)
    syncctl("store", "add", "--name", email.partition("@")[0], "--email", email, env=env)
    syncctl("create", email, env=env)
    run = run_worker("--drain", env=env)
    with bench_connect(url) as conn:
        span = conn.execute(bench_query("attempts_span")).fetchone()
        stored = conn.execute(bench_query("emails_stored")).fetchone()
    expected = server.mailbox_size(email)
    if not span or not stored or stored["emails"] != expected:
        raise RuntimeError(f"syncctl stored {stored} of {expected} messages of {email}")
    return float(span["seconds"]), run


# The types of copy_emails's columns: the ceiling is a binary COPY, the fastest there is.
COPY_TYPES = ["uuid", "uuid", "text", "timestamptz", *["text"] * 5, *["jsonb"] * 3]
COPY_TYPES += ["timestamptz", *["boolean"] * 3, *["text"] * 4]


def message_values(store_id: Any, message: Message) -> list[Any]:
    """A message as the values of an `emails` row, cleaned as syncctl cleans them,
    its JSON values serialised already."""
    values: list[Any] = [store_id, None]
    for name in COLUMNS:
        value = getattr(message, name)
        if isinstance(value, str):
            value = clean_text(value)
        elif isinstance(value, list):
            value = Jsonb(json.dumps(clean_json(value)).encode(), dumps=_serialised)
        values.append(value)
    return values


def _serialised(data: bytes) -> bytes:
    return data


def copy_rows(url: str, email: str, messages: list[dict[str, Any]]) -> float:
    """Seconds for one COPY of the messages' rows (built beforehand) into `emails`."""
    with bench_connect(url) as conn:
        row = conn.execute(bench_query("store_id"), {"email": email}).fetchone()
        assert row is not None
        rows = [message_values(row["id"], message_from_graph(item)) for item in messages]
        conn.execute(bench_query("delete_emails"))
        conn.execute(bench_query("vacuum_analyze"))
        with (
            Stopwatch() as watch,
            conn.transaction(),
            conn.cursor() as cursor,
            cursor.copy(bench_query("copy_emails")) as copy,
        ):
            copy.set_types(COPY_TYPES)
            for values in rows:
                copy.write_row(values)
        stored = conn.execute(bench_query("emails_stored")).fetchone()
    if not stored or stored["emails"] != len(messages):
        raise RuntimeError(f"COPY stored {stored} of {len(messages)} rows")
    return watch.seconds


def naive_sync(url: str, graph_url: str, token: str, email: str, count: int) -> dict[str, Any]:
    """The reference system's way: read pages, write each message with its own INSERT."""
    source = GraphMailSource(GraphSettings(url=graph_url, token=token))
    written = 0
    with bench_connect(url) as conn, Stopwatch() as watch:
        row = conn.execute(bench_query("store_id"), {"email": email}).fetchone()
        assert row is not None
        next_link: str | None = None
        while written < count:
            page = source.fetch_page(
                email, Window(None, None), skip=written, top=1000, next_link=next_link
            )
            for message in page.messages[: count - written]:
                values = dict(zip(NAMES, message_values(row["id"], message), strict=True))
                conn.execute(bench_query("insert_one_email"), values)
                written += 1
            next_link = page.next_link
            if next_link is None:
                break
    source.close()
    return {"seconds": watch.seconds, "messages": written}


def run(server: PgServer, graph: CachedGraphServer, *, quick: bool) -> Section:
    (large, large_size), (small, small_size) = mailboxes(quick=quick)
    naive_count = 1_000 if quick else 10_000
    graph.latency = 0.0
    messages = graph.warm(large, select=list(SELECT_FIELDS))
    graph.warm(small, select=list(SELECT_FIELDS))
    section = Section(
        3,
        "Ingest",
        f"A {large_size:,}-message mailbox from the local Graph server (no added latency, "
        "messages generated and serialised before timing) into `emails`. syncctl: "
        "`syncctl create` then one "
        "`syncctl run --drain` process (default chunk size, pages of 1,000), timed from the "
        "first attempt's start to the last one's end. Naive baseline: the same Graph client "
        f"reading the same pages, one INSERT (one transaction) per message, over the first "
        f"{naive_count:,} messages. Ceiling: one binary COPY of the same {large_size:,} rows, "
        "built in memory first, into the same table. Peak memory: VmHWM of the `syncctl run` "
        "process, "
        f"{small_size:,} against {large_size:,} messages.",
    )
    with fresh_database(server, "ingest") as url:
        syncctl_seconds, large_run = sync_mailbox(url, graph, large)
        copy_seconds = copy_rows(url, large, messages)
    with fresh_database(server, "ingest_naive") as url:
        env = syncctl_env(url, graph)
        syncctl("store", "add", "--name", "naive", "--email", large, env=env)
        naive = run_child(
            "bench.ingest_throughput", url, graph.url, graph.token, large, str(naive_count)
        )
    with fresh_database(server, "ingest_small") as url:
        _, small_run = sync_mailbox(url, graph, small)

    syncctl_rate = large_size / syncctl_seconds
    naive_rate = naive["messages"] / naive["seconds"]
    copy_rate = large_size / copy_seconds
    section.table(
        "messages per second",
        ["writer", "messages", "seconds", "messages/s"],
        [
            [
                "syncctl (end to end)",
                f"{large_size:,}",
                f"{syncctl_seconds:.1f}",
                rate(large_size, syncctl_seconds),
            ],
            [
                "naive: one INSERT per message",
                f"{naive['messages']:,}",
                f"{naive['seconds']:.1f}",
                rate(naive["messages"], naive["seconds"]),
            ],
            [
                "raw COPY (ceiling)",
                f"{large_size:,}",
                f"{copy_seconds:.1f}",
                rate(large_size, copy_seconds),
            ],
        ],
    )
    section.table(
        "worker process",
        ["mailbox", "process wall time (s)", "peak resident memory (MiB)"],
        [
            [f"{small_size:,}", f"{small_run.seconds:.1f}", f"{small_run.peak_rss_mib:.0f}"],
            [f"{large_size:,}", f"{large_run.seconds:.1f}", f"{large_run.peak_rss_mib:.0f}"],
        ],
    )
    section.targets += [
        Target("syncctl ÷ naive baseline", ratio(syncctl_rate, naive_rate), 10.0, at_least=True),
        Target("syncctl ÷ raw COPY", ratio(syncctl_rate, copy_rate), 0.5, at_least=True),
        Target(
            f"worker memory, {large_size:,} ÷ {small_size:,} messages",
            ratio(large_run.peak_rss_mib, small_run.peak_rss_mib),
            1.5,
            at_least=False,
        ),
    ]
    return section


if __name__ == "__main__":
    url, graph_url, token, email, count = sys.argv[1:6]
    print_child_result(naive_sync(url, graph_url, token, email, int(count)))
