"""Creating incremental jobs: one chunk per mail folder, each a delta round.

The folders are found when the job is created (every folder of the mailbox,
hidden ones too: a full job's listing reaches their messages as well). A
folder syncctl knew that is gone now had its messages deleted with it: its
rows are marked deleted and its state dropped, in the transaction that
creates the job. A folder without state runs a full round.

`create --all` (for cron) enqueues a job for each store that is due: no
active job, and no job of the type completed within --older-than.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import timedelta
from uuid import UUID

from syncctl.db import Connection, query
from syncctl.errors import BadInput
from syncctl.jobs import (
    Store,
    check_job_options,
    find_store,
    insert_parent_job,
    refuse_active_job,
    take_over_store,
)
from syncctl.mailsource import MAILBOX_CONCURRENCY, DeltaSource, MailSourceError

INCREMENTAL = "incremental"


@dataclass(frozen=True)
class FolderChunk:
    chunk_index: int
    folder_id: str
    folder: str
    messages: int | None
    round: str  # "delta" (from the saved link) or "full"


@dataclass(frozen=True)
class CreatedIncrementalJob:
    job_id: UUID
    store: Store
    parallel: int
    chunks: list[FolderChunk]
    folders_gone: int
    rows_marked_deleted: int
    cancelled_job_id: UUID | None


def create_incremental_job(
    conn: Connection,
    source: DeltaSource,
    *,
    store_ref: str,
    priority: int = 1,
    max_attempts: int = 3,
    parallel: int = MAILBOX_CONCURRENCY,
    force: bool = False,
    full_rounds: Collection[str] = (),
) -> CreatedIncrementalJob:
    """Find the store's folders and create a job with one delta-round chunk per
    folder; the folders in full_rounds (ids) run a full round whatever their state."""
    check_job_options(max_attempts=max_attempts, priority=priority, parallel=parallel)
    store = find_store(conn, store_ref)
    refuse_active_job(conn, store, force=force)
    folders = source.folders(store.email)

    with conn.transaction():
        cancelled = take_over_store(conn, store, force=force)
        folder_ids = [f.id for f in folders]
        gone = conn.execute(
            query("forget_gone_folders"), {"store_id": store.id, "folder_ids": folder_ids}
        ).fetchone()
        assert gone is not None
        if full_rounds:
            conn.execute(
                query("force_full_rounds"), {"store_id": store.id, "folder_ids": list(full_rounds)}
            )
        with_state = {
            row["folder_id"]
            for row in conn.execute(
                query("folders_with_delta_link"), {"store_id": store.id}
            ).fetchall()
        }
        chunks = [
            FolderChunk(
                chunk_index=index,
                folder_id=folder.id,
                folder=folder.path,
                messages=folder.total,
                round="delta" if folder.id in with_state else "full",
            )
            for index, folder in enumerate(folders, start=1)
        ]
        job_id = _insert_job(
            conn, store, chunks, priority=priority, max_attempts=max_attempts, parallel=parallel
        )
    return CreatedIncrementalJob(
        job_id=job_id,
        store=store,
        parallel=parallel,
        chunks=chunks,
        folders_gone=gone["folders"],
        rows_marked_deleted=gone["rows"],
        cancelled_job_id=cancelled,
    )


def _insert_job(
    conn: Connection,
    store: Store,
    chunks: list[FolderChunk],
    *,
    priority: int,
    max_attempts: int,
    parallel: int,
) -> UUID:
    job = insert_parent_job(
        conn,
        store,
        "insert_incremental_job",
        {
            "priority": priority,
            "parallel": parallel,
            "max_attempts": max_attempts,
            "estimated_emails": sum(c.messages or 0 for c in chunks),
        },
    )
    conn.execute(
        query("insert_folder_chunks"),
        {
            "job_id": job["id"],
            "business_id": store.business_id,
            "store_id": store.id,
            "max_attempts": max_attempts,
            "chunk_indexes": [c.chunk_index for c in chunks],
            "folder_ids": [c.folder_id for c in chunks],
            "folder_names": [c.folder for c in chunks],
            "estimates": [c.messages or 0 for c in chunks],
        },
    )
    conn.execute(query("job_planned"), {"job_id": job["id"]})
    job_id: UUID = job["id"]
    return job_id


# -- create --all ---------------------------------------------------------------


@dataclass(frozen=True)
class DueStore:
    id: UUID
    email: str


@dataclass(frozen=True)
class Enqueued:
    """What `create --all` did for one due store: a job, or why not."""

    store: DueStore
    job_id: UUID | None
    chunks: int
    error: str | None


def due_stores(conn: Connection, *, sync_type: str, older_than: timedelta) -> list[DueStore]:
    """Stores with no active job and no job of sync_type completed within older_than."""
    rows = conn.execute(
        query("due_stores"), {"sync_type": sync_type, "older_than": older_than}
    ).fetchall()
    return [DueStore(row["id"], row["email"]) for row in rows]


def enqueue_due(
    conn: Connection,
    stores: list[DueStore],
    create_one: Callable[[str], tuple[UUID, int]],
) -> list[Enqueued]:
    """Create a job for each store with create_one(store id) -> (job id, chunks).
    A store whose job cannot be created (its mailbox gone, Graph refusing it,
    another job created meanwhile) is reported and the others go on."""
    done = []
    for store in stores:
        try:
            job_id, chunks = create_one(str(store.id))
        except (MailSourceError, BadInput) as exc:
            done.append(Enqueued(store, None, 0, str(exc)))
        else:
            done.append(Enqueued(store, job_id, chunks, None))
    return done
