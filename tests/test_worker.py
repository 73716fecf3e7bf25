"""The worker loop against real PostgreSQL and the in-process fake mail source."""

from __future__ import annotations

import itertools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import pytest

import syncctl.worker as worker_module
from fakes import FakeMailSource, FetchCall, message_id, received_at
from helpers import WAIT, WorkerThread, quick_graph_settings, wait_for
from syncctl.chunkread import fetch, reader_for
from syncctl.config import DatabaseTarget
from syncctl.db import Connection
from syncctl.fakegraph import FakeGraphServer
from syncctl.graph import GraphMailSource, MailboxSlots
from syncctl.ingest import LeaseLost, write_page
from syncctl.jobs import add_store, create_job
from syncctl.mailsource import MailSourceError, Page, Window
from syncctl.operations import cancel_job
from syncctl.queue import Chunk, claim_chunk, finish_chunk, heartbeat, reap
from syncctl.worker import WorkerOptions, run_worker

# Tiny leases and backoffs keep every test fast.
FAST = WorkerOptions(
    lease=timedelta(seconds=1),
    drain=True,
    poll_interval=timedelta(milliseconds=50),
    retry_base=timedelta(milliseconds=50),
)


def options(**changes: Any) -> WorkerOptions:
    return replace(FAST, **changes)


@pytest.fixture
def start_worker(target: DatabaseTarget) -> Iterator[Callable[..., WorkerThread]]:
    """Start workers in threads; every one is stopped before the database is dropped."""
    started: list[WorkerThread] = []

    def start(source: FakeMailSource, opts: WorkerOptions = FAST) -> WorkerThread:
        running = WorkerThread(target, source, opts)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop.set()
    for running in started:
        running.thread.join(WAIT)


def new_job(
    conn: Connection,
    source: FakeMailSource,
    email: str,
    *,
    chunk_size: int,
    max_attempts: int = 3,
    received_from: datetime | None = None,
    parallel: int = 4,
) -> UUID:
    add_store(conn, name=email.split("@", maxsplit=1)[0], email=email)
    return create_job(
        conn,
        source,
        store_ref=email,
        chunk_size=chunk_size,
        max_attempts=max_attempts,
        received_from=received_from,
        parallel=parallel,
    ).job_id


def stored_ids(conn: Connection, email: str) -> list[str]:
    rows = conn.execute(
        "SELECT e.provider_message_id FROM emails e JOIN stores s ON s.id = e.store_id"
        " WHERE s.email = %s ORDER BY 1",
        [email],
    ).fetchall()
    return [r["provider_message_id"] for r in rows]


def chunks(conn: Connection, job_id: UUID) -> list[dict[str, Any]]:
    return conn.execute(
        "SELECT * FROM chunked_sync_jobs WHERE parent_sync_job_id = %s ORDER BY chunk_index",
        [job_id],
    ).fetchall()


def attempts(conn: Connection, job_id: UUID) -> list[dict[str, Any]]:
    return conn.execute(
        "SELECT c.chunk_index, a.attempt, a.worker_id, a.outcome, a.error, a.started_at,"
        "       a.finished_at"
        "  FROM chunk_attempts a JOIN chunked_sync_jobs c ON c.id = a.chunk_id"
        " WHERE c.parent_sync_job_id = %s ORDER BY a.id",
        [job_id],
    ).fetchall()


def job_status(conn: Connection, job_id: UUID) -> str:
    row = conn.execute("SELECT status FROM sync_queue WHERE id = %s", [job_id]).fetchone()
    assert row is not None
    return str(row["status"])


# -- order and exactly-once ---------------------------------------------------


@pytest.mark.parametrize(("workers", "parallel"), [(2, 1), (8, 1), (8, 3)])
def test_racing_workers_never_run_more_chunks_of_a_job_at_once_than_it_allows(
    workers: int,
    parallel: int,
    conn: Connection,
    make_conn: Callable[[], Connection],
    start_worker: Callable[..., WorkerThread],
) -> None:
    mailboxes = [f"racer{n}@example.com" for n in range(3)]
    # Three pages per chunk, each taking a moment, so overlapping chunks would overlap in time.
    source = FakeMailSource(dict.fromkeys(mailboxes, 200), max_page=10, page_delay=0.002)
    jobs = [new_job(conn, source, m, chunk_size=25, parallel=parallel) for m in mailboxes]

    sampler_conn = make_conn()
    most_at_once: list[int] = []
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            row = sampler_conn.execute(
                "SELECT coalesce(max(n), 0) AS most FROM ("
                " SELECT count(*) AS n FROM chunked_sync_jobs WHERE status = 'processing'"
                " GROUP BY parent_sync_job_id) per_job"
            ).fetchone()
            assert row is not None
            most_at_once.append(row["most"])

    sampler = threading.Thread(target=sample)
    sampler.start()
    running = [start_worker(source) for _ in range(workers)]
    try:
        assert [r.join() for r in running] == [0] * workers
    finally:
        sampling.set()
        sampler.join()

    assert 1 <= max(most_at_once) <= parallel
    assert all(1 <= source.max_in_flight[m] <= parallel for m in mailboxes)
    worker_ids = set()
    for job_id, mailbox in zip(jobs, mailboxes, strict=True):
        assert job_status(conn, job_id) == "completed"
        # Claimed lowest chunk first; with parallel 1 also completed in that order.
        claims = attempts(conn, job_id)
        assert [(a["chunk_index"], a["outcome"]) for a in claims] == [
            (i, "completed") for i in range(1, 9)
        ]
        if parallel == 1:
            by_completion = conn.execute(
                "SELECT chunk_index FROM chunked_sync_jobs WHERE parent_sync_job_id = %s"
                " ORDER BY completed_at",
                [job_id],
            ).fetchall()
            assert [r["chunk_index"] for r in by_completion] == list(range(1, 9))
        worker_ids |= {a["worker_id"] for a in claims}
        assert stored_ids(conn, mailbox) == [message_id(mailbox, i) for i in range(200)]
    assert len(worker_ids) >= 2, "the workers did not share the jobs"


def test_multi_chunk_job_stores_every_message_once_and_last_chunk_reads_to_window_end(
    conn: Connection, start_worker: Callable[..., WorkerThread]
) -> None:
    mailbox = "window@example.com"
    source = FakeMailSource({mailbox: 1100}, max_page=35)
    # The window starts at message 100: 1000 messages, 12 chunks of 90 (the last 10).
    job_id = new_job(conn, source, mailbox, chunk_size=90, received_from=received_at(100))
    assert len(chunks(conn, job_id)) == 12
    # Messages the count missed (Graph's counts are approximate) still fall in the window.
    source.mailboxes[mailbox] = 1250

    assert start_worker(source, options(concurrency=3)).join() == 0

    assert job_status(conn, job_id) == "completed"
    assert stored_ids(conn, mailbox) == [message_id(mailbox, i) for i in range(100, 1250)]
    rows = conn.execute(
        "SELECT DISTINCT sync_job_id FROM emails WHERE sync_job_id IS NOT NULL"
    ).fetchall()
    assert [r["sync_job_id"] for r in rows] == [job_id]
    last = chunks(conn, job_id)[-1]
    assert last["estimated_emails"] == 10
    assert last["emails_synced"] == 160


def test_offset_chunks_of_the_original_create_sync_chunks_are_read_whole(
    conn: Connection, start_worker: Callable[..., WorkerThread]
) -> None:
    # A job the original frontend planned: offsets, no windows, one chunk at a time.
    mailbox = "legacy@example.com"
    source = FakeMailSource({mailbox: 250}, max_page=40)
    store = add_store(conn, name="legacy", email=mailbox)
    row = conn.execute(
        "INSERT INTO sync_queue (business_id, store_id, sync_type, status, metadata)"
        " VALUES (%s, %s, 'initial', 'pending', '{\"chunk_size\": 100}') RETURNING id",
        [store["business_id"], store["id"]],
    ).fetchone()
    assert row is not None
    job_id = row["id"]
    conn.execute(
        "SELECT create_sync_chunks(p_parent_sync_job_id => %s, p_estimated_email_count => 250)",
        [job_id],
    )
    assert [(c["start_offset"], c["window_end"]) for c in chunks(conn, job_id)] == [
        (0, None),
        (100, None),
        (200, None),
    ]

    assert start_worker(source, options(concurrency=3)).join() == 0

    assert job_status(conn, job_id) == "completed"
    assert stored_ids(conn, mailbox) == sorted(message_id(mailbox, i) for i in range(250))
    assert [c["emails_synced"] for c in chunks(conn, job_id)] == [100, 100, 50]
    assert [a["chunk_index"] for a in attempts(conn, job_id)] == [1, 2, 3]


def die_after_one_page(
    conn: Connection, source: FakeMailSource, mailbox: str
) -> tuple[Chunk, Page]:
    """A worker claims the next chunk, writes its first page, and dies: no heartbeat, no finish."""
    dead = claim_chunk(conn, worker_id="dead-worker", lease=timedelta(milliseconds=300))
    assert dead is not None
    reader = reader_for(dead, Window(None, None))
    request = reader.next_request()
    assert request is not None
    page = fetch(source, mailbox, request)
    write_page(
        conn,
        dead,
        reader.advance(page),
        checkpoint=reader.checkpoint(),
        lease=timedelta(milliseconds=300),
    )
    return dead, page


@pytest.mark.parametrize("link", ["kept", "refused"])
def test_killed_workers_chunk_is_reaped_and_resumed_inside_its_window(
    link: str, conn: Connection, start_worker: Callable[..., WorkerThread]
) -> None:
    mailbox = "crash@example.com"
    source = FakeMailSource({mailbox: 100}, max_page=10)
    job_id = new_job(conn, source, mailbox, chunk_size=50, parallel=1)
    dead, page = die_after_one_page(conn, source, mailbox)
    assert dead.chunk_index == 1
    calls_before = len(source.calls)
    # A saved link Graph no longer takes: the chunk lists again from the last time it read.
    if link == "refused":
        source.expire_links()

    running = start_worker(source)
    assert running.join() == 0

    resumed = [c for c in source.calls[calls_before:] if c.window.received_to == dead.window_end]
    # Listed again from the time of message 9, the last read, whether or not Graph
    # still takes the saved link (it is never asked for): message 9 comes again
    # and is dropped, as it was read before.
    assert page.next_link is not None
    assert resumed[0].window == Window(received_at(9), dead.window_end)
    assert (resumed[0].position, resumed[0].next_link) == (0, None)
    assert [(a["chunk_index"], a["worker_id"], a["outcome"]) for a in attempts(conn, job_id)] == [
        (1, "dead-worker", "reaped"),
        (1, running.worker.worker_id, "completed"),
        (2, running.worker.worker_id, "completed"),
    ]
    first = chunks(conn, job_id)[0]
    assert (first["status"], first["attempts"], first["emails_synced"]) == ("completed", 2, 50)
    assert stored_ids(conn, mailbox) == [message_id(mailbox, i) for i in range(100)]


def test_zombie_workers_late_checkpoint_and_completion_are_refused(
    conn: Connection, make_conn: Callable[[], Connection]
) -> None:
    mailbox = "zombie@example.com"
    source = FakeMailSource({mailbox: 20})
    job_id = new_job(conn, source, mailbox, chunk_size=100)
    zombie = claim_chunk(conn, worker_id="zombie", lease=timedelta(milliseconds=200))
    assert zombie is not None
    wait_for(
        lambda: conn.execute("SELECT now() > %s AS expired", [zombie.lease_expires_at]).fetchone(),
        "the zombie's lease to expire",
    )
    wait_for(lambda: reap(conn), "the reaper to take the chunk back")
    live = claim_chunk(make_conn(), worker_id="live", lease=timedelta(minutes=1))
    assert live is not None
    assert live.id == zombie.id
    assert live.attempts == 2
    before = chunks(conn, job_id)[0]

    page = source.fetch_page(mailbox, Window(None, None), skip=0, top=20)
    with pytest.raises(LeaseLost):
        write_page(
            conn,
            zombie,
            page.messages,
            checkpoint={"next_link": None, "read": 20},
            lease=timedelta(minutes=1),
        )
    assert heartbeat(conn, zombie, lease=timedelta(minutes=1)) is None
    assert finish_chunk(conn, zombie, "completed") is None
    assert finish_chunk(conn, zombie, "error", error="late") is None

    assert chunks(conn, job_id)[0] == before
    assert before["status"] == "processing"
    assert before["worker_id"] == "live"
    assert before["checkpoint"] is None
    assert stored_ids(conn, mailbox) == []
    assert job_status(conn, job_id) == "processing"


def test_chunk_taken_away_mid_page_is_abandoned_without_writing(
    conn: Connection,
    start_worker: Callable[..., WorkerThread],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="syncctl.worker")
    mailbox = "cancelled@example.com"
    fetching, release = threading.Event(), threading.Event()

    def hold_first_page(call: FetchCall) -> None:
        fetching.set()
        release.wait(WAIT)

    source = FakeMailSource({mailbox: 50}, max_page=10, before_fetch=hold_first_page)
    job_id = new_job(conn, source, mailbox, chunk_size=100)
    running = start_worker(source)
    wait_for(fetching.is_set, "the worker to fetch its first page")

    cancel_job(conn, job_id, reason="operator cancelled")
    wait_for(
        lambda: any("lease was taken away" in r.getMessage() for r in caplog.records),
        "the heartbeat to notice the chunk is gone",
    )
    release.set()

    assert running.join() == 0
    assert len(source.calls) == 1
    chunk = chunks(conn, job_id)[0]
    assert (chunk["status"], chunk["checkpoint"], chunk["emails_synced"]) == ("cancelled", None, 0)
    assert stored_ids(conn, mailbox) == []


# -- retries, failures and roll-up ------------------------------------------------


def test_transient_errors_retry_after_a_backoff_and_then_succeed(
    conn: Connection,
    start_worker: Callable[..., WorkerThread],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="syncctl.worker")
    mailbox = "flaky@example.com"
    source = FakeMailSource({mailbox: 30}, transient_on_calls={1, 2})
    job_id = new_job(conn, source, mailbox, chunk_size=100, max_attempts=3)

    running = start_worker(
        source, options(worker_id="retry-worker", retry_base=timedelta(milliseconds=200))
    )
    assert running.join() == 0

    chunk = chunks(conn, job_id)[0]
    assert (chunk["status"], chunk["attempts"], chunk["last_error"]) == ("completed", 3, None)
    tries = attempts(conn, job_id)
    assert [(a["outcome"], a["error"]) for a in tries] == [
        ("retrying", "fake: transient failure on call 1"),
        ("retrying", "fake: transient failure on call 2"),
        ("completed", None),
    ]
    # The backoff is at least half of retry_base * 2^(attempt-1): 100 ms, then 200 ms.
    for earlier, later in itertools.pairwise(tries):
        assert later["started_at"] - earlier["finished_at"] >= timedelta(milliseconds=50)
    assert job_status(conn, job_id) == "completed"
    assert stored_ids(conn, mailbox) == [message_id(mailbox, i) for i in range(30)]
    retry_lines = [r.getMessage() for r in caplog.records if "will retry" in r.getMessage()]
    assert len(retry_lines) == 2
    assert all(
        line.startswith(f"job {job_id} chunk 1/1 store {mailbox} worker retry-worker: ")
        for line in retry_lines
    )


def test_attempts_running_out_leave_the_chunk_failed_with_its_last_error(
    conn: Connection, start_worker: Callable[..., WorkerThread]
) -> None:
    mailbox = "down@example.com"
    source = FakeMailSource(
        {mailbox: 30},
        fetch_errors={mailbox: MailSourceError("fake: service unavailable (503)\nretry later")},
    )
    job_id = new_job(conn, source, mailbox, chunk_size=100, max_attempts=2)

    assert start_worker(source).join() == 1

    chunk = chunks(conn, job_id)[0]
    assert (chunk["status"], chunk["attempts"]) == ("failed", 2)
    assert chunk["last_error"] == "fake: service unavailable (503)"
    assert [a["outcome"] for a in attempts(conn, job_id)] == ["retrying", "failed"]
    assert job_status(conn, job_id) == "failed"


def test_permanent_error_fails_the_chunk_at_once(
    conn: Connection, start_worker: Callable[..., WorkerThread]
) -> None:
    mailbox = "gone@example.com"
    source = FakeMailSource(
        {mailbox: 30},
        fetch_errors={mailbox: MailSourceError("fake: mailbox not found", permanent=True)},
    )
    job_id = new_job(conn, source, mailbox, chunk_size=100, max_attempts=3)

    assert start_worker(source).join() == 1

    chunk = chunks(conn, job_id)[0]
    assert (chunk["status"], chunk["attempts"]) == ("failed", 1)
    assert chunk["last_error"] == "fake: mailbox not found"
    assert len(source.calls) == 1
    assert job_status(conn, job_id) == "failed"


def test_mailbox_gone_fails_the_whole_job_at_once_with_one_reason(
    conn: Connection, start_worker: Callable[..., WorkerThread]
) -> None:
    mailbox = "deleted-user@example.com"
    reason = "Mailbox deleted-user@example.com was not found in Graph (404 ErrorInvalidUser)."
    source = FakeMailSource(
        {mailbox: 40}, fetch_errors={mailbox: MailSourceError(reason, whole_mailbox=True)}
    )
    job_id = new_job(conn, source, mailbox, chunk_size=10, max_attempts=3, parallel=1)

    assert start_worker(source).join() == 1

    assert len(source.calls) == 1  # one request told all there was to know
    assert [(c["status"], c["last_error"]) for c in chunks(conn, job_id)] == [
        ("failed", reason)
    ] * 4
    job = conn.execute("SELECT status, last_error FROM sync_queue WHERE id = %s", [job_id])
    assert job.fetchone() == {"status": "failed", "last_error": reason}


def test_unexpected_exception_is_a_chunk_error_with_a_one_line_message(
    conn: Connection, start_worker: Callable[..., WorkerThread]
) -> None:
    mailbox = "odd@example.com"
    source = FakeMailSource(
        {mailbox: 30},
        fetch_errors={mailbox: ValueError("bad receivedDateTime 'x'\n  raised deep inside")},
    )
    job_id = new_job(conn, source, mailbox, chunk_size=100, max_attempts=1)

    assert start_worker(source).join() == 1

    chunk = chunks(conn, job_id)[0]
    assert chunk["status"] == "failed"
    assert chunk["last_error"] == "ValueError: bad receivedDateTime 'x'"


def test_failed_middle_chunk_does_not_block_later_chunks_and_fails_the_job(
    conn: Connection, start_worker: Callable[..., WorkerThread]
) -> None:
    mailbox = "hole@example.com"

    def refuse_second_chunk(call: FetchCall) -> None:
        # The second chunk's window starts at message 20.
        if call.window.received_from == received_at(20):
            raise MailSourceError("fake: access denied", permanent=True)

    source = FakeMailSource({mailbox: 60}, max_page=10, before_fetch=refuse_second_chunk)
    job_id = new_job(conn, source, mailbox, chunk_size=20)

    assert start_worker(source).join() == 1

    assert [c["status"] for c in chunks(conn, job_id)] == ["completed", "failed", "completed"]
    assert job_status(conn, job_id) == "failed"
    expected = [message_id(mailbox, i) for i in [*range(20), *range(40, 60)]]
    assert stored_ids(conn, mailbox) == expected


# -- drain --------------------------------------------------------------------------


def test_drain_returns_0_at_once_on_an_empty_queue(
    start_worker: Callable[..., WorkerThread],
) -> None:
    assert start_worker(FakeMailSource({})).join() == 0


def test_drain_exits_on_a_pending_chunk_left_under_a_finished_job(
    conn: Connection, start_worker: Callable[..., WorkerThread]
) -> None:
    # An upgraded database can hold a pending chunk whose job is already
    # completed: it can never be claimed, so it is not work to wait for.
    source = FakeMailSource({"legacy@example.com": 3})
    job_id = new_job(conn, source, "legacy@example.com", chunk_size=1)
    conn.execute(
        "UPDATE sync_queue SET status = 'completed', claimable_at = NULL WHERE id = %s", [job_id]
    )

    assert start_worker(source).join() == 0
    assert stored_ids(conn, "legacy@example.com") == []


def test_drain_waits_for_a_chunk_in_retry_backoff(
    conn: Connection, start_worker: Callable[..., WorkerThread]
) -> None:
    mailbox = "backoff@example.com"
    source = FakeMailSource({mailbox: 30})
    job_id = new_job(conn, source, mailbox, chunk_size=100)
    # Another worker's attempt failed: the chunk waits out a backoff, pending.
    other = claim_chunk(conn, worker_id="other-worker", lease=timedelta(minutes=1))
    assert other is not None
    status = finish_chunk(
        conn, other, "error", error="boom", retry_base=timedelta(milliseconds=600)
    )
    assert status == "pending"
    waiting = conn.execute(
        "SELECT not_before > now() AS waits FROM chunked_sync_jobs WHERE id = %s", [other.id]
    ).fetchone()
    assert waiting is not None
    assert waiting["waits"]

    assert start_worker(source).join() == 0

    chunk = chunks(conn, job_id)[0]
    assert (chunk["status"], chunk["attempts"]) == ("completed", 2)
    assert stored_ids(conn, mailbox) == [message_id(mailbox, i) for i in range(30)]


# -- shutdown, lost connections, wake-ups ---------------------------------------------


def test_sigterm_releases_the_chunk_in_flight_without_using_an_attempt(
    conn: Connection, target: DatabaseTarget
) -> None:
    mailbox = "shutdown@example.com"
    fetching, release = threading.Event(), threading.Event()

    def hold_first_page(call: FetchCall) -> None:
        if call.number == 1:
            fetching.set()
            release.wait(WAIT)

    source = FakeMailSource({mailbox: 50}, max_page=10, before_fetch=hold_first_page)
    job_id = new_job(conn, source, mailbox, chunk_size=100)
    stop = threading.Event()

    def terminate_mid_page() -> None:
        if fetching.wait(WAIT):
            os.kill(os.getpid(), signal.SIGTERM)
            stop.wait(WAIT)  # the handler ran: let the page finish
        release.set()

    handler_before = signal.getsignal(signal.SIGTERM)
    timer = threading.Thread(target=terminate_mid_page)
    timer.start()
    try:
        result = run_worker(
            target, source, options(drain=False, lease=timedelta(seconds=5)), stop=stop
        )
    finally:
        release.set()
        timer.join()

    assert result == 0
    assert signal.getsignal(signal.SIGTERM) == handler_before
    chunk = chunks(conn, job_id)[0]
    assert (chunk["status"], chunk["attempts"], chunk["worker_id"]) == ("pending", 0, None)
    assert chunk["checkpoint"]["read"] == 10
    assert chunk["emails_synced"] == 10
    assert [a["outcome"] for a in attempts(conn, job_id)] == ["released"]
    assert len(source.calls) == 1, "the worker fetched another page after the signal"
    assert stored_ids(conn, mailbox) == [message_id(mailbox, i) for i in range(10)]


LONG_LEASE = timedelta(seconds=30)


@pytest.mark.parametrize("waiting_for", ["retry-after", "request-slot"])
def test_stop_while_waiting_on_graph_exits_within_seconds_and_uses_no_attempt(
    conn: Connection, target: DatabaseTarget, waiting_for: str
) -> None:
    mailbox = "throttled@example.com"
    # Graph answers every request 429, Retry-After 5 s, or another process
    # holds all four of the mailbox's request slots.
    throttle = 1.0 if waiting_for == "retry-after" else 0.0
    with FakeGraphServer({mailbox: 20}, throttle_rate=throttle, retry_after=5) as server:
        other_process = MailboxSlots(target, lease=60)
        holds = [other_process.hold(mailbox) for _ in range(4 if throttle == 0 else 0)]
        for hold in holds:
            hold.__enter__()
        settings = quick_graph_settings(server.url, server.token, max_tries=6, retry_after_cap=5)
        source = GraphMailSource(settings, slots=MailboxSlots(target, max_wait=600))
        try:
            job_id = new_job(conn, FakeMailSource({mailbox: 20}), mailbox, chunk_size=20)
            running = WorkerThread(target, source, options(drain=False, lease=LONG_LEASE))
            if throttle:
                wait_for(lambda: any(r.status == 429 for r in server.requests), what="a 429")
            else:
                wait_for(lambda: job_status(conn, job_id) == "processing", what="the claim")
            time.sleep(0.5)  # well into the wait
            stopped_at = time.monotonic()
            running.stop.set()
            running.thread.join(WAIT)
            took = time.monotonic() - stopped_at
        finally:
            for hold in holds:
                hold.__exit__(None, None, None)
            other_process.close()
            source.close()

    assert running.join() == 0
    assert took < 3, f"the worker took {took:.1f}s to stop"
    chunk = chunks(conn, job_id)[0]
    assert (chunk["status"], chunk["attempts"]) == ("pending", 0)
    assert [a["outcome"] for a in attempts(conn, job_id)] == ["released"]


def test_next_page_is_fetched_while_the_page_before_it_is_written(
    conn: Connection,
    start_worker: Callable[..., WorkerThread],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mailbox = "overlap@example.com"
    events: list[str] = []
    lock = threading.Lock()
    second_fetch_started = threading.Event()

    def record(event: str) -> None:
        with lock:
            events.append(event)

    def note_fetch(call: FetchCall) -> None:
        record(f"fetch {call.number}")
        if call.number == 2:
            second_fetch_started.set()

    def held_write(conn: Connection, chunk: Any, messages: Any, **kwargs: Any) -> None:
        read = kwargs["checkpoint"]["read"]
        record(f"write {read} starts")
        if read == 10:
            # A worker that fetches only after writing would never get here in time.
            assert second_fetch_started.wait(WAIT), "page 2 was not fetched during page 1's write"
        write_page(conn, chunk, messages, **kwargs)
        record(f"write {read} ends")

    monkeypatch.setattr(worker_module, "write_page", held_write)
    source = FakeMailSource({mailbox: 30}, max_page=10, before_fetch=note_fetch)
    job_id = new_job(conn, source, mailbox, chunk_size=100)

    assert start_worker(source).join() == 0

    assert events.index("fetch 2") < events.index("write 10 ends")
    assert events.index("fetch 3") < events.index("write 19 ends")
    # Pages are still written one after another, in order, each after its fetch.
    # Each page after the first lists again from the last message's second, whose
    # message is dropped: 10, then 9 new a page, then the last 2.
    writes = [e for e in events if e.startswith("write")]
    assert writes == [f"write {n} {edge}" for n in (10, 19, 28, 30) for edge in ("starts", "ends")]
    # At most one page ahead: page 3 is asked for only once page 1 is written.
    assert events.index("fetch 3") > events.index("write 10 ends")
    assert len(source.calls) == 4
    assert source.max_in_flight[mailbox] == 1
    chunk = chunks(conn, job_id)[0]
    assert (chunk["status"], chunk["checkpoint"]) == (
        "completed",
        {
            "next_link": None,
            "at_end": True,
            "read": 30,
            "received_through": received_at(29).isoformat(),
            "seen_at_through": [message_id(mailbox, 29)],
        },
    )
    assert stored_ids(conn, mailbox) == [message_id(mailbox, i) for i in range(30)]


def test_page_prefetched_when_the_worker_stops_is_not_written(
    conn: Connection,
    start_worker: Callable[..., WorkerThread],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mailbox = "prefetched@example.com"
    second_fetch_started, writing_first, stopped = (threading.Event() for _ in range(3))

    def hold_second_fetch(call: FetchCall) -> None:
        if call.number == 2:
            second_fetch_started.set()
            stopped.wait(WAIT)

    def held_write(conn: Connection, chunk: Any, messages: Any, **kwargs: Any) -> None:
        if kwargs["checkpoint"]["read"] == 10:
            assert second_fetch_started.wait(WAIT), "page 2 was not fetched during page 1's write"
            writing_first.set()
            stopped.wait(WAIT)
        write_page(conn, chunk, messages, **kwargs)

    monkeypatch.setattr(worker_module, "write_page", held_write)
    source = FakeMailSource({mailbox: 50}, max_page=10, before_fetch=hold_second_fetch)
    job_id = new_job(conn, source, mailbox, chunk_size=100)
    running = start_worker(source, options(lease=timedelta(seconds=5)))
    wait_for(writing_first.is_set, "the worker to write page 1 while page 2 is fetched")
    running.stop.set()
    stopped.set()

    assert running.join() == 0
    # One page beyond the last one written was fetched, and dropped.
    assert [(c.number, c.position, c.returned) for c in source.calls] == [(1, 0, 10), (2, 0, 10)]
    assert source.calls[1].window.received_from == received_at(9)
    chunk = chunks(conn, job_id)[0]
    assert (chunk["status"], chunk["attempts"]) == ("pending", 0)
    assert (chunk["checkpoint"]["read"], chunk["emails_synced"]) == (10, 10)
    assert [a["outcome"] for a in attempts(conn, job_id)] == ["released"]
    assert stored_ids(conn, mailbox) == [message_id(mailbox, i) for i in range(10)]


def test_worker_survives_losing_its_database_connections(
    conn: Connection,
    make_conn: Callable[[], Connection],
    start_worker: Callable[..., WorkerThread],
) -> None:
    mailbox = "outage@example.com"
    killer = make_conn()
    terminated: list[int] = []

    def terminate_worker_backends(call: FetchCall) -> None:
        if call.number == 5:
            rows = killer.execute(
                "SELECT pg_terminate_backend(pid) AS gone FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                "   AND application_name LIKE %s",
                ["syncctl outage-worker %"],
            ).fetchall()
            terminated.append(sum(1 for r in rows if r["gone"]))

    source = FakeMailSource({mailbox: 100}, max_page=10, before_fetch=terminate_worker_backends)
    job_id = new_job(conn, source, mailbox, chunk_size=25)

    running = start_worker(source, options(worker_id="outage-worker", concurrency=2))
    assert running.join() == 0

    # Two slots, the heartbeat, the reaper and the listener.
    assert terminated == [5]
    assert job_status(conn, job_id) == "completed"
    assert "reaped" in [a["outcome"] for a in attempts(conn, job_id)]
    assert stored_ids(conn, mailbox) == [message_id(mailbox, i) for i in range(100)]


def test_listening_worker_picks_up_a_new_job_long_before_its_poll_interval(
    conn: Connection, start_worker: Callable[..., WorkerThread]
) -> None:
    mailbox = "listen@example.com"
    source = FakeMailSource({mailbox: 20})
    running = start_worker(
        source,
        options(drain=False, poll_interval=timedelta(seconds=60), lease=timedelta(seconds=5)),
    )
    wait_for(running.worker.is_idle, "the worker to go idle")
    listeners = conn.execute(
        "SELECT query FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name = %s",
        [f"syncctl {running.worker.worker_id} listener"],
    ).fetchall()
    assert len(listeners) == 1
    assert listeners[0]["query"].endswith("LISTEN syncctl_chunks;")

    job_id = new_job(conn, source, mailbox, chunk_size=100)
    # Polling alone would take 60 s; a notification takes a moment.
    wait_for(lambda: job_status(conn, job_id) == "completed", "the job to complete", timeout=20)

    running.stop.set()
    assert running.join() == 0


def test_poll_only_worker_does_not_listen_and_still_picks_up_a_new_job(
    conn: Connection, start_worker: Callable[..., WorkerThread]
) -> None:
    mailbox = "poll@example.com"
    source = FakeMailSource({mailbox: 20})
    running = start_worker(
        source, options(drain=False, poll_only=True, poll_interval=timedelta(milliseconds=100))
    )
    wait_for(running.worker.is_idle, "the worker to go idle")
    listening = conn.execute(
        "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database()"
        " AND pid <> pg_backend_pid() AND query ILIKE %s",
        ["%listen syncctl_chunks%"],
    ).fetchone()
    assert listening is not None
    assert listening["n"] == 0

    job_id = new_job(conn, source, mailbox, chunk_size=100)
    wait_for(lambda: job_status(conn, job_id) == "completed", "the job to complete")

    running.stop.set()
    assert running.join() == 0
