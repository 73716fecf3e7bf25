"""What the queue looks like: job progress, stuck chunks, success rate, problem stores.

The diagnostics are the reference runbook's queries (sql/queries/reports.sql),
with their fixed intervals turned into parameters.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from uuid import UUID

from syncctl.config import DatabaseTarget
from syncctl.db import Connection, query
from syncctl.migrate import AppliedMigration, applied_migrations, pending_migrations
from syncctl.operations import unknown_job

ACTIVE = ("pending", "processing")
# A chunk processing for longer than this is stuck (the runbook's threshold).
STUCK_AFTER = timedelta(minutes=5)


@dataclass(frozen=True)
class JobReport:
    """A job, its chunks, and each chunk's attempts (a list under the chunk's "history" key;
    "attempts" stays the chunk's attempt count)."""

    job: dict[str, Any]
    chunks: list[dict[str, Any]]


@dataclass(frozen=True)
class SuccessRate:
    """Chunk outcomes of a period, by status, and the share of finished chunks that completed."""

    since: timedelta
    statuses: list[dict[str, Any]]
    completed: int
    failed: int

    @property
    def rate(self) -> float | None:
        """Completed as a percentage of completed + failed; None when nothing finished."""
        finished = self.completed + self.failed
        return round(self.completed * 100.0 / finished, 2) if finished else None


@dataclass(frozen=True)
class DatabaseStatus:
    source: str
    url: str  # password masked
    database: str
    user: str
    server_version: str
    applied: list[AppliedMigration]
    pending: list[str]


def jobs(conn: Connection, *, recent: int = 20) -> list[dict[str, Any]]:
    """Active jobs and the `recent` most recent others, with chunk and message counts."""
    return job_rows(conn, active=True, recent=recent)


def job_progress(conn: Connection, job_id: UUID) -> dict[str, Any]:
    """One job's row of `jobs`."""
    rows = job_rows(conn, job_ids=[job_id])
    if not rows:
        raise unknown_job(job_id)
    return rows[0]


def job_rows(
    conn: Connection,
    *,
    job_ids: Collection[UUID] = (),
    active: bool = False,
    recent: int = 0,
    stuck_after: timedelta = STUCK_AFTER,
) -> list[dict[str, Any]]:
    """The jobs named, the active ones (when active) and the `recent` most recent others,
    each with its progress: chunks done and failed, messages synced of estimated, retried
    attempts, and its stuck chunks (processing for over stuck_after, or past the lease)
    under "stuck_chunks"; "sampled_at" is the database's clock when they were counted."""
    return conn.execute(
        query("report_jobs"),
        {
            "job_ids": list(job_ids),
            "active": active,
            "recent": recent,
            "stuck_after": stuck_after,
        },
    ).fetchall()


def job_report(conn: Connection, job_id: UUID) -> JobReport:
    """A job, all its chunks, and every attempt of each chunk."""
    job = conn.execute(query("report_job"), {"job_id": job_id}).fetchone()
    if job is None:
        raise unknown_job(job_id)
    chunks = conn.execute(query("report_job_chunks"), {"job_id": job_id}).fetchall()
    attempts = conn.execute(query("report_job_attempts"), {"job_id": job_id}).fetchall()
    by_chunk: dict[UUID, list[dict[str, Any]]] = {}
    for attempt in attempts:
        by_chunk.setdefault(attempt["chunk_id"], []).append(attempt)
    return JobReport(job, [{**c, "history": by_chunk.get(c["chunk_id"], [])} for c in chunks])


def stuck_chunks(conn: Connection, *, older_than: timedelta) -> list[dict[str, Any]]:
    """Chunks processing for longer than older_than, or whose lease has expired."""
    return conn.execute(query("report_stuck_chunks"), {"older_than": older_than}).fetchall()


def success_rate(conn: Connection, *, since: timedelta) -> SuccessRate:
    """Chunks created in the last `since`, counted by status."""
    rows = conn.execute(query("report_chunk_success_rate"), {"since": since}).fetchall()
    counts = {row["status"]: row["count"] for row in rows}
    return SuccessRate(since, rows, counts.get("completed", 0), counts.get("failed", 0))


def problem_stores(
    conn: Connection, *, since: timedelta, stale_after: timedelta | None = None
) -> list[dict[str, Any]]:
    """Stores with failed chunks among those created in the last `since`, worst
    first; with stale_after, also stores kept current whose oldest folder round
    completed longer ago than that (their "behind" says how long)."""
    stores = conn.execute(query("report_problem_stores"), {"since": since}).fetchall()
    for store in stores:
        store.update(oldest_round_at=None, behind=None)
    if stale_after is None:
        return stores
    by_id = {store["store_id"]: store for store in stores}
    for stale in conn.execute(query("report_stale_stores"), {"stale_after": stale_after}):
        found: dict[str, Any] | None = by_id.get(stale["store_id"])
        if found is None:
            found = by_id[stale["store_id"]] = {
                **stale,
                "failed_chunks": 0,
                "total_chunks": None,
                "last_error": None,
            }
            stores.append(found)
        found.update(oldest_round_at=stale["oldest_round_at"], behind=stale["behind"])
    return stores


def store_currency(conn: Connection) -> list[dict[str, Any]]:
    """Stores kept current by incremental jobs: folders, oldest and newest last round."""
    return conn.execute(query("report_store_currency")).fetchall()


def database_status(conn: Connection, target: DatabaseTarget) -> DatabaseStatus:
    """Which database is in use and which migrations it has; works before `db migrate`."""
    row = conn.execute(query("report_database")).fetchone()
    assert row is not None
    return DatabaseStatus(
        source=target.source,
        url=target.masked_url,
        database=row["database"],
        user=row["user_name"],
        server_version=row["server_version"],
        applied=applied_migrations(conn),
        pending=pending_migrations(conn),
    )
