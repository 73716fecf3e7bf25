"""Prometheus metrics, scraped over real HTTP while a real worker runs against
real PostgreSQL, and the Graph client's request counts against the local
Graph-compatible server.

The counters are process-global (the default registry), so every test
compares a scrape before with one after."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import timedelta
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from fakes import FakeMailSource, FetchCall, received_at
from helpers import WAIT, WorkerThread, quick_graph_settings, wait_for
from syncctl import cli
from syncctl.config import DatabaseTarget
from syncctl.db import Connection
from syncctl.fakegraph import FakeGraphServer
from syncctl.graph import GraphMailSource, GraphSettings
from syncctl.mailsource import MailSourceError, Window
from syncctl.metrics import metrics_served
from syncctl.operations import cancel_job
from syncctl.queue import claim_chunk
from syncctl.worker import WorkerOptions
from test_worker import chunks, job_status, new_job

TOKEN = "graph-token-metrics-7c1d"  # noqa: S105
# A lease far longer than any test: no lease runs out unless a test makes it.
OPTIONS = WorkerOptions(
    concurrency=2,
    lease=timedelta(seconds=30),
    poll_interval=timedelta(milliseconds=50),
    retry_base=timedelta(milliseconds=50),
)
# Every metric the worker and the Graph client publish, with its type.
PUBLISHED = {
    "syncctl_chunks_claimed_total": "counter",
    "syncctl_chunks_completed_total": "counter",
    "syncctl_chunks_failed_total": "counter",
    "syncctl_chunks_retried_total": "counter",
    "syncctl_chunks_reaped_total": "counter",
    "syncctl_chunks_released_total": "counter",
    "syncctl_lease_losses_total": "counter",
    "syncctl_messages_synced_total": "counter",
    "syncctl_graph_requests_total": "counter",
    "syncctl_graph_throttle_wait_seconds_total": "counter",
    "syncctl_claim_latency_seconds": "histogram",
    "syncctl_chunks_in_progress": "gauge",
}

Labels = frozenset[tuple[str, str]]


class Scrape:
    """One answer of /metrics: the declared metric types and every sample's value."""

    def __init__(self, text: str) -> None:
        self.types = {
            parts[2]: parts[3]
            for parts in (line.split() for line in text.splitlines())
            if len(parts) == 4 and parts[:2] == ["#", "TYPE"]
        }
        self.values: dict[tuple[str, Labels], float] = {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def value(self, name: str, **labels: str) -> float:
        """The sample's value; 0 for a labelled series not yet used."""
        return self.values.get((name, frozenset(labels.items())), 0.0)


def scrape(port: int) -> Scrape:
    answer = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10.0)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    return Scrape(answer.text)


def endpoint_answers(port: int) -> bool:
    try:
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5.0)
    except httpx.TransportError:
        return False
    return True


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def moved(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    return after.value(name, **labels) - before.value(name, **labels)


@pytest.fixture
def metrics_port() -> Iterator[int]:
    """A metrics endpoint of the test's own, for tests whose worker serves none."""
    with metrics_served(0, address="127.0.0.1") as served:
        yield served.port


@pytest.fixture
def start_worker(target: DatabaseTarget) -> Iterator[Callable[..., WorkerThread]]:
    """Start workers in threads; every one is stopped before the database is dropped."""
    started: list[WorkerThread] = []

    def start(source: FakeMailSource, options: WorkerOptions = OPTIONS) -> WorkerThread:
        started.append(WorkerThread(target, source, options))
        return started[-1]

    yield start
    for worker in started:
        worker.stop.set()
    for worker in started:
        worker.thread.join(WAIT)


def blocked_fetches(mailbox: str) -> tuple[threading.Event, threading.Event, Callable[..., None]]:
    """A before_fetch hook holding the mailbox's fetches until `release` is set;
    `entered` is set once one is held."""
    entered, release = threading.Event(), threading.Event()

    def hold(call: FetchCall) -> None:
        if call.mailbox == mailbox:
            entered.set()
            assert release.wait(WAIT), "the test never released the fetch"

    return entered, release, hold


# -- the worker -----------------------------------------------------------------


def test_worker_serves_every_metric_and_counts_claims_outcomes_and_messages(
    conn: Connection, start_worker: Callable[..., WorkerThread]
) -> None:
    good, gone = "good@example.com", "gone@example.com"
    source = FakeMailSource(
        {good: 2500, gone: 10},
        fetch_errors={gone: MailSourceError("fake: mailbox gone", permanent=True)},
    )
    transient_done = threading.Event()

    def fail_chunk_two_once(call: FetchCall) -> None:
        second_chunk = call.window.received_from == received_at(1000)
        if call.mailbox == good and second_chunk and not transient_done.is_set():
            transient_done.set()
            raise MailSourceError("fake: connection reset")

    source.before_fetch = fail_chunk_two_once
    port = free_port()
    worker = start_worker(source, replace(OPTIONS, metrics_port=port))
    wait_for(lambda: endpoint_answers(port), "the worker's metrics endpoint")
    before = scrape(port)
    assert {name: before.types.get(name) for name in PUBLISHED} == PUBLISHED

    good_job = new_job(conn, source, good, chunk_size=1000)
    gone_job = new_job(conn, source, gone, chunk_size=1000)
    assert len(chunks(conn, good_job)) == 3
    assert len(chunks(conn, gone_job)) == 1

    def finished() -> bool:
        now = scrape(port)
        return (
            moved(before, now, "syncctl_chunks_completed_total") == 3
            and moved(before, now, "syncctl_chunks_failed_total") == 1
            and moved(before, now, "syncctl_chunks_in_progress") == 0
        )

    wait_for(finished, "three chunks completed and one failed")
    after = scrape(port)
    assert (job_status(conn, good_job), job_status(conn, gone_job)) == ("completed", "failed")
    # Three chunks of one job plus a retry, and the other job's one chunk.
    assert moved(before, after, "syncctl_chunks_claimed_total") == 5
    assert moved(before, after, "syncctl_chunks_retried_total") == 1
    assert moved(before, after, "syncctl_messages_synced_total") == 2500
    for untouched in (
        "syncctl_chunks_reaped_total",
        "syncctl_chunks_released_total",
        "syncctl_lease_losses_total",
    ):
        assert moved(before, after, untouched) == 0, untouched
    # Every claim is timed, the ones that found nothing too.
    assert moved(before, after, "syncctl_claim_latency_seconds_count") >= 5
    assert moved(before, after, "syncctl_claim_latency_seconds_sum") > 0

    assert worker.finish() == 0
    assert not endpoint_answers(port), "the endpoint outlived its worker"


def test_reaped_chunks_lost_leases_and_chunks_in_progress_are_counted(
    conn: Connection, start_worker: Callable[..., WorkerThread], metrics_port: int
) -> None:
    dead, taken = "dead@example.com", "taken@example.com"
    source = FakeMailSource({dead: 10, taken: 10})
    dead_job = new_job(conn, source, dead, chunk_size=1000)
    abandoned = claim_chunk(conn, worker_id="dead-worker", lease=timedelta(milliseconds=100))
    assert abandoned is not None

    def lease_expired() -> bool:
        row = conn.execute("SELECT now() > %s AS expired", [abandoned.lease_expires_at]).fetchone()
        return bool(row and row["expired"])

    wait_for(lease_expired, "the dead worker's lease to expire")
    taken_job = new_job(conn, source, taken, chunk_size=1000)
    entered, release, hold = blocked_fetches(taken)
    source.before_fetch = hold
    before = scrape(metrics_port)

    worker = start_worker(source)
    wait_for(entered.is_set, "the worker to fetch the taken mailbox")
    wait_for(lambda: job_status(conn, dead_job) == "completed", "the reaped chunk to be synced")

    def counted(name: str, delta: float) -> Callable[[], bool]:
        return lambda: moved(before, scrape(metrics_port), name) == delta

    # Counted when it ends, then let go: one chunk in progress is left, the blocked one.
    wait_for(counted("syncctl_chunks_completed_total", 1), "the reaped chunk counted completed")
    wait_for(counted("syncctl_chunks_in_progress", 1), "only the blocked chunk in progress")
    during = scrape(metrics_port)
    assert moved(before, during, "syncctl_chunks_reaped_total") == 1

    cancel_job(conn, taken_job, reason="cancelled by the test")
    release.set()
    wait_for(counted("syncctl_lease_losses_total", 1), "the worker to notice the cancelled chunk")
    wait_for(counted("syncctl_chunks_in_progress", 0), "the cancelled chunk to be let go")
    after = scrape(metrics_port)
    assert moved(before, after, "syncctl_chunks_claimed_total") == 2
    assert moved(before, after, "syncctl_messages_synced_total") == 10
    assert moved(before, after, "syncctl_chunks_failed_total") == 0
    assert moved(before, after, "syncctl_chunks_retried_total") == 0
    assert worker.finish() == 0


def test_chunk_handed_back_on_shutdown_is_counted_released(
    conn: Connection, start_worker: Callable[..., WorkerThread], metrics_port: int
) -> None:
    mailbox = "long@example.com"
    source = FakeMailSource({mailbox: 2000})
    job_id = new_job(conn, source, mailbox, chunk_size=2000)
    entered, release, hold = blocked_fetches(mailbox)
    source.before_fetch = hold
    before = scrape(metrics_port)

    worker = start_worker(source)
    wait_for(entered.is_set, "the worker to fetch the first page")
    worker.stop.set()
    release.set()
    assert worker.finish() == 0

    after = scrape(metrics_port)
    # Handed back once: the slot sees the stop before it could claim the chunk again.
    assert moved(before, after, "syncctl_chunks_released_total") == 1
    assert moved(before, after, "syncctl_chunks_claimed_total") == 1
    assert moved(before, after, "syncctl_messages_synced_total") == 1000
    assert moved(before, after, "syncctl_chunks_completed_total") == 0
    assert moved(before, after, "syncctl_chunks_in_progress") == 0
    assert [c["status"] for c in chunks(conn, job_id)] == ["pending"]


# -- Graph ----------------------------------------------------------------------


def graph_settings(url: str, **changes: Any) -> GraphSettings:
    return quick_graph_settings(url, TOKEN, **changes)


def test_graph_requests_are_counted_by_status_and_throttling_waits_add_up(
    metrics_port: int,
) -> None:
    mailbox = "megan@contoso.com"
    with (
        FakeGraphServer({mailbox: 50}, token=TOKEN) as server,
        GraphMailSource(graph_settings(server.url)) as graph,
    ):
        server.fail_next(429, retry_after=0.2, code="TooManyRequests")
        before = scrape(metrics_port)
        page = graph.fetch_page(mailbox, Window(None, None), skip=0, top=100)
        after = scrape(metrics_port)

    assert len(page.messages) == 50
    requests = "syncctl_graph_requests_total"
    assert moved(before, after, requests, status="429") == 1
    assert moved(before, after, requests, status="200") == 1
    waited = moved(before, after, "syncctl_graph_throttle_wait_seconds_total", reason="retry_after")
    assert waited == pytest.approx(0.2)
    assert moved(before, after, "syncctl_graph_throttle_wait_seconds_total", reason="backoff") == 0


def test_graph_requests_without_an_answer_are_counted_as_errors(metrics_port: int) -> None:
    # Nothing listens there: the try is refused before any answer, and not
    # tried again (another try would find nothing listening either).
    nowhere = f"http://127.0.0.1:{free_port()}/v1.0"
    with GraphMailSource(graph_settings(nowhere, max_tries=2)) as graph:
        before = scrape(metrics_port)
        with pytest.raises(MailSourceError, match="Could not connect to Graph"):
            graph.count("megan@contoso.com", Window(None, None))
        after = scrape(metrics_port)

    assert moved(before, after, "syncctl_graph_requests_total", status="error") == 1
    assert moved(before, after, "syncctl_graph_throttle_wait_seconds_total", reason="backoff") == 0


# -- the command line -----------------------------------------------------------


def run_command(database_url: str, *args: str, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    """`syncctl run ARGS` in process, with a fake mail source; the exit code and stderr."""
    monkeypatch.setattr(cli, "_mail_source", lambda target, **_: FakeMailSource({}))
    result = CliRunner().invoke(cli.app, ["run", "--drain", *args, "--database-url", database_url])
    return result.exit_code, result.stderr


def test_run_refuses_a_metrics_port_already_in_use_and_claims_nothing(
    database_url: str, conn: Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = new_job(conn, FakeMailSource({"a@example.com": 10}), "a@example.com", chunk_size=10)
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))  # noqa: S104
        taken.listen()
        port = int(taken.getsockname()[1])

        code, stderr = run_command(
            database_url, "--metrics-port", str(port), monkeypatch=monkeypatch
        )

    assert code == 2
    [line] = stderr.strip().splitlines()
    assert line.startswith("syncctl: Cannot serve metrics on ")
    assert f":{port} " in line
    assert "--metrics-port" in line
    assert [c["status"] for c in chunks(conn, job_id)] == ["pending"]


@pytest.mark.parametrize("port", ["0", "-1", "65536"])
def test_run_refuses_a_metrics_port_out_of_range(
    database_url: str, port: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, stderr = run_command(database_url, f"--metrics-port={port}", monkeypatch=monkeypatch)

    assert code == 2
    assert stderr.strip() == f"syncctl: --metrics-port must be from 1 to 65535, not {port}."
