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
from syncctl.output import DEFAULT_LIMIT

ACTIVE = ("pending", "processing")
JOB_STATES = ("pending", "processing", "completed", "failed", "cancelled")
# A chunk processing for longer than this is stuck (the runbook's threshold).
STUCK_AFTER = timedelta(minutes=5)
# How many jobs (and stores) a listing shows unless told otherwise.
# How many of the jobs that need attention the overview names.
ATTENTION_SHOWN = 10


@dataclass(frozen=True)
class JobReport:
    """A job, its chunks, and each chunk's attempts (a list under the chunk's "history" key;
    "attempts" stays the chunk's attempt count)."""

    job: dict[str, Any]
    chunks: list[dict[str, Any]]


@dataclass(frozen=True)
class JobFilter:
    """Which jobs a listing shows; empty or None: any."""

    states: tuple[str, ...] = ()
    store_id: UUID | None = None
    since: timedelta | None = None  # created within


@dataclass(frozen=True)
class JobOverview:
    """`status` without a job: the jobs by state and the ones that need attention (of the
    filter's store and period, whatever their state), then one page of the jobs the filter
    matches, newest first."""

    by_state: dict[str, int]  # every state, 0 when none
    attention: list[dict[str, Any]]  # jobs with stuck chunks, then failed jobs, newest first
    attention_total: int
    stuck_jobs: int  # of attention_total, the jobs with stuck chunks
    jobs: list[dict[str, Any]]  # rows as job_rows returns them
    total: int  # jobs the filter matches
    limit: int


@dataclass(frozen=True)
class Page:
    """At most `limit` rows of `total`."""

    rows: list[dict[str, Any]]
    total: int
    limit: int | None


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


def job_overview(
    conn: Connection,
    selection: JobFilter | None = None,
    *,
    limit: int = DEFAULT_LIMIT,
    stuck_after: timedelta = STUCK_AFTER,
) -> JobOverview:
    """Jobs by state and those that need attention, then the newest `limit` jobs the
    selection matches with their progress (see job_rows)."""
    selection = selection or JobFilter()
    scope = {"store_id": selection.store_id, "since": selection.since}
    counts = {
        row["status"]: row["jobs"]
        for row in conn.execute(query("report_job_states"), scope).fetchall()
    }
    attention = conn.execute(
        query("report_jobs_needing_attention"),
        {**scope, "stuck_after": stuck_after, "limit": ATTENTION_SHOWN},
    ).fetchall()
    page = conn.execute(
        query("report_job_page"),
        {**scope, "states": list(selection.states) or None, "limit": limit},
    ).fetchall()
    order = {row["job_id"]: i for i, row in enumerate(page)}
    rows = job_rows(conn, job_ids=order, stuck_after=stuck_after) if order else []
    return JobOverview(
        by_state={state: counts.get(state, 0) for state in JOB_STATES},
        attention=[
            {key: value for key, value in row.items() if key not in ("total", "stuck_total")}
            for row in attention
        ],
        attention_total=attention[0]["total"] if attention else 0,
        stuck_jobs=attention[0]["stuck_total"] if attention else 0,
        jobs=sorted(rows, key=lambda row: order[row["job_id"]]),
        total=page[0]["total"] if page else 0,
        limit=limit,
    )


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
    return stores_kept_current(conn).rows


def stores_kept_current(
    conn: Connection, *, store_id: UUID | None = None, limit: int | None = None
) -> Page:
    """store_currency, of one store when store_id is given, the `limit` furthest behind."""
    rows = conn.execute(
        query("report_store_currency"), {"store_id": store_id, "limit": limit}
    ).fetchall()
    total = rows[0]["total"] if rows else 0
    return Page([_without_total(row) for row in rows], total, limit)


def stores(
    conn: Connection,
    *,
    search: str | None = None,
    since: timedelta | None = None,
    limit: int | None = DEFAULT_LIMIT,
) -> Page:
    """Registered stores, newest first, with their active job ("active_job_id"): those whose
    email or name holds `search` (any case), added within `since`, at most `limit`."""
    rows = conn.execute(
        query("report_stores"), {"search": search or None, "since": since, "limit": limit}
    ).fetchall()
    total = rows[0]["total"] if rows else 0
    return Page([_without_total(row) for row in rows], total, limit)


def _without_total(row: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in row.items() if key != "total"}


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
