"""Operator repairs against real PostgreSQL: retry, cancel, reset-stuck, cleanup."""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from uuid import UUID, uuid4

import pytest

from fakes import CountOnly
from syncctl import jobs, operations, queue
from syncctl.db import Connection
from syncctl.errors import BadInput
from syncctl.queue import Chunk

LEASE = timedelta(seconds=60)


def new_job(
    conn: Connection,
    email: str,
    *,
    messages: int = 2500,
    chunk_size: int = 1000,
    max_attempts: int = 3,
    add_store: bool = True,
) -> UUID:
    if add_store:
        jobs.add_store(conn, name=email.split("@", maxsplit=1)[0], email=email)
    created = jobs.create_job(
        conn,
        CountOnly(counts={email: messages}),
        store_ref=email,
        chunk_size=chunk_size,
        max_attempts=max_attempts,
    )
    return created.job_id


def claim(conn: Connection, worker: str = "w1") -> Chunk:
    chunk = queue.claim_chunk(conn, worker_id=worker, lease=LEASE)
    assert chunk is not None
    return chunk


def finish(conn: Connection, chunk: Chunk, outcome: queue.Outcome) -> str | None:
    error = None if outcome == "completed" else f"{outcome} in test"
    return queue.finish_chunk(conn, chunk, outcome, error=error, retry_base=timedelta(0))


def job_status(conn: Connection, job_id: UUID) -> str:
    row = conn.execute("SELECT status FROM sync_queue WHERE id = %s", [job_id]).fetchone()
    assert row is not None
    status: str = row["status"]
    return status


def chunks_of(conn: Connection, job_id: UUID) -> list[dict[str, Any]]:
    return conn.execute(
        "SELECT chunk_index, status, attempts, max_attempts, worker_id, last_error"
        " FROM chunked_sync_jobs WHERE parent_sync_job_id = %s ORDER BY chunk_index",
        [job_id],
    ).fetchall()


def failed_job(conn: Connection, email: str) -> UUID:
    """A job of two chunks, one attempt each: chunk 1 failed, chunk 2 completed."""
    job_id = new_job(conn, email, messages=2000, max_attempts=1)
    assert finish(conn, claim(conn), "error") == "failed"
    assert finish(conn, claim(conn), "completed") == "completed"
    assert job_status(conn, job_id) == "failed"
    return job_id


def test_retry_requeues_failed_chunks_with_fresh_attempts_and_the_job_runs_again(
    conn: Connection,
) -> None:
    job_id = failed_job(conn, "a@example.com")

    retried = operations.retry_job(conn, job_id)

    assert retried.chunk_indexes == [1]
    assert retried.status == "pending"
    first, second = chunks_of(conn, job_id)
    assert (first["status"], first["attempts"], first["max_attempts"]) == ("pending", 0, 1)
    assert first["worker_id"] is None
    assert first["last_error"] is None
    assert second["status"] == "completed"
    chunk = claim(conn, "w2")
    assert (chunk.parent_sync_job_id, chunk.chunk_index, chunk.attempts) == (job_id, 1, 1)
    assert finish(conn, chunk, "completed") == "completed"
    assert job_status(conn, job_id) == "completed"


def test_retry_of_one_chunk_leaves_the_other_failed_chunks_alone(conn: Connection) -> None:
    job_id = new_job(conn, "a@example.com", messages=3000, max_attempts=1)
    finish(conn, claim(conn), "error")
    finish(conn, claim(conn), "permanent")
    finish(conn, claim(conn), "completed")

    retried = operations.retry_job(conn, job_id, chunk_index=2)

    assert retried.chunk_indexes == [2]
    assert [c["status"] for c in chunks_of(conn, job_id)] == ["failed", "pending", "completed"]
    assert claim(conn).chunk_index == 2


@pytest.mark.parametrize(
    ("chunk_index", "complaint"),
    [(2, "Chunk 2 of job .* is completed"), (9, "has no chunk 9")],
)
def test_retry_refuses_a_chunk_that_is_missing_or_did_not_fail(
    conn: Connection, chunk_index: int, complaint: str
) -> None:
    job_id = failed_job(conn, "a@example.com")
    before = chunks_of(conn, job_id)

    with pytest.raises(BadInput, match=complaint):
        operations.retry_job(conn, job_id, chunk_index=chunk_index)

    assert chunks_of(conn, job_id) == before
    assert job_status(conn, job_id) == "failed"


def test_retry_refuses_while_the_store_has_another_active_job(conn: Connection) -> None:
    job_id = failed_job(conn, "a@example.com")
    newer = new_job(conn, "a@example.com", add_store=False)

    with pytest.raises(BadInput, match=f"already has a pending job \\({newer}\\)"):
        operations.retry_job(conn, job_id)

    assert job_status(conn, job_id) == "failed"
    assert [c["status"] for c in chunks_of(conn, job_id)] == ["failed", "completed"]


def test_retry_refuses_a_job_with_nothing_failed(conn: Connection) -> None:
    job_id = new_job(conn, "a@example.com")
    with pytest.raises(BadInput, match="no failed or cancelled chunk"):
        operations.retry_job(conn, job_id)
    assert job_status(conn, job_id) == "pending"


def test_retry_refuses_an_unknown_job(conn: Connection) -> None:
    with pytest.raises(BadInput, match="No job"):
        operations.retry_job(conn, uuid4())


def test_retry_brings_back_a_cancelled_job(conn: Connection) -> None:
    job_id = new_job(conn, "a@example.com", messages=2000)
    operations.cancel_job(conn, job_id)

    retried = operations.retry_job(conn, job_id)

    assert retried.chunk_indexes == [1, 2]
    assert job_status(conn, job_id) == "pending"
    assert claim(conn).parent_sync_job_id == job_id


def test_cancel_fences_out_the_worker_holding_a_chunk(conn: Connection) -> None:
    job_id = new_job(conn, "a@example.com")
    held = claim(conn)

    assert operations.cancel_job(conn, job_id, reason="operator said so") == 3

    assert job_status(conn, job_id) == "cancelled"
    assert {c["status"] for c in chunks_of(conn, job_id)} == {"cancelled"}
    assert queue.heartbeat(conn, held, lease=LEASE) is None
    assert finish(conn, held, "completed") is None
    attempt = conn.execute(
        "SELECT outcome, error FROM chunk_attempts WHERE chunk_id = %s", [held.id]
    ).fetchone()
    assert attempt == {"outcome": "cancelled", "error": "operator said so"}
    assert queue.claim_chunk(conn, worker_id="w2", lease=LEASE) is None


def test_cancel_refuses_a_finished_job(conn: Connection) -> None:
    job_id = failed_job(conn, "a@example.com")
    with pytest.raises(BadInput, match="already failed"):
        operations.cancel_job(conn, job_id)


def backdate_start(conn: Connection, chunk: Chunk, minutes: int) -> None:
    conn.execute(
        "UPDATE chunked_sync_jobs SET started_at = now() - make_interval(mins => %s) WHERE id = %s",
        [minutes, chunk.id],
    )


def test_reset_stuck_puts_back_long_running_chunks_and_fails_exhausted_ones(
    conn: Connection,
) -> None:
    with_tries_left = new_job(conn, "a@example.com", max_attempts=3)
    exhausted = new_job(conn, "b@example.com", messages=1000, max_attempts=1)
    recent = new_job(conn, "c@example.com")
    first, second, fresh = claim(conn, "w1"), claim(conn, "w2"), claim(conn, "w3")
    assert [c.parent_sync_job_id for c in (first, second, fresh)] == [
        with_tries_left,
        exhausted,
        recent,
    ]
    backdate_start(conn, first, 10)
    backdate_start(conn, second, 10)
    cutoff = operations.stuck_cutoff(conn, timedelta(minutes=5))

    preview = operations.reset_stuck(conn, started_before=cutoff, dry_run=True)
    assert {(c.chunk_id, c.new_status) for c in preview} == {
        (first.id, "pending"),
        (second.id, "failed"),
    }
    assert chunks_of(conn, with_tries_left)[0]["status"] == "processing"

    reset = operations.reset_stuck(conn, started_before=cutoff)

    assert {(c.chunk_id, c.new_status) for c in reset} == {
        (first.id, "pending"),
        (second.id, "failed"),
    }
    assert chunks_of(conn, with_tries_left)[0]["status"] == "pending"
    assert chunks_of(conn, with_tries_left)[0]["attempts"] == 1
    assert chunks_of(conn, exhausted)[0]["status"] == "failed"
    assert job_status(conn, exhausted) == "failed"
    assert chunks_of(conn, recent)[0]["status"] == "processing"
    # The workers that held them are fenced out.
    assert finish(conn, first, "completed") is None
    assert queue.heartbeat(conn, second, lease=LEASE) is None
    outcome = conn.execute(
        "SELECT outcome, error FROM chunk_attempts WHERE chunk_id = %s", [first.id]
    ).fetchone()
    assert outcome is not None
    assert outcome["outcome"] == "reset"  # an operator's, not the reaper's
    assert outcome["error"].startswith("reset by operator after processing since before")


def test_reset_stuck_also_takes_back_chunks_whose_lease_expired(conn: Connection) -> None:
    new_job(conn, "a@example.com")
    held = claim(conn)
    conn.execute(
        "UPDATE chunked_sync_jobs SET lease_expires_at = now() - interval '1 second' WHERE id = %s",
        [held.id],
    )
    cutoff = operations.stuck_cutoff(conn, timedelta(minutes=5))

    assert [c.chunk_id for c in operations.reset_stuck(conn, started_before=cutoff)] == [held.id]


def backdate_job(conn: Connection, job_id: UUID, days: int) -> None:
    conn.execute(
        "UPDATE sync_queue SET created_at = now() - make_interval(days => %s) WHERE id = %s",
        [days, job_id],
    )


def test_cleanup_deletes_old_finished_jobs_with_their_chunks_and_keeps_emails(
    conn: Connection,
) -> None:
    completed = new_job(conn, "a@example.com", messages=500)
    held = claim(conn)
    conn.execute(
        "INSERT INTO emails (store_id, sync_job_id, provider_message_id) VALUES (%s, %s, 'm1')",
        [held.store_id, completed],
    )
    finish(conn, held, "completed")
    cancelled = new_job(conn, "b@example.com")
    operations.cancel_job(conn, cancelled)
    recent = new_job(conn, "c@example.com", messages=0)
    active = new_job(conn, "d@example.com")
    for job_id in (completed, cancelled, active):
        backdate_job(conn, job_id, 8)
    assert job_status(conn, recent) == "completed"

    preview = operations.cleanup(conn, older_than=timedelta(days=7), dry_run=True)
    assert [j["job_id"] for j in preview] == [completed, cancelled]
    assert [j["chunks"] for j in preview] == [1, 3]
    assert job_status(conn, completed) == "completed"

    deleted = operations.cleanup(conn, older_than=timedelta(days=7), only={completed})
    assert [j["job_id"] for j in deleted] == [completed]
    assert job_status(conn, cancelled) == "cancelled"

    deleted = operations.cleanup(conn, older_than=timedelta(days=7))
    assert [j["job_id"] for j in deleted] == [cancelled]

    remaining = conn.execute("SELECT id FROM sync_queue ORDER BY created_at").fetchall()
    assert {r["id"] for r in remaining} == {recent, active}
    counts = conn.execute(
        "SELECT (SELECT count(*) FROM chunked_sync_jobs WHERE parent_sync_job_id = ANY(%s)) AS c,"
        " (SELECT count(*) FROM chunk_attempts WHERE chunk_id = %s) AS a,"
        " (SELECT count(*) FROM emails) AS e",
        [[completed, cancelled], held.id],
    ).fetchone()
    assert counts == {"c": 0, "a": 0, "e": 1}
