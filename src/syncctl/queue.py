"""The chunk lifecycle: claim, heartbeat, finish, reap.

The rules themselves (order and parallelism within a job, fair claims across
jobs, fencing, backoff, the watermark, roll-up) live in the database
functions of sql/migrations (0002, 0005, 0007, 0008), so syncctl workers and
callers of the original system's functions obey the same ones. These functions take the
connection first and never commit: the caller owns the transaction.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Any, Literal
from uuid import UUID

from syncctl.db import Connection, query

Outcome = Literal["completed", "error", "permanent", "released"]


@dataclass(frozen=True)
class Chunk:
    """A claimed chunk, with what the worker needs to run it."""

    id: UUID
    parent_sync_job_id: UUID
    store_id: UUID
    chunk_index: int
    total_chunks: int
    start_offset: int
    end_offset: int
    estimated_emails: int
    # [window_start, window_end) on receivedDateTime; window_end None: an offset chunk
    # of a job created before time windows (start_offset, then estimated_emails).
    window_start: datetime | None
    window_end: datetime | None
    # An incremental job's chunk: the folder whose delta round it runs.
    folder_id: str | None
    folder_name: str | None
    attempts: int
    max_attempts: int
    worker_id: str
    # This claim's number, never given to another claim: what fences the
    # claim's heartbeats, checkpoints and finish.
    claim_seq: int
    lease_expires_at: datetime
    emails_synced: int
    checkpoint: dict[str, Any] | None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Chunk:
        return cls(**{f.name: row[f.name] for f in fields(cls)})

    @property
    def is_last(self) -> bool:
        return self.chunk_index == self.total_chunks

    def __str__(self) -> str:
        return f"job {self.parent_sync_job_id} chunk {self.chunk_index}/{self.total_chunks}"


@dataclass(frozen=True)
class ReapedChunk:
    chunk_id: UUID
    job_id: UUID
    chunk_index: int
    worker_id: str | None
    started_at: datetime | None
    lease_expires_at: datetime | None
    new_status: str


def claim_chunk(conn: Connection, *, worker_id: str, lease: timedelta) -> Chunk | None:
    """Claim the next chunk for worker_id, or None when nothing is claimable."""
    row = conn.execute(query("claim_chunk"), {"worker_id": worker_id, "lease": lease}).fetchone()
    return Chunk.from_row(row) if row and row["id"] is not None else None


def heartbeat(conn: Connection, chunk: Chunk, *, lease: timedelta) -> datetime | None:
    """Extend the lease; None when the chunk no longer belongs to this claim."""
    row = conn.execute(
        query("heartbeat"),
        {"chunk_id": chunk.id, "claim_seq": chunk.claim_seq, "lease": lease},
    ).fetchone()
    return row["lease_expires_at"] if row else None


def finish_chunk(
    conn: Connection,
    chunk: Chunk,
    outcome: Outcome,
    *,
    error: str | None = None,
    processing_time_ms: int | None = None,
    retry_base: timedelta = timedelta(seconds=5),
) -> str | None:
    """End this attempt; return the chunk's new status, or None if fenced out."""
    row = conn.execute(
        query("finish_chunk"),
        {
            "chunk_id": chunk.id,
            "claim_seq": chunk.claim_seq,
            "outcome": outcome,
            "error": error,
            "processing_time_ms": processing_time_ms,
            "retry_base": retry_base,
        },
    ).fetchone()
    return row["status"] if row else None


def reap(
    conn: Connection,
    *,
    dry_run: bool = False,
    started_before: datetime | None = None,
    reason: str | None = None,
) -> list[ReapedChunk]:
    """Expire lost leases, and with started_before also take back chunks
    processing since before then (reset-stuck); dry_run only lists them."""
    rows = conn.execute(
        query("reap"), {"dry_run": dry_run, "started_before": started_before, "reason": reason}
    ).fetchall()
    return [ReapedChunk(**row) for row in rows]


def fail_job(conn: Connection, job_id: UUID, reason: str) -> None:
    """Fail every unfinished chunk of the job, and the job, with one reason: the
    mailbox itself is gone or refused, so each chunk would fail alike."""
    with conn.transaction():
        conn.execute(query("lock_job"), {"job_id": job_id})
        params = {"job_id": job_id, "reason": reason}
        conn.execute(query("fail_unfinished_chunks"), params)
        conn.execute(query("refresh_job"), params)
        conn.execute(query("set_job_error"), params)


def queue_has_work(conn: Connection) -> bool:
    """Whether any chunk anywhere is still pending or processing."""
    row = conn.execute(query("queue_has_work")).fetchone()
    return bool(row and row["busy"])
