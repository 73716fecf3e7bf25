"""The chunk lifecycle (sql/migrations/0002_queue_functions.sql through queue.py):
claim order, leases, fencing, retries, reaping, roll-up, and what a claim costs."""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

import psycopg
import pytest
from psycopg.types.json import Jsonb

from fakes import CountOnly
from helpers import wait_for
from syncctl.db import Connection
from syncctl.errors import BadInput
from syncctl.ingest import LeaseLost, write_page
from syncctl.jobs import add_store, create_job
from syncctl.operations import cancel_job, retry_job
from syncctl.queue import (
    Chunk,
    Outcome,
    claim_chunk,
    finish_chunk,
    heartbeat,
    queue_has_work,
    reap,
)
from test_ingest import message

LEASE = timedelta(seconds=30)
BLINK = timedelta(milliseconds=1)  # a lease or backoff that is over almost at once
RESET_STUCK = (
    Path(__file__).parent / "data" / "runbook" / "troubleshooting_2_reset_stuck_chunks.sql"
)

_mailboxes = itertools.count(1)
T = TypeVar("T")


def new_job(
    conn: Connection,
    *,
    chunks: int = 3,
    priority: int | None = 1,
    max_attempts: int = 3,
    age: timedelta = timedelta(0),
) -> UUID:
    """A job of `chunks` one-message chunks for a store of its own, created `age` ago."""
    n = next(_mailboxes)
    store = add_store(conn, name=f"store {n}", email=f"box{n}@example.com")
    job = conn.execute(
        "INSERT INTO sync_queue (store_id, priority, max_attempts, metadata, created_at)"
        " VALUES (%s, %s, %s, %s, now() - %s) RETURNING id",
        [store["id"], priority, max_attempts, Jsonb({"chunk_size": 1}), age],
    ).fetchone()
    assert job is not None
    conn.execute(
        "SELECT create_sync_chunks(p_parent_sync_job_id => %s, p_estimated_email_count => %s)",
        [job["id"], chunks],
    )
    return UUID(str(job["id"]))


def claim(conn: Connection, worker: str = "w1", lease: timedelta = LEASE) -> Chunk | None:
    return claim_chunk(conn, worker_id=worker, lease=lease)


def must(value: T | None) -> T:
    assert value is not None
    return value


def head(chunk: Chunk | None) -> tuple[UUID, int] | None:
    return (chunk.parent_sync_job_id, chunk.chunk_index) if chunk else None


def chunk_row(conn: Connection, chunk_id: UUID) -> dict[str, Any]:
    return must(
        conn.execute("SELECT * FROM chunked_sync_jobs WHERE id = %s", [chunk_id]).fetchone()
    )


def job_row(conn: Connection, job_id: UUID) -> dict[str, Any]:
    return must(conn.execute("SELECT * FROM sync_queue WHERE id = %s", [job_id]).fetchone())


def attempts_of(conn: Connection, chunk_id: UUID) -> list[dict[str, Any]]:
    return conn.execute(
        "SELECT attempt, worker_id, outcome, error, started_at, finished_at, duration_ms,"
        "       emails_synced"
        "  FROM chunk_attempts WHERE chunk_id = %s ORDER BY id",
        [chunk_id],
    ).fetchall()


def claim_expired(conn: Connection, worker: str) -> Chunk:
    """Claim with a lease that runs out at once, and wait (by the database clock) until it has."""
    chunk = must(claim(conn, worker, lease=BLINK))
    wait_for(
        lambda: bool(
            must(
                conn.execute(
                    "SELECT clock_timestamp() > %s AS over", [chunk.lease_expires_at]
                ).fetchone()
            )["over"]
        )
    )
    return chunk


def claim_after_backoff(conn: Connection, not_before: datetime, worker: str = "w1") -> Chunk:
    """Claim until the chunk comes back, checking each refusal happened inside its backoff."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with conn.transaction():
            now = must(conn.execute("SELECT now() AS now").fetchone())["now"]
            chunk = claim(conn, worker)
        if chunk is not None:
            assert now >= not_before
            return chunk
        assert now < not_before, "refused a chunk whose backoff was over"
        time.sleep(0.01)
    raise AssertionError("the chunk never came back after its backoff")


def run_reset_stuck_runbook(conn: Connection) -> int:
    """The reference's "Reset Stuck Chunks" UPDATE, run exactly as it is written."""
    # A fixture file of this repository, run as it is.
    return conn.execute(RESET_STUCK.read_text(encoding="utf-8")).rowcount


def make_stuck(conn: Connection, chunk: Chunk) -> None:
    """Processing for ten minutes: stuck, by the runbook's five-minute rule."""
    conn.execute(
        "UPDATE chunked_sync_jobs SET started_at = now() - interval '10 minutes' WHERE id = %s",
        [chunk.id],
    )


# --- claim order --------------------------------------------------------------------------


def test_claim_takes_the_lowest_chunk_and_leases_it(conn: Connection) -> None:
    job = new_job(conn, chunks=3)

    chunk = must(claim(conn, "w1"))

    assert (chunk.parent_sync_job_id, chunk.chunk_index, chunk.total_chunks) == (job, 1, 3)
    assert (chunk.worker_id, chunk.attempts) == ("w1", 1)
    row = chunk_row(conn, chunk.id)
    assert row["status"] == "processing"
    assert row["lease_expires_at"] - row["started_at"] == LEASE
    assert job_row(conn, job)["status"] == "processing"
    assert [(a["attempt"], a["worker_id"], a["outcome"]) for a in attempts_of(conn, chunk.id)] == [
        (1, "w1", "running")
    ]


def test_claim_skips_job_while_its_lower_chunk_is_processing(conn: Connection) -> None:
    new_job(conn, chunks=3)
    must(claim(conn, "w1"))

    assert claim(conn, "w2") is None


def test_claim_returns_the_chunks_of_a_job_in_order(conn: Connection) -> None:
    job = new_job(conn, chunks=4)
    order = []
    while (chunk := claim(conn)) is not None:
        order.append(head(chunk))
        finish_chunk(conn, chunk, "completed")

    assert order == [(job, 1), (job, 2), (job, 3), (job, 4)]
    assert job_row(conn, job)["status"] == "completed"


def test_failed_chunk_does_not_block_the_next(conn: Connection) -> None:
    job = new_job(conn, chunks=3)
    first = must(claim(conn))
    assert finish_chunk(conn, first, "permanent", error="mailbox not found") == "failed"

    second = must(claim(conn))
    assert head(second) == (job, 2)
    finish_chunk(conn, second, "completed")
    finish_chunk(conn, must(claim(conn)), "completed")

    assert job_row(conn, job)["status"] == "failed"


def test_claim_orders_jobs_by_priority_then_age(conn: Connection) -> None:
    low_new = new_job(conn, chunks=1, priority=1, age=timedelta(hours=3))
    high_new = new_job(conn, chunks=1, priority=5, age=timedelta(hours=1))
    low_old = new_job(conn, chunks=1, priority=1, age=timedelta(hours=5))
    high_old = new_job(conn, chunks=1, priority=5, age=timedelta(hours=2))
    unset = new_job(conn, chunks=1, priority=None, age=timedelta(days=9))

    order = [head(claim(conn, f"w{n}")) for n in range(6)]

    assert order == [
        (high_old, 1),
        (high_new, 1),
        (low_old, 1),
        (low_new, 1),
        (unset, 1),  # the original allowed no priority: after every job that has one
        None,
    ]


# --- parallel chunks, the watermark, fair claims ---------------------------------------


def window_job(conn: Connection, *, chunks: int, parallel: int = 4) -> UUID:
    """A job of `chunks` time-window chunks of one message each, as `syncctl create` makes."""
    n = next(_mailboxes)
    store = add_store(conn, name=f"store {n}", email=f"box{n}@example.com")
    created = create_job(
        conn, CountOnly(chunks), store_ref=store["email"], chunk_size=1, parallel=parallel
    )
    assert len(created.chunks) == chunks
    return created.job_id


def synced_through(conn: Connection, job_id: UUID) -> datetime | None:
    value: datetime | None = job_row(conn, job_id)["synced_through"]
    return value


def window_starts(conn: Connection, job_id: UUID) -> list[datetime | None]:
    rows = conn.execute(
        "SELECT window_start FROM chunked_sync_jobs WHERE parent_sync_job_id = %s"
        " ORDER BY chunk_index",
        [job_id],
    ).fetchall()
    return [row["window_start"] for row in rows]


def test_claim_runs_up_to_parallel_chunks_of_a_job_lowest_first(conn: Connection) -> None:
    job = window_job(conn, chunks=5, parallel=3)

    first, second, third = (must(claim(conn, f"w{n}")) for n in (1, 2, 3))

    assert [c.chunk_index for c in (first, second, third)] == [1, 2, 3]
    assert job_row(conn, job)["chunks_in_flight"] == 3
    assert claim(conn, "w4") is None
    finish_chunk(conn, second, "completed")
    assert head(claim(conn, "w4")) == (job, 4)
    finish_chunk(conn, first, "completed")
    assert head(claim(conn, "w5")) == (job, 5)
    assert claim(conn, "w6") is None


def test_chunk_in_backoff_holds_its_place_among_the_chunks_that_may_run(
    conn: Connection,
) -> None:
    job = window_job(conn, chunks=4, parallel=2)
    first, second = must(claim(conn)), must(claim(conn))
    finish_chunk(conn, first, "error", error="reset", retry_base=timedelta(hours=1))

    # Chunk 1 waits out its backoff and chunk 2 runs: chunk 3 is not among the first two.
    assert claim(conn) is None
    finish_chunk(conn, second, "completed")
    assert head(claim(conn)) == (job, 3)


def test_parallel_1_is_the_sequential_rule(conn: Connection) -> None:
    job = window_job(conn, chunks=3, parallel=1)

    first = must(claim(conn, "w1"))
    assert claim(conn, "w2") is None
    finish_chunk(conn, first, "completed")
    assert head(claim(conn, "w2")) == (job, 2)


def test_watermark_moves_in_order_while_chunks_finish_out_of_order(conn: Connection) -> None:
    job = window_job(conn, chunks=4)
    starts = window_starts(conn, job)
    chunks = {c.chunk_index: c for c in (must(claim(conn)) for _ in range(4))}
    assert synced_through(conn, job) is None

    seen = []
    for index in (3, 2, 1, 4):
        finish_chunk(conn, chunks[index], "completed")
        seen.append(synced_through(conn, job))

    # 3 and 2 done leave it where chunk 1 starts (nothing yet); 1 done carries it past 2
    # and 3 to where 4 starts; the last one, to the end of the job's window.
    assert seen == [None, None, starts[3], job_row(conn, job)["sync_to"]]
    assert job_row(conn, job)["status"] == "completed"


def test_watermark_stops_at_a_failed_chunk_and_never_moves_back(conn: Connection) -> None:
    job = window_job(conn, chunks=3)
    starts = window_starts(conn, job)
    first, second, third = (must(claim(conn)) for _ in range(3))
    finish_chunk(conn, first, "completed")
    assert synced_through(conn, job) == starts[1]

    finish_chunk(conn, second, "permanent", error="mailbox not found")
    finish_chunk(conn, third, "completed")

    assert synced_through(conn, job) == starts[1]
    assert job_row(conn, job)["status"] == "failed"
    # Hand-run SQL rewinding a chunk does not take the watermark back.
    conn.execute(
        "UPDATE chunked_sync_jobs SET status = 'pending', attempts = 0"
        " WHERE parent_sync_job_id = %s AND chunk_index = 1",
        [job],
    )
    conn.execute("UPDATE sync_queue SET status = 'pending' WHERE id = %s", [job])
    conn.execute("SELECT syncctl_refresh_job(%s)", [job])
    assert synced_through(conn, job) == starts[1]


def test_job_without_messages_is_synced_through_its_whole_window(conn: Connection) -> None:
    store = add_store(conn, name="empty", email="empty@example.com")
    job = create_job(conn, CountOnly(0), store_ref=store["email"]).job_id

    row = job_row(conn, job)
    assert (row["status"], row["synced_through"]) == ("completed", row["sync_to"])


def test_one_slot_serves_the_jobs_of_equal_priority_in_turn(conn: Connection) -> None:
    a = window_job(conn, chunks=5)
    b = window_job(conn, chunks=1)
    c = window_job(conn, chunks=2)
    names = {a: "A", b: "B", c: "C"}

    order = []
    while (chunk := claim(conn)) is not None:
        order.append(f"{names[chunk.parent_sync_job_id]}{chunk.chunk_index}")
        finish_chunk(conn, chunk, "completed")

    assert order == ["A1", "B1", "C1", "A2", "C2", "A3", "A4", "A5"]


def test_claim_prefers_the_job_with_fewer_chunks_in_flight(conn: Connection) -> None:
    older = window_job(conn, chunks=3)
    newer = window_job(conn, chunks=3)

    order = [head(claim(conn, f"w{n}")) for n in range(4)]

    assert order == [(older, 1), (newer, 1), (older, 2), (newer, 2)]


def test_priority_comes_before_chunks_in_flight(conn: Connection) -> None:
    low = window_job(conn, chunks=2)
    high = window_job(conn, chunks=3, parallel=2)
    conn.execute("UPDATE sync_queue SET priority = 5 WHERE id = %s", [high])

    order = [head(claim(conn, f"w{n}")) for n in range(4)]

    # The high-priority job runs as many chunks as it may before the other gets one.
    assert order == [(high, 1), (high, 2), (low, 1), (low, 2)]


def test_store_cannot_have_two_active_jobs(conn: Connection) -> None:
    job = new_job(conn, chunks=1)
    store_id = job_row(conn, job)["store_id"]

    # Reopening a finished job beside an active one is refused by the index.
    finish_chunk(conn, must(claim(conn)), "completed")
    newer = new_job_for_store(conn, store_id)
    with pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute("UPDATE sync_queue SET status = 'pending' WHERE id = %s", [job])
    assert job_row(conn, newer)["status"] == "pending"


def new_job_for_store(conn: Connection, store_id: UUID) -> UUID:
    row = conn.execute(
        "INSERT INTO sync_queue (store_id) VALUES (%s) RETURNING id", [store_id]
    ).fetchone()
    assert row is not None
    return UUID(str(row["id"]))


def test_a_second_parent_inserted_for_a_store_supersedes_its_active_job(
    conn: Connection,
) -> None:
    # The original frontend's createSyncJob, when a user reconnects mid-sync.
    job = new_job(conn, chunks=2)
    held = must(claim(conn, "w1"))
    store_id = job_row(conn, job)["store_id"]

    newer = new_job_for_store(conn, store_id)

    old = job_row(conn, job)
    assert old["status"] == "cancelled"
    assert old["last_error"] == f"superseded by job {newer}, inserted for the same store"
    assert {chunk_row(conn, c["id"])["status"] for c in chunks_of_job(conn, job)} == {"cancelled"}
    assert [a["outcome"] for a in attempts_of(conn, held.id)] == ["cancelled"]
    assert finish_chunk(conn, held, "completed") is None  # its worker is fenced out
    assert job_row(conn, newer)["status"] == "pending"


def chunks_of_job(conn: Connection, job_id: UUID) -> list[dict[str, Any]]:
    return conn.execute(
        "SELECT id FROM chunked_sync_jobs WHERE parent_sync_job_id = %s", [job_id]
    ).fetchall()


def test_syncctl_create_still_refuses_a_store_with_an_active_job(conn: Connection) -> None:
    job = new_job(conn, chunks=1)
    store = conn.execute(
        "SELECT s.email FROM stores s JOIN sync_queue q ON q.store_id = s.id WHERE q.id = %s",
        [job],
    ).fetchone()
    assert store is not None

    with pytest.raises(BadInput, match="already has a pending job"):
        create_job(conn, CountOnly(10), store_ref=store["email"])

    assert job_row(conn, job)["status"] == "pending"


def test_claim_never_skips_a_locked_job_head_to_its_sibling(
    conn: Connection, make_conn: Callable[[], Connection]
) -> None:
    older = new_job(conn, chunks=3, age=timedelta(hours=1))
    newer = new_job(conn, chunks=3)
    holder = make_conn()

    with holder.transaction():
        # Another worker is in the middle of finishing a chunk of the older job.
        holder.execute("SELECT id FROM sync_queue WHERE id = %s FOR UPDATE", [older])
        assert head(claim(conn, "w1")) == (newer, 1)
        assert claim(conn, "w2") is None  # never chunk 2 of either job

    assert head(claim(conn, "w3")) == (older, 1)


def test_claim_waits_for_a_locked_head_chunk_rather_than_take_its_sibling(
    conn: Connection, make_conn: Callable[[], Connection]
) -> None:
    job = new_job(conn, chunks=3)
    first_id = must(
        conn.execute(
            "SELECT id FROM chunked_sync_jobs WHERE parent_sync_job_id = %s AND chunk_index = 1",
            [job],
        ).fetchone()
    )["id"]
    holder, claimer = make_conn(), make_conn()
    claimed: list[Chunk | None] = []

    with holder.transaction():
        # Hand-run SQL holding the head chunk itself, not its job.
        holder.execute("SELECT id FROM chunked_sync_jobs WHERE id = %s FOR UPDATE", [first_id])
        thread = threading.Thread(target=lambda: claimed.append(claim(claimer, "w1")))
        thread.start()
        wait_for(
            lambda: (
                must(
                    holder.execute(
                        "SELECT count(*) AS n FROM pg_stat_activity"
                        " WHERE wait_event_type = 'Lock' AND datname = current_database()"
                    ).fetchone()
                )["n"]
                > 0
            )
        )
    thread.join(timeout=30)

    assert [head(c) for c in claimed] == [(job, 1)]


def test_claim_fails_an_exhausted_head_left_pending_and_takes_the_next(
    conn: Connection,
) -> None:
    job = new_job(conn, chunks=2, max_attempts=2)
    # Put back to pending by hand after its last attempt.
    conn.execute(
        "UPDATE chunked_sync_jobs SET attempts = 2 WHERE parent_sync_job_id = %s"
        " AND chunk_index = 1",
        [job],
    )

    assert head(claim(conn)) == (job, 2)
    first = conn.execute(
        "SELECT status, last_error FROM chunked_sync_jobs WHERE parent_sync_job_id = %s"
        " AND chunk_index = 1",
        [job],
    ).fetchone()
    assert first is not None
    assert first["status"] == "failed"
    assert "no attempts left" in first["last_error"]


def test_claim_does_not_trust_a_stale_claimable_job(conn: Connection) -> None:
    job = new_job(conn, chunks=2)
    chunk = must(claim(conn, "w1"))
    # A job marked claimable by hand while its chunk 1 is processing.
    conn.execute("UPDATE sync_queue SET claimable_at = now() WHERE id = %s", [job])

    assert claim(conn, "w2") is None

    assert job_row(conn, job)["claimable_at"] is None
    assert chunk_row(conn, chunk.id)["worker_id"] == "w1"


def test_concurrent_claims_keep_each_job_sequential(
    conn: Connection, make_conn: Callable[[], Connection]
) -> None:
    jobs = [new_job(conn, chunks=6) for _ in range(4)]
    connections = [make_conn() for _ in range(8)]
    claimed: dict[UUID, list[int]] = {job: [] for job in jobs}
    violations: list[str] = []
    failures: list[BaseException] = []
    lock = threading.Lock()

    def worker(n: int, db: Connection) -> None:
        try:
            while queue_has_work(db):
                chunk = claim(db, f"w{n}")
                if chunk is None:
                    time.sleep(0.002)
                    continue
                with lock:
                    claimed[chunk.parent_sync_job_id].append(chunk.chunk_index)
                state = must(
                    db.execute(
                        "SELECT count(*) FILTER (WHERE status = 'processing') AS running,"
                        "       min(chunk_index) FILTER (WHERE status IN ('pending', 'processing'))"
                        "         AS lowest"
                        "  FROM chunked_sync_jobs WHERE parent_sync_job_id = %s",
                        [chunk.parent_sync_job_id],
                    ).fetchone()
                )
                if (state["running"], state["lowest"]) != (1, chunk.chunk_index):
                    violations.append(f"{chunk}: {state}")
                finish_chunk(db, chunk, "completed")
        except BaseException as exc:  # reported by the assertion below
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=pair) for pair in enumerate(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert failures == []
    assert violations == []
    assert claimed == {job: [1, 2, 3, 4, 5, 6] for job in jobs}
    assert {job_row(conn, job)["status"] for job in jobs} == {"completed"}


# --- leases and fencing ---------------------------------------------------------------------


def test_heartbeat_extends_the_lease_and_is_refused_once_reaped(conn: Connection) -> None:
    new_job(conn, chunks=1)
    chunk = must(claim(conn, "w1", lease=timedelta(seconds=10)))

    extended = heartbeat(conn, chunk, lease=timedelta(minutes=10))

    assert extended is not None
    assert extended > chunk.lease_expires_at
    assert chunk_row(conn, chunk.id)["lease_expires_at"] == extended

    conn.execute(
        "UPDATE chunked_sync_jobs SET lease_expires_at = now() - interval '1 second' WHERE id = %s",
        [chunk.id],
    )
    assert [r.chunk_id for r in reap(conn)] == [chunk.id]
    assert heartbeat(conn, chunk, lease=LEASE) is None

    successor = must(claim(conn, "w2"))
    assert heartbeat(conn, chunk, lease=LEASE) is None
    assert heartbeat(conn, successor, lease=LEASE) is not None


@pytest.mark.parametrize("outcome", ["completed", "error", "permanent", "released"])
def test_worker_that_lost_the_chunk_cannot_finish_or_checkpoint_it(
    conn: Connection, outcome: Outcome
) -> None:
    new_job(conn, chunks=2)
    lost = claim_expired(conn, "w1")
    reap(conn)
    holder = must(claim(conn, "w2"))
    assert holder.id == lost.id
    before = chunk_row(conn, lost.id)

    assert finish_chunk(conn, lost, outcome, error="late") is None
    with pytest.raises(LeaseLost):
        write_page(conn, lost, [], checkpoint={"next_link": "stale"}, lease=LEASE)

    assert chunk_row(conn, lost.id) == before
    assert finish_chunk(conn, holder, "completed") == "completed"


def test_same_worker_with_an_older_attempt_is_fenced_out(conn: Connection) -> None:
    new_job(conn, chunks=1)
    first = claim_expired(conn, "w1")
    reap(conn)
    second = must(claim(conn, "w1"))  # the same worker id, restarted
    assert (second.id, second.attempts) == (first.id, 2)
    before = chunk_row(conn, first.id)

    assert heartbeat(conn, first, lease=LEASE) is None
    assert finish_chunk(conn, first, "completed") is None

    assert chunk_row(conn, first.id) == before
    assert finish_chunk(conn, second, "completed") == "completed"


def test_a_claim_made_again_with_the_same_worker_and_attempt_fences_out_the_first(
    conn: Connection,
) -> None:
    # Two slots of one process share a worker id; cancel then retry resets the
    # attempts, so the second claim has the worker id and attempt of the first.
    job = new_job(conn, chunks=1)
    first = must(claim(conn, "host:1"))
    cancel_job(conn, job)
    retry_job(conn, job)
    second = must(claim(conn, "host:1"))
    assert (second.id, second.worker_id, second.attempts) == (
        first.id,
        first.worker_id,
        first.attempts,
    )
    before = chunk_row(conn, first.id)

    assert heartbeat(conn, first, lease=LEASE) is None
    with pytest.raises(LeaseLost):
        write_page(conn, first, [], checkpoint={"read": 1000}, lease=LEASE)
    assert finish_chunk(conn, first, "completed") is None

    assert chunk_row(conn, first.id) == before
    assert heartbeat(conn, second, lease=LEASE) is not None
    assert finish_chunk(conn, second, "completed") == "completed"


def test_each_attempt_records_the_messages_it_added(conn: Connection) -> None:
    new_job(conn, chunks=1, max_attempts=3)
    first = must(claim(conn, "w1"))
    write_page(conn, first, [message(1), message(2)], checkpoint={"read": 2}, lease=LEASE)
    finish_chunk(conn, first, "error", error="connection reset", retry_base=BLINK)
    second = claim_after_backoff(conn, chunk_row(conn, first.id)["not_before"], "w2")
    write_page(conn, second, [message(3)], checkpoint={"read": 3}, lease=LEASE)
    conn.execute(
        "UPDATE chunked_sync_jobs SET lease_expires_at = now() - interval '1 second' WHERE id = %s",
        [second.id],
    )
    reap(conn)
    third = must(claim(conn, "w3"))
    write_page(conn, third, [message(4), message(5)], checkpoint={"read": 5}, lease=LEASE)
    finish_chunk(conn, third, "completed")

    rows = attempts_of(conn, first.id)
    assert [(r["outcome"], r["emails_synced"]) for r in rows] == [
        ("retrying", 2),
        ("reaped", 1),
        ("completed", 2),
    ]
    assert chunk_row(conn, first.id)["emails_synced"] == 5


def test_reap_skips_a_chunk_locked_by_another_session_instead_of_waiting(
    conn: Connection, make_conn: Callable[[], Connection]
) -> None:
    new_job(conn, chunks=1)
    chunk = claim_expired(conn, "w1")
    # A session that locked the chunk and vanished before committing.
    vanished = make_conn()
    vanished.execute("BEGIN")
    vanished.execute("SELECT 1 FROM chunked_sync_jobs WHERE id = %s FOR UPDATE", [chunk.id])
    reaper = make_conn()
    reaper.execute("SET statement_timeout = '5s'")

    assert reap(reaper) == []  # returned at once, the chunk left for the next pass
    assert chunk_row(conn, chunk.id)["status"] == "processing"

    vanished.execute("ROLLBACK")
    assert [r.chunk_id for r in reap(reaper)] == [chunk.id]


# --- retries ------------------------------------------------------------------------------


def test_error_retries_with_exponential_backoff_then_fails(conn: Connection) -> None:
    base = timedelta(milliseconds=50)
    job = new_job(conn, chunks=1, max_attempts=3)
    chunk = must(claim(conn))

    for attempt in (1, 2):
        assert chunk.attempts == attempt
        assert finish_chunk(conn, chunk, "error", error="timeout", retry_base=base) == "pending"
        row = chunk_row(conn, chunk.id)
        full = base * 2 ** (attempt - 1)
        assert full / 2 <= row["not_before"] - row["updated_at"] <= full
        assert row["last_error"] == "timeout"
        assert job_row(conn, job)["claimable_at"] == row["not_before"]
        chunk = claim_after_backoff(conn, row["not_before"])

    assert finish_chunk(conn, chunk, "error", error="timeout again", retry_base=base) == "failed"
    row = chunk_row(conn, chunk.id)
    assert (row["status"], row["attempts"], row["last_error"]) == ("failed", 3, "timeout again")
    assert row["completed_at"] is not None
    assert job_row(conn, job)["status"] == "failed"


def test_backoff_is_jittered_within_half_to_full_delay(conn: Connection) -> None:
    base = timedelta(seconds=10)
    for _ in range(12):
        new_job(conn, chunks=1)
    ratios = []
    while (chunk := claim(conn)) is not None:
        finish_chunk(conn, chunk, "error", error="flaky", retry_base=base)
        row = chunk_row(conn, chunk.id)
        ratios.append((row["not_before"] - row["updated_at"]) / base)

    assert len(ratios) == 12
    assert all(0.5 <= ratio <= 1 for ratio in ratios)
    assert len(set(ratios)) > 1  # spread out, not one thundering herd


def test_claim_does_not_return_a_chunk_before_its_backoff_ends(conn: Connection) -> None:
    new_job(conn, chunks=2)
    chunk = must(claim(conn))
    finish_chunk(conn, chunk, "error", error="throttled", retry_base=timedelta(minutes=1))

    # Chunk 2 waits behind it too: the sequential rule holds through the backoff.
    assert claim(conn, "w2") is None
    assert chunk_row(conn, chunk.id)["status"] == "pending"


def test_permanent_error_fails_at_once(conn: Connection) -> None:
    job = new_job(conn, chunks=1, max_attempts=5)
    chunk = must(claim(conn))

    assert finish_chunk(conn, chunk, "permanent", error="mailbox not found") == "failed"

    row = chunk_row(conn, chunk.id)
    assert (row["status"], row["attempts"], row["last_error"]) == (
        "failed",
        1,
        "mailbox not found",
    )
    assert row["not_before"] is None
    assert job_row(conn, job)["status"] == "failed"


def test_released_chunk_is_pending_again_without_using_an_attempt(conn: Connection) -> None:
    new_job(conn, chunks=2, max_attempts=1)
    chunk = must(claim(conn, "w1"))

    assert finish_chunk(conn, chunk, "released") == "pending"

    row = chunk_row(conn, chunk.id)
    assert (row["status"], row["attempts"], row["worker_id"], row["not_before"]) == (
        "pending",
        0,
        None,
        None,
    )
    # Its only attempt was given back, so it runs again at once on that attempt;
    # the attempt rows keep numbering the chunk's attempts, never one number twice.
    again = must(claim(conn, "w2"))
    assert (again.id, again.attempts) == (chunk.id, 1)
    assert [(a["attempt"], a["worker_id"], a["outcome"]) for a in attempts_of(conn, chunk.id)] == [
        (1, "w1", "released"),
        (2, "w2", "running"),
    ]
    assert finish_chunk(conn, chunk, "completed") is None  # w1's hand-back was final


# --- reaping ------------------------------------------------------------------------------


def test_reap_returns_expired_chunk_to_pending_when_attempts_are_left(conn: Connection) -> None:
    job = new_job(conn, chunks=2)
    chunk = claim_expired(conn, "w1")
    assert claim(conn, "w2") is None  # still held until reaped

    reaped = reap(conn)

    assert [(r.chunk_id, r.job_id, r.worker_id, r.new_status) for r in reaped] == [
        (chunk.id, job, "w1", "pending")
    ]
    row = chunk_row(conn, chunk.id)
    assert (row["status"], row["attempts"], row["worker_id"], row["lease_expires_at"]) == (
        "pending",
        1,
        None,
        None,
    )
    assert "w1 stopped heartbeating" in row["last_error"]
    assert head(claim(conn, "w2")) == (job, 1)


def test_reap_fails_expired_chunk_with_no_attempts_left(conn: Connection) -> None:
    job = new_job(conn, chunks=1, max_attempts=1)
    chunk = claim_expired(conn, "w1")

    assert [r.new_status for r in reap(conn)] == ["failed"]

    row = chunk_row(conn, chunk.id)
    assert row["status"] == "failed"
    assert "lease expired" in row["last_error"]
    assert "none left" in row["last_error"]
    assert job_row(conn, job)["status"] == "failed"


def test_reap_dry_run_lists_without_changing(conn: Connection) -> None:
    new_job(conn, chunks=1)
    chunk = claim_expired(conn, "w1")

    listed = reap(conn, dry_run=True)

    assert [(r.chunk_id, r.new_status) for r in listed] == [(chunk.id, "pending")]
    assert chunk_row(conn, chunk.id)["status"] == "processing"


def test_reap_leaves_live_leases_alone_unless_started_before_the_cutoff(conn: Connection) -> None:
    new_job(conn, chunks=1)
    chunk = must(claim(conn, "w1"))
    assert reap(conn) == []

    cutoff = must(conn.execute("SELECT clock_timestamp() AS t").fetchone())["t"]
    reaped = reap(conn, started_before=cutoff, reason="reset by operator")

    assert [(r.chunk_id, r.new_status) for r in reaped] == [(chunk.id, "pending")]
    assert chunk_row(conn, chunk.id)["last_error"] == "reset by operator"
    assert finish_chunk(conn, chunk, "completed") is None


def test_reap_takes_back_a_processing_chunk_that_has_no_lease(conn: Connection) -> None:
    new_job(conn, chunks=1)
    chunk = must(claim(conn, "w1"))
    # As hand-run SQL or an old caller can leave it: processing, no lease, started long ago.
    conn.execute(
        "UPDATE chunked_sync_jobs SET lease_expires_at = NULL,"
        " started_at = now() - interval '10 minutes' WHERE id = %s",
        [chunk.id],
    )

    assert [r.chunk_id for r in reap(conn)] == [chunk.id]
    assert "no lease" in chunk_row(conn, chunk.id)["last_error"]


def test_reap_repairs_a_job_reset_by_the_runbook_update(conn: Connection) -> None:
    job = new_job(conn, chunks=2)
    chunk = must(claim(conn, "w1"))
    make_stuck(conn, chunk)

    assert run_reset_stuck_runbook(conn) == 1
    assert claim(conn, "w2") is None  # the raw reset left the job unclaimable

    reap(conn)

    again = must(claim(conn, "w2"))
    assert (head(again), again.attempts) == ((job, 1), 2)
    assert [(a["attempt"], a["outcome"]) for a in attempts_of(conn, chunk.id)] == [
        (1, "reaped"),
        (2, "running"),
    ]
    assert finish_chunk(conn, chunk, "completed") is None


def test_runbook_reset_after_the_last_attempt_fails_the_chunk(conn: Connection) -> None:
    job = new_job(conn, chunks=2, max_attempts=1)
    chunk = must(claim(conn, "w1"))
    make_stuck(conn, chunk)
    run_reset_stuck_runbook(conn)

    reap(conn)

    row = chunk_row(conn, chunk.id)
    assert row["status"] == "failed"
    assert "no attempts left" in row["last_error"]
    assert head(claim(conn, "w2")) == (job, 2)


def test_reap_never_revives_a_cancelled_job(conn: Connection) -> None:
    job = new_job(conn, chunks=2)
    chunk = must(claim(conn, "w1"))
    cancel_job(conn, job, reason="operator")
    store_id = job_row(conn, job)["store_id"]
    conn.execute("INSERT INTO sync_queue (store_id) VALUES (%s)", [store_id])
    # Hand-run SQL puts the cancelled job's chunk back to processing, long expired.
    conn.execute(
        "UPDATE chunked_sync_jobs SET status = 'processing',"
        " lease_expires_at = now() - interval '1 minute' WHERE id = %s",
        [chunk.id],
    )

    reap(conn)

    assert job_row(conn, job)["status"] == "cancelled"
    assert job_row(conn, job)["claimable_at"] is None
    assert claim(conn, "w2") is None


# --- history and roll-up ------------------------------------------------------------------


def test_job_cancelled_then_retried_for_one_chunk_rolls_up_cancelled(conn: Connection) -> None:
    job = new_job(conn, chunks=2)
    cancel_job(conn, job, reason="operator")
    retry_job(conn, job, chunk_index=1)
    chunk = must(claim(conn))

    assert finish_chunk(conn, chunk, "completed") == "completed"

    # Chunk 2 is still cancelled: the job did not copy its whole window.
    assert job_row(conn, job)["status"] == "cancelled"
    retry_job(conn, job)
    assert finish_chunk(conn, must(claim(conn)), "completed") == "completed"
    assert job_row(conn, job)["status"] == "completed"


def test_chunk_attempts_record_every_attempt(conn: Connection) -> None:
    new_job(conn, chunks=1, max_attempts=3)
    first = must(claim(conn, "w1"))
    finish_chunk(conn, first, "error", error="connection reset", retry_base=BLINK)
    second = claim_after_backoff(conn, chunk_row(conn, first.id)["not_before"], "w2")
    conn.execute(
        "UPDATE chunked_sync_jobs SET lease_expires_at = now() - interval '1 second' WHERE id = %s",
        [second.id],
    )
    reap(conn)
    third = must(claim(conn, "w3"))
    finish_chunk(conn, third, "completed", processing_time_ms=1500)

    rows = attempts_of(conn, first.id)
    assert [(r["attempt"], r["worker_id"], r["outcome"], r["error"]) for r in rows] == [
        (1, "w1", "retrying", "connection reset"),
        (2, "w2", "reaped", "lease expired"),
        (3, "w3", "completed", None),
    ]
    for row in rows:
        assert row["finished_at"] >= row["started_at"]
        assert row["duration_ms"] is not None
        assert row["duration_ms"] >= 0
    assert chunk_row(conn, first.id)["processing_time_ms"] == 1500


@pytest.mark.parametrize(
    ("outcome", "rolled_up"), [("completed", "completed"), ("permanent", "failed")]
)
def test_parent_rolls_up_in_the_same_transaction_as_the_last_chunk(
    conn: Connection, make_conn: Callable[[], Connection], outcome: Outcome, rolled_up: str
) -> None:
    job = new_job(conn, chunks=1)
    chunk = must(claim(conn))
    observer = make_conn()

    with conn.transaction():
        finish_chunk(conn, chunk, outcome)
        assert job_row(conn, job)["status"] == rolled_up
        assert job_row(observer, job)["status"] == "processing"  # not committed yet

    assert job_row(observer, job)["status"] == rolled_up
    assert job_row(observer, job)["completed_at"] is not None


def test_job_with_no_messages_completes_at_once_with_no_chunks(conn: Connection) -> None:
    job = new_job(conn, chunks=0)

    assert job_row(conn, job)["status"] == "completed"
    assert conn.execute(
        "SELECT count(*) AS n FROM chunked_sync_jobs WHERE parent_sync_job_id = %s", [job]
    ).fetchone() == {"n": 0}
    assert claim(conn) is None


def test_queue_has_work_while_any_chunk_is_pending_or_processing(conn: Connection) -> None:
    assert not queue_has_work(conn)
    new_job(conn, chunks=1)
    assert queue_has_work(conn)
    chunk = must(claim(conn))
    assert queue_has_work(conn)
    finish_chunk(conn, chunk, "completed")
    assert not queue_has_work(conn)


def test_a_pending_chunk_under_a_finished_job_is_not_work(conn: Connection) -> None:
    job = new_job(conn, chunks=1)
    # As an upgraded database can hold it: never rolled back to processing.
    conn.execute(
        "UPDATE sync_queue SET status = 'completed', claimable_at = NULL WHERE id = %s", [job]
    )

    assert not queue_has_work(conn)


_STRESS_OUTCOMES: list[Outcome] = ["completed", "completed", "error", "released"]


def test_claim_finish_reap_and_cancel_at_once_neither_deadlock_nor_break_the_rules(
    conn: Connection, make_conn: Callable[[], Connection]
) -> None:
    jobs = [new_job(conn, chunks=8, max_attempts=4) for _ in range(6)]
    to_cancel = jobs[-1]
    workers = [make_conn() for _ in range(6)]
    reaper, canceller = make_conn(), make_conn()
    failures: list[BaseException] = []
    done = threading.Event()

    def work(n: int, db: Connection) -> None:
        chooser = random.Random(n)
        try:
            while queue_has_work(db):
                chunk = claim(db, f"w{n}", lease=timedelta(milliseconds=chooser.choice([5, 500])))
                if chunk is None:
                    time.sleep(0.002)
                    continue
                if chooser.random() < 0.5:
                    heartbeat(db, chunk, lease=timedelta(milliseconds=500))
                outcome = chooser.choice(_STRESS_OUTCOMES)
                finish_chunk(db, chunk, outcome, error="flaky", retry_base=BLINK)
        except BaseException as exc:  # reported by the assertion below
            failures.append(exc)

    def reap_often() -> None:
        try:
            while not done.is_set():
                reap(reaper)
                time.sleep(0.002)
        except BaseException as exc:  # reported by the assertion below
            failures.append(exc)

    def cancel_one() -> None:
        try:
            time.sleep(0.05)
            cancel_job(canceller, to_cancel, reason="operator")
        except BadInput:
            pass  # it had already finished
        except BaseException as exc:  # reported by the assertion below
            failures.append(exc)

    threads = [threading.Thread(target=work, args=pair) for pair in enumerate(workers)]
    helpers = [threading.Thread(target=reap_often), threading.Thread(target=cancel_one)]
    for thread in threads + helpers:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    done.set()
    for thread in helpers:
        thread.join(timeout=30)

    assert failures == []
    statuses = {job: job_row(conn, job)["status"] for job in jobs}
    assert set(statuses.values()) <= {"completed", "failed", "cancelled"}
    assert statuses[to_cancel] in {"cancelled", "completed", "failed"}
    open_attempts = conn.execute(
        "SELECT count(*) AS n FROM chunk_attempts WHERE outcome = 'running'"
    ).fetchone()
    assert open_attempts == {"n": 0}


# --- what a claim costs ---------------------------------------------------------------------

# Buffers read (from cache or disk) in every table and index of the schema, and the
# sequential scans of the two queue tables, within the current transaction.
_COST = """
SELECT sum(pg_stat_get_xact_blocks_fetched(c.oid))::bigint AS blocks,
       sum(pg_stat_get_xact_numscans(c.oid))
           FILTER (WHERE c.relname IN ('chunked_sync_jobs', 'sync_queue'))::bigint AS seq_scans
  FROM pg_class c
 WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'i')
"""

# The trap DESIGN.md measured: scan pending chunks, skip those with a lower sibling active.
_SCANNING_CLAIM = """
SELECT c.id FROM chunked_sync_jobs c
 WHERE c.status = 'pending'
   AND NOT EXISTS (SELECT 1 FROM chunked_sync_jobs l
                    WHERE l.parent_sync_job_id = c.parent_sync_job_id
                      AND l.chunk_index < c.chunk_index
                      AND l.status IN ('pending', 'processing'))
 ORDER BY c.chunk_index, c.created_at
 LIMIT 1
"""


def cost_of(conn: Connection, action: Callable[[], T]) -> tuple[T, int, int]:
    """(result, buffers read, sequential scans of the queue tables) of action."""
    with conn.transaction():
        before = must(conn.execute(_COST).fetchone())
        result = action()
        after = must(conn.execute(_COST).fetchone())
    return result, after["blocks"] - before["blocks"], after["seq_scans"] - before["seq_scans"]


@pytest.mark.slow
def test_claim_cost_does_not_grow_with_history_or_the_chunks_behind_each_head(
    conn: Connection,
) -> None:
    # History: 2,000 finished jobs of 100 completed chunks each.
    history = add_store(conn, name="history", email="history@example.com")
    conn.execute(
        "INSERT INTO sync_queue (store_id, status, created_at, completed_at)"
        " SELECT %s, 'completed', now() - interval '30 days' + g * interval '1 minute',"
        "        now() - interval '29 days'"
        "   FROM generate_series(1, 2000) AS g",
        [history["id"]],
    )
    conn.execute(
        "INSERT INTO chunked_sync_jobs (parent_sync_job_id, store_id, chunk_index, total_chunks,"
        "       start_offset, end_offset, estimated_emails, status, attempts, worker_id,"
        "       started_at, completed_at, created_at)"
        " SELECT q.id, q.store_id, i, 100, (i - 1) * 1000, i * 1000 - 1, 1000, 'completed', 1,"
        "        'old', q.created_at, q.completed_at, q.created_at"
        "   FROM sync_queue q CROSS JOIN generate_series(1, 100) AS i"
        "  WHERE q.status = 'completed'"
    )
    # Backlog: three active jobs of 20,000 chunks each, waiting behind their heads.
    jobs = [new_job(conn, chunks=20_000, age=timedelta(hours=h)) for h in (3, 2, 1)]
    conn.execute("ANALYZE")
    assert must(conn.execute("SELECT count(*) AS n FROM chunked_sync_jobs").fetchone())["n"] == (
        260_000
    )

    costs = []
    for index in range(1, 6):
        claimed = []
        for job in jobs:
            chunk, blocks, seq_scans = cost_of(conn, lambda: claim(conn))
            assert head(chunk) == (job, index)
            assert seq_scans == 0
            costs.append(blocks)
            claimed.append(must(chunk))
        nothing, idle_blocks, seq_scans = cost_of(conn, lambda: claim(conn))
        assert nothing is None
        assert seq_scans == 0
        costs.append(idle_blocks)
        for chunk in claimed:
            finish_chunk(conn, chunk, "completed")

    # A claim reads a few index pages and the rows it changes: tens of buffers, never
    # anything proportional to the 200,000 finished or 60,000 waiting chunks.
    assert max(costs) < 200, costs

    # The same measure sees the scanning claim's cost, so the bound above means something.
    for _ in jobs:
        must(claim(conn))
    _, scanning_blocks, _ = cost_of(conn, lambda: conn.execute(_SCANNING_CLAIM).fetchall())
    assert scanning_blocks > 20 * max(costs), (scanning_blocks, costs)


def test_connections_probe_their_peer_and_end_idle_transactions(conn: Connection) -> None:
    settings = conn.execute(
        "SELECT current_setting('idle_in_transaction_session_timeout') AS idle,"
        "       current_setting('tcp_keepalives_idle') AS probe_after"
    ).fetchone()
    assert settings is not None
    assert settings["idle"] == "1min"
    info = conn.info.get_parameters()
    assert (info["keepalives"], info["keepalives_idle"]) == ("1", "30")
    if conn.info.host.startswith("/"):
        return  # a Unix socket: the server has no TCP peer to probe
    assert settings["probe_after"] == "30"
