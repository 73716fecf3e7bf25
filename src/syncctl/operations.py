"""Operator repairs: cancel, retry, reset stuck chunks, clean up old jobs.

Each change takes the job's lock before touching its chunks (the lock order
the queue functions use) and ends with syncctl_refresh_job so the job's
claimability and status stay right.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import psycopg.errors

from syncctl.db import Connection, query
from syncctl.durations import format_time
from syncctl.errors import BadInput
from syncctl.queue import ReapedChunk, reap

FINISHED = ("completed", "failed", "cancelled")
RETRYABLE = ("failed", "cancelled")


@dataclass(frozen=True)
class RetriedJob:
    job_id: UUID
    chunk_indexes: list[int]
    status: str  # the job's status afterwards


def unknown_job(job_id: UUID) -> BadInput:
    return BadInput(f"No job {job_id}; see `syncctl status` for job ids.")


# A job id as typed: a whole UUID, or its first hex digits as git takes a commit's.
MIN_PREFIX = 4
# Candidates an ambiguous prefix lists.
CANDIDATES_SHOWN = 10
_DASHES = frozenset((8, 13, 18, 23))  # where the UUID text has its dashes
_HEX = frozenset("0123456789abcdef")


def job_reference(text: str) -> UUID | str:
    """A job id as an operator typed it: a UUID, or a prefix of one (at least MIN_PREFIX
    hex digits; with the dashes where the UUID text has them, or without any), returned
    as its hex digits in lower case. Only the syntax is checked: resolve_job finds the job."""
    typed = text.strip().lower()
    try:
        return UUID(typed)
    except ValueError:
        pass
    if "-" in typed:
        canonical = all(
            (char == "-") if i in _DASHES else char in _HEX for i, char in enumerate(typed)
        )
    else:
        canonical = len(typed) < 32 and set(typed) <= _HEX
    digits = typed.replace("-", "")
    if not canonical or not digits:
        raise BadInput(
            f"{text!r} is not a job id; job ids are UUIDs, listed by `syncctl status`, "
            f"and their first {MIN_PREFIX} or more hex digits name one too."
        )
    if len(digits) < MIN_PREFIX:
        raise BadInput(
            f"{text!r} is too short for a job id prefix; give at least {MIN_PREFIX} hex "
            "digits of the id `syncctl status` shows."
        )
    return digits


def resolve_job(conn: Connection, reference: UUID | str) -> UUID:
    """The job a reference from job_reference names. A whole UUID is taken as is (the
    command then says if there is no such job); a prefix must match exactly one job."""
    if isinstance(reference, UUID):
        return reference
    bounds = {
        "low": UUID(reference.ljust(32, "0")),
        "high": UUID(reference.ljust(32, "f")),
        "limit": CANDIDATES_SHOWN,
    }
    rows = conn.execute(query("jobs_by_id_prefix"), bounds).fetchall()
    if not rows:
        raise BadInput(f"No job id starts with {reference}; see `syncctl status` for job ids.")
    if len(rows) == 1:
        job_id: UUID = rows[0]["id"]
        return job_id
    matches = rows[0]["matches"]
    listed = "; ".join(
        f"{row['id']} ({row['store_email'] or row['store_id']}, {row['status']}, created "
        f"{format_time(row['created_at']) if row['created_at'] else 'at an unknown time'})"
        for row in rows
    )
    more = f"; and {matches - len(rows)} more" if matches > len(rows) else ""
    raise BadInput(
        f"The job id prefix {reference} is ambiguous, {matches} jobs start with it: "
        f"{listed}{more}; give more of the id."
    )


def cancel_job(conn: Connection, job_id: UUID, *, reason: str | None = None) -> int:
    """Cancel a job and its unfinished chunks; return how many chunks were cancelled."""
    with conn.transaction():
        job = conn.execute(query("lock_job"), {"job_id": job_id}).fetchone()
        if job is None:
            raise unknown_job(job_id)
        if job["status"] in FINISHED:
            raise BadInput(f"Job {job_id} is already {job['status']}; nothing to cancel.")
        chunks = conn.execute(
            query("cancel_chunks"), {"job_id": job_id, "reason": reason}
        ).fetchall()
        conn.execute(
            query("cancel_running_attempts"),
            {"chunk_ids": [c["id"] for c in chunks], "reason": reason or "job cancelled"},
        )
        conn.execute(query("mark_job_cancelled"), {"job_id": job_id, "reason": reason})
    return len(chunks)


def retry_job(conn: Connection, job_id: UUID, *, chunk_index: int | None = None) -> RetriedJob:
    """Requeue a job's failed and cancelled chunks (or only chunk_index) with fresh
    attempts, and reopen the job. Refused while the store has another active job."""
    with conn.transaction():
        job = conn.execute(query("lock_job"), {"job_id": job_id}).fetchone()
        if job is None:
            raise unknown_job(job_id)
        if chunk_index is not None:
            _check_retryable_chunk(conn, job_id, chunk_index)
        other = conn.execute(
            query("other_active_job_of_store"), {"store_id": job["store_id"], "job_id": job_id}
        ).fetchone()
        if other is not None:
            raise _store_busy(job_id, other)
        requeued = conn.execute(
            query("requeue_chunks"), {"job_id": job_id, "chunk_index": chunk_index}
        ).fetchall()
        if not requeued:
            raise BadInput(
                f"Job {job_id} ({job['status']}) has no failed or cancelled chunk to retry."
            )
        try:
            conn.execute(query("reopen_job"), {"job_id": job_id})
        except psycopg.errors.UniqueViolation:
            raise BadInput(
                f"Another job of this store became active while job {job_id} was being "
                "retried; run `syncctl status` and try again."
            ) from None
        conn.execute(query("refresh_job"), {"job_id": job_id})
        conn.execute(query("notify_chunks"), {"payload": str(job_id)})
        status = conn.execute(query("job_status"), {"job_id": job_id}).fetchone()
    assert status is not None
    return RetriedJob(job_id, sorted(r["chunk_index"] for r in requeued), status["status"])


def _check_retryable_chunk(conn: Connection, job_id: UUID, chunk_index: int) -> None:
    chunk = conn.execute(
        query("chunk_of_job"), {"job_id": job_id, "chunk_index": chunk_index}
    ).fetchone()
    if chunk is None:
        raise BadInput(
            f"Job {job_id} has no chunk {chunk_index}; see `syncctl status {job_id}` "
            "for its chunks."
        )
    if chunk["status"] not in RETRYABLE:
        raise BadInput(
            f"Chunk {chunk_index} of job {job_id} is {chunk['status']}; only failed or "
            "cancelled chunks can be retried."
        )


def _store_busy(job_id: UUID, other: dict[str, Any]) -> BadInput:
    return BadInput(
        f"The store of job {job_id} already has a {other['status']} job ({other['id']}); "
        "wait for it or cancel it with `syncctl cancel` before retrying this one."
    )


def stuck_cutoff(conn: Connection, older_than: timedelta) -> datetime:
    """now() - older_than by the database's clock, which every host shares."""
    row = conn.execute(query("stuck_cutoff"), {"older_than": older_than}).fetchone()
    assert row is not None
    cutoff: datetime = row["cutoff"]
    return cutoff


def reset_stuck(
    conn: Connection, *, started_before: datetime, dry_run: bool = False
) -> list[ReapedChunk]:
    """Put back chunks processing since before started_before, and those whose lease
    expired: pending when attempts are left, else failed. The old worker is fenced out."""
    return reap(
        conn,
        dry_run=dry_run,
        started_before=started_before,
        reason=(
            "reset by operator after processing since before "
            f"{started_before.astimezone(UTC):%Y-%m-%d %H:%M:%S}Z"
        ),
    )


def cleanup(
    conn: Connection,
    *,
    older_than: timedelta,
    dry_run: bool = False,
    only: Collection[UUID] | None = None,
) -> list[dict[str, Any]]:
    """Delete finished jobs (completed, failed, cancelled) created more than older_than
    ago, with their chunks and attempts; emails stay. only: delete no job outside it
    (the ones an operator confirmed). Returns the jobs deleted, or that would be."""
    with conn.transaction():
        jobs = conn.execute(query("finished_jobs_before"), {"older_than": older_than}).fetchall()
        if only is not None:
            jobs = [job for job in jobs if job["job_id"] in only]
        if dry_run or not jobs:
            return jobs
        deleted = {
            row["id"]
            for row in conn.execute(
                query("delete_finished_jobs"), {"job_ids": [job["job_id"] for job in jobs]}
            )
        }
    return [job for job in jobs if job["job_id"] in deleted]
