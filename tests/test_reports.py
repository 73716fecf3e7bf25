"""Reports against real PostgreSQL: job progress, attempts, stuck chunks, the runbook queries."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from uuid import UUID, uuid4

import pytest

from fakes import CountOnly
from syncctl import jobs, queue, reports
from syncctl.config import DatabaseTarget
from syncctl.db import Connection, connection
from syncctl.errors import BadInput
from syncctl.ingest import write_page
from syncctl.mailsource import Message
from syncctl.migrate import migration_files
from syncctl.queue import Chunk

LEASE = timedelta(seconds=60)
DAY = timedelta(hours=24)


def new_job(conn: Connection, email: str, *, messages: int = 3000, max_attempts: int = 1) -> UUID:
    jobs.add_store(conn, name=email.split("@", maxsplit=1)[0], email=email)
    created = jobs.create_job(
        conn,
        CountOnly(messages),
        store_ref=email,
        chunk_size=1000,
        max_attempts=max_attempts,
    )
    return created.job_id


def claim(conn: Connection, worker: str = "w1") -> Chunk:
    chunk = queue.claim_chunk(conn, worker_id=worker, lease=LEASE)
    assert chunk is not None
    return chunk


def finish(conn: Connection, chunk: Chunk, outcome: queue.Outcome) -> None:
    error = None if outcome == "completed" else "boom"
    queue.finish_chunk(conn, chunk, outcome, error=error, retry_base=timedelta(0))


def backdate_chunks(conn: Connection, job_id: UUID, days: int) -> None:
    conn.execute(
        "UPDATE chunked_sync_jobs SET created_at = now() - make_interval(days => %s)"
        " WHERE parent_sync_job_id = %s",
        [days, job_id],
    )


def test_jobs_shows_chunk_and_message_progress(conn: Connection) -> None:
    job_id = new_job(conn, "a@example.com")
    first = claim(conn)
    messages = [
        Message(provider_message_id=f"m{i}", received_at=datetime(2024, 1, 1, tzinfo=UTC))
        for i in range(2)
    ]
    write_page(conn, first, messages, checkpoint={"read": 2}, lease=LEASE)
    finish(conn, first, "completed")
    finish(conn, claim(conn), "permanent")

    [row] = reports.jobs(conn)

    assert row["job_id"] == job_id
    assert row["store_email"] == "a@example.com"
    assert row["status"] == "processing"
    assert (row["chunks_done"], row["chunks_failed"], row["total_chunks"]) == (1, 1, 3)
    assert (row["emails_synced"], row["estimated_emails"]) == (2, 3000)


def test_jobs_shows_every_active_job_and_only_the_most_recent_others(conn: Connection) -> None:
    active = new_job(conn, "active@example.com")
    finished = [new_job(conn, f"done{i}@example.com", messages=0) for i in range(3)]

    shown = [row["job_id"] for row in reports.jobs(conn, recent=1)]

    assert shown == [active, finished[-1]]


def test_job_report_lists_each_chunk_with_every_attempt(conn: Connection) -> None:
    job_id = new_job(conn, "a@example.com", messages=2000, max_attempts=3)
    finish(conn, claim(conn, "w1"), "error")
    finish(conn, claim(conn, "w2"), "completed")

    report = reports.job_report(conn, job_id)

    assert report.job["job_id"] == job_id
    assert report.job["chunk_size"] == 1000
    first, second = report.chunks
    assert (first["chunk_index"], first["status"], first["attempts"]) == (1, "completed", 2)
    assert [(a["attempt"], a["worker_id"], a["outcome"], a["error"]) for a in first["history"]] == [
        (1, "w1", "retrying", "boom"),
        (2, "w2", "completed", None),
    ]
    assert all(a["duration_ms"] is not None and a["finished_at"] for a in first["history"])
    assert (second["status"], second["attempts"], second["history"]) == ("pending", 0, [])


def test_job_report_of_an_unknown_job_is_bad_input(conn: Connection) -> None:
    with pytest.raises(BadInput, match="No job"):
        reports.job_report(conn, uuid4())
    with pytest.raises(BadInput, match="No job"):
        reports.job_progress(conn, uuid4())


def test_stuck_chunks_lists_long_processing_and_expired_leases_only(conn: Connection) -> None:
    for email in ("slow@example.com", "lost@example.com", "fine@example.com"):
        new_job(conn, email)
    slow, lost, fine = claim(conn, "w1"), claim(conn, "w2"), claim(conn, "w3")
    conn.execute(
        "UPDATE chunked_sync_jobs SET started_at = now() - interval '10 minutes' WHERE id = %s",
        [slow.id],
    )
    conn.execute(
        "UPDATE chunked_sync_jobs SET lease_expires_at = now() - interval '1 second' WHERE id = %s",
        [lost.id],
    )

    stuck = reports.stuck_chunks(conn, older_than=timedelta(minutes=5))

    assert [(c["chunk_id"], c["reason"]) for c in stuck] == [
        (slow.id, "processing too long"),
        (lost.id, "lease expired"),
    ]
    assert stuck[0]["store_email"] == "slow@example.com"
    assert fine.id not in {c["chunk_id"] for c in stuck}


def test_success_rate_counts_chunks_created_in_the_period_by_status(conn: Connection) -> None:
    old = new_job(conn, "old@example.com", messages=1000)
    finish(conn, claim(conn), "permanent")
    backdate_chunks(conn, old, 2)
    new_job(conn, "a@example.com", messages=4000)
    finish(conn, claim(conn), "completed")
    finish(conn, claim(conn), "permanent")
    finish(conn, claim(conn), "completed")

    result = reports.success_rate(conn, since=DAY)

    # One definition: % of finished (completed + failed); pending is not finished.
    shares = [(r["status"], r["count"], r["percentage"]) for r in result.statuses]
    assert shares == [
        ("completed", 2, Decimal("66.67")),
        ("failed", 1, Decimal("33.33")),
        ("pending", 1, None),
    ]
    assert result.rate == pytest.approx(66.67)
    assert [float(r["share_of_all"]) for r in result.statuses] == [50.0, 25.0, 25.0]
    assert reports.success_rate(conn, since=timedelta(days=3)).failed == 2


def test_success_rate_has_no_rate_before_any_chunk_finished(conn: Connection) -> None:
    new_job(conn, "a@example.com")
    result = reports.success_rate(conn, since=DAY)
    assert result.rate is None
    assert [r["status"] for r in result.statuses] == ["pending"]


def test_problem_stores_lists_stores_with_failed_chunks_in_the_period(conn: Connection) -> None:
    bad = new_job(conn, "bad@example.com", messages=2000)
    new_job(conn, "good@example.com", messages=1000)
    old = new_job(conn, "old@example.com", messages=1000)
    # bad's first chunk and old's only chunk fail; the others complete.
    failing = {(bad, 1), (old, 1)}
    while chunk := queue.claim_chunk(conn, worker_id="w1", lease=LEASE):
        failed = (chunk.parent_sync_job_id, chunk.chunk_index) in failing
        finish(conn, chunk, "permanent" if failed else "completed")
    backdate_chunks(conn, old, 2)

    recent = reports.problem_stores(conn, since=DAY)
    assert [
        (s["email"], s["failed_chunks"], s["total_chunks"], s["last_error"]) for s in recent
    ] == [("bad@example.com", 1, 2, "boom")]
    wider = reports.problem_stores(conn, since=timedelta(days=3))
    assert {s["email"] for s in wider} == {"bad@example.com", "old@example.com"}


def test_database_status_works_before_migrate_and_masks_the_password(
    empty_database_url: str,
) -> None:
    url = empty_database_url.replace("postgres@", "postgres:s3cretPW@", 1)
    target = DatabaseTarget(url, "--database-url")
    with connection(target) as conn:
        status = reports.database_status(conn, target)
    assert status.applied == []
    assert status.pending == [name for name, _ in migration_files()]
    assert "s3cretPW" not in status.url
    assert "***" in status.url
    assert status.database in empty_database_url
