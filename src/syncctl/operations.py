"""Operator repairs: cancel, retry, reset stuck chunks, clean up old jobs.

Each change takes the job's lock before touching its chunks (the lock order
the queue functions use) and ends with syncctl_refresh_job so the job's
claimability and status stay right.
"""

from __future__ import annotations

from uuid import UUID

from syncctl.db import Connection, query
from syncctl.errors import BadInput


def cancel_job(conn: Connection, job_id: UUID, *, reason: str | None = None) -> int:
    """Cancel a job and its unfinished chunks; return how many chunks were cancelled."""
    with conn.transaction():
        job = conn.execute(query("lock_job"), {"job_id": job_id}).fetchone()
        if job is None:
            raise BadInput(f"No job {job_id}; see `syncctl status` for job ids.")
        if job["status"] in ("completed", "failed", "cancelled"):
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
