"""Stores, and creating a sync job with its chunk plan."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from difflib import SequenceMatcher
from typing import Any
from uuid import UUID

import psycopg.errors
from psycopg.types.json import Jsonb

from syncctl.db import Connection, query
from syncctl.errors import BadInput
from syncctl.mailsource import MAILBOX_CONCURRENCY, MailboxNotFound, MailSource, Window
from syncctl.planning import PlannedChunk, chunk_size_for, plan_chunks

# The range of a PostgreSQL integer column.
_PG_INTEGER_MIN, _PG_INTEGER_MAX = -(2**31), 2**31 - 1
# How alike (difflib's ratio, 0 to 1) a registered email must be to a store
# reference that matches none to be offered instead.
_CLOSE = 0.6


@dataclass(frozen=True)
class Store:
    id: UUID
    name: str | None
    email: str
    business_id: UUID | None


@dataclass(frozen=True)
class CreatedJob:
    job_id: UUID
    store: Store
    window: Window
    estimated_emails: int
    chunk_size: int
    parallel: int
    chunks: list[PlannedChunk]
    cancelled_job_id: UUID | None


def add_store(
    conn: Connection,
    *,
    name: str,
    email: str,
    business_id: UUID | None = None,
    check_mailbox: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Register a mailbox. An email already registered is refused; so, with
    check_mailbox (asks the mail service, raises MailboxNotFound), is a mailbox
    the mail service does not know. The input is checked before the service is
    asked, and nothing is stored unless all is well."""
    email = email.strip()
    if "@" not in email or email.startswith("@") or email.endswith("@"):
        raise BadInput(f"{email!r} is not a mailbox address; give it as user@example.com.")
    if not name.strip():
        raise BadInput("The store name is empty; give one with --name.")
    _refuse_registered(conn, email)
    if check_mailbox is not None:
        try:
            check_mailbox(email)
        except MailboxNotFound as exc:
            raise BadInput(
                f"Mailbox {email} was not found in Graph ({exc.reason}); nothing was "
                "stored: check the address, or pass --no-check to register it without "
                "asking Graph."
            ) from None
    with conn.transaction():
        _refuse_registered(conn, email)  # again: another `store add` may have won meanwhile
        row = conn.execute(
            query("add_store"), {"name": name.strip(), "email": email, "business_id": business_id}
        ).fetchone()
    assert row is not None
    return row


def _refuse_registered(conn: Connection, email: str) -> None:
    existing = conn.execute(query("stores_by_email"), {"email": email}).fetchall()
    if existing:
        raise BadInput(
            f"A store with email {email} exists already (id {existing[0]['id']}); use that one."
        )


def list_stores(conn: Connection) -> list[dict[str, Any]]:
    return conn.execute(query("list_stores")).fetchall()


def find_store(conn: Connection, reference: str) -> Store:
    """A store by its id or its email."""
    reference = reference.strip()
    if "@" in reference:
        rows = conn.execute(query("stores_by_email"), {"email": reference}).fetchall()
        if len(rows) > 1:
            raise BadInput(
                f"{len(rows)} stores have the email {reference}; name one by its id "
                "(see `syncctl store list`)."
            )
    else:
        try:
            store_id = UUID(reference)
        except ValueError:
            raise BadInput(
                f"{reference!r} is neither a store id (a UUID) nor an email; "
                "see `syncctl store list`."
            ) from None
        rows = conn.execute(query("store_by_id"), {"id": store_id}).fetchall()
    if not rows:
        if "@" not in reference:
            raise BadInput(f"No store {reference}; `syncctl store list` shows the stores.")
        close = similar_emails(reference, [row["email"] for row in list_stores(conn)])
        if close:
            raise BadInput(f"No store {reference}; did you mean {_one_of(close)}?")
        raise BadInput(f"No store {reference}; add it with `syncctl store add` first.")
    return Store(**rows[0])


def similar_emails(email: str, registered: list[str], most: int = 3) -> list[str]:
    """Up to `most` of registered that email is likely a typo of, closest first:
    the part before the @ must be alike as well as the whole, or every mailbox
    of the same domain would look close."""
    wanted = email.strip().lower()
    local = wanted.partition("@")[0]
    scored = []
    for candidate in dict.fromkeys(e.strip() for e in registered if e and e.strip()):
        other = candidate.lower()
        whole = SequenceMatcher(None, wanted, other).ratio()
        alike = SequenceMatcher(None, local, other.partition("@")[0]).ratio()
        if whole >= _CLOSE and alike >= _CLOSE:
            scored.append((-whole, -alike, candidate))
    return [candidate for *_, candidate in sorted(scored)[:most]]


def _one_of(options: list[str]) -> str:
    return options[0] if len(options) == 1 else f"{', '.join(options[:-1])} or {options[-1]}"


def create_job(
    conn: Connection,
    source: MailSource,
    *,
    store_ref: str,
    received_from: datetime | None = None,
    received_to: datetime | None = None,
    chunk_size: int | None = None,
    sync_type: str = "manual",
    priority: int = 1,
    max_attempts: int = 3,
    parallel: int = MAILBOX_CONCURRENCY,
    force: bool = False,
) -> CreatedJob:
    """Count the store's window, cut it into time-window chunks, and create the
    parent job and its chunks in one transaction. A store with an active job is
    refused, unless force, which cancels that job first."""
    if chunk_size is not None and chunk_size < 1:
        raise BadInput(f"--chunk-size must be at least 1, not {chunk_size}.")
    # Stored as a PostgreSQL integer (in the metadata, read back as one).
    if chunk_size is not None and chunk_size > _PG_INTEGER_MAX:
        raise BadInput(f"--chunk-size must be at most {_PG_INTEGER_MAX}, not {chunk_size}.")
    check_job_options(max_attempts=max_attempts, priority=priority, parallel=parallel)
    # The window is frozen now: mail arriving later belongs to the next job.
    received_to = received_to or datetime.now(UTC)
    if received_from is not None and received_from >= received_to:
        raise BadInput(
            f"--from ({received_from.isoformat()}) is not before --to "
            f"({received_to.isoformat()}); swap them."
        )
    store = find_store(conn, store_ref)
    refuse_active_job(conn, store, force=force)
    window = Window(received_from, received_to)
    estimated = source.count(store.email, window)
    size = chunk_size or chunk_size_for(estimated, parallel)
    chunks = plan_chunks(source, store.email, window, count=estimated, chunk_size=size)

    with conn.transaction():
        cancelled = take_over_store(conn, store, force=force)
        job = insert_parent_job(
            conn,
            store,
            "insert_job",
            {
                "sync_type": sync_type,
                "priority": priority,
                "parallel": parallel,
                "sync_from": received_from,
                "sync_to": received_to,
                "metadata": Jsonb({"chunk_size": size}),
                "max_attempts": max_attempts,
                "estimated_emails": estimated,
            },
        )
        conn.execute(
            query("insert_window_chunks"),
            {
                "job_id": job["id"],
                "business_id": store.business_id,
                "store_id": store.id,
                "max_attempts": max_attempts,
                "chunk_indexes": [c.chunk_index for c in chunks],
                "window_starts": [c.window_start for c in chunks],
                "window_ends": [c.window_end for c in chunks],
                "start_offsets": [c.start_offset for c in chunks],
                "end_offsets": [c.end_offset for c in chunks],
                "estimates": [c.estimated_emails for c in chunks],
            },
        )
        conn.execute(query("job_planned"), {"job_id": job["id"]})
    return CreatedJob(
        job_id=job["id"],
        store=store,
        window=window,
        estimated_emails=estimated,
        chunk_size=size,
        parallel=parallel,
        chunks=chunks,
        cancelled_job_id=cancelled,
    )


def take_over_store(conn: Connection, store: Store, *, force: bool) -> UUID | None:
    """Inside the caller's transaction: lock the store against other creates
    and, if it has an active job, refuse (BadInput) or, with force, cancel it;
    the id of the job cancelled."""
    from syncctl.operations import cancel_job  # operator commands build on jobs

    conn.execute(query("lock_store"), {"store_id": store.id})
    active = conn.execute(query("active_job_of_store"), {"store_id": store.id}).fetchone()
    if active is None:
        return None
    refuse_active_job(conn, store, force=force)
    cancel_job(conn, active["id"], reason="superseded by a new job (create --force)")
    cancelled: UUID = active["id"]
    return cancelled


def insert_parent_job(
    conn: Connection, store: Store, query_name: str, params: dict[str, Any]
) -> dict[str, Any]:
    """Insert the store's new parent job with the named query (params plus the
    store's ids) as syncctl's own: a store's second active job is refused, not
    superseded (migration 0009). Returns the row (id, created_at)."""
    conn.execute(query("mark_own_job_insert"))
    try:
        job = conn.execute(
            query(query_name),
            {"business_id": store.business_id, "store_id": store.id, **params},
        ).fetchone()
    except psycopg.errors.UniqueViolation:
        raise BadInput(
            f"Store {store.email} got an active job while this one was being created; "
            "run `syncctl status` and try again."
        ) from None
    assert job is not None
    return job


def check_job_options(*, max_attempts: int, priority: int, parallel: int) -> None:
    """BadInput for options any job refuses."""
    if max_attempts < 1:
        raise BadInput(f"--max-attempts must be at least 1, not {max_attempts}.")
    if max_attempts > _PG_INTEGER_MAX:
        raise BadInput(f"--max-attempts must be at most {_PG_INTEGER_MAX}, not {max_attempts}.")
    if not _PG_INTEGER_MIN <= priority <= _PG_INTEGER_MAX:
        raise BadInput(
            f"--priority must be from {_PG_INTEGER_MIN} to {_PG_INTEGER_MAX}, not {priority}."
        )
    if not 1 <= parallel <= MAILBOX_CONCURRENCY:
        raise BadInput(
            f"--parallel must be from 1 to {MAILBOX_CONCURRENCY} (Graph serves a mailbox "
            f"{MAILBOX_CONCURRENCY} requests at a time), not {parallel}."
        )


def refuse_active_job(conn: Connection, store: Store, *, force: bool) -> None:
    active = conn.execute(query("active_job_of_store"), {"store_id": store.id}).fetchone()
    if active is not None and not force:
        raise BadInput(
            f"Store {store.email} already has a {active['status']} job ({active['id']}); "
            "wait for it, cancel it with `syncctl cancel`, or pass --force to replace it."
        )
