"""One delta round of one folder: the chunk of an incremental job.

The round starts from the folder's saved delta link, or runs a full round
when there is none (a new folder, or Graph no longer has the state). Each
page is written in one transaction with the chunk's checkpoint (the round's
next link), so a killed worker's successor resumes mid-round, and a page
written twice changes nothing:

- messages added, edited or moved in are upserted with this folder, and
  a row marked deleted comes back; a message the store already holds at its
  version (Graph's changeKey), in this folder, is left alone;
- `@removed` ids are marked deleted only where syncctl still has them in
  this folder: a move is a removal from one folder and an addition in
  another, and the two folders' rounds run in either order;
- a full round remembers the ids it returned; when it ends, the folder's
  rows it did not return are marked deleted (what was deleted while
  syncctl was not looking, or while the delta state was dead).

The page with the round's delta link also saves it for the next round, in
the same transaction.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import psycopg.errors

from syncctl.db import Connection, query
from syncctl.errors import clause
from syncctl.ingest import LeaseLost, page_json, save_checkpoint
from syncctl.mailsource import (
    DeltaPage,
    DeltaSource,
    DeltaStateLost,
    FolderGone,
    MailSourceError,
    Message,
)
from syncctl.queue import Chunk

log = logging.getLogger(__name__)

# Times a page is written again after its transaction deadlocked with another round's.
DEADLOCK_RETRIES = 3


@dataclass
class RoundPosition:
    """Where a folder's round stands: the checkpoint of its chunk."""

    link: str | None  # the next page's link; None with full: the first page of a full round
    full: bool
    done: bool = False
    read: int = 0  # items read (messages and removals)
    # Why the round is a full one when it was not meant to be (expired delta state).
    full_reason: str | None = None

    @classmethod
    def of(cls, chunk: Chunk, saved_delta_link: str | None) -> RoundPosition:
        checkpoint = chunk.checkpoint
        if not checkpoint or "full" not in checkpoint:
            return cls(link=saved_delta_link, full=saved_delta_link is None)
        return cls(
            link=checkpoint.get("link") or None,
            full=bool(checkpoint["full"]),
            done=bool(checkpoint.get("done")),
            read=int(checkpoint.get("read") or 0),
            full_reason=checkpoint.get("full_reason"),
        )

    def checkpoint(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def run_round(
    conn: Connection,
    source: DeltaSource,
    chunk: Chunk,
    mailbox: str,
    *,
    lease: timedelta,
    should_stop: Callable[[], bool],
    lost: Callable[[], bool],
) -> bool:
    """Run the chunk's round from its checkpoint on; True once the round has
    ended (its delta link saved), False when stopped in between."""
    folder_id = chunk.folder_id
    if folder_id is None:
        raise MailSourceError(f"{chunk} names no folder", permanent=True)
    state = conn.execute(
        query("folder_state"), {"store_id": chunk.store_id, "folder_id": folder_id}
    ).fetchone()
    position = RoundPosition.of(chunk, state["delta_link"] if state else None)
    restarted = False
    while not position.done:
        if lost():
            raise LeaseLost(f"{chunk}: the heartbeat found the lease gone")
        if should_stop():
            return False
        try:
            page = source.delta_page(mailbox, folder_id, position.link)
        except DeltaStateLost as exc:
            if restarted or (position.full and position.link is None):
                # Refused at a full round's start, or again within the round this
                # attempt started: starting over once more would not end.
                raise MailSourceError(
                    f"{clause(str(exc))}, again within the full round this attempt started; "
                    "the chunk is tried again later"
                ) from None
            restarted = True
            log.warning("%s; running a full round of the folder instead", exc)
            _restart_full(conn, chunk, position, reason=str(exc), lease=lease)
            continue
        except FolderGone as exc:
            log.info("%s; marking its messages deleted", exc)
            _folder_gone(conn, chunk, position, lease=lease)
            return True
        if lost():
            raise LeaseLost(f"{chunk}: the heartbeat found the lease gone")
        write_delta_page(conn, chunk, page, position, lease=lease)
    return True


def write_delta_page(
    conn: Connection, chunk: Chunk, page: DeltaPage, position: RoundPosition, *, lease: timedelta
) -> int:
    """Write one page and advance position (and the chunk's checkpoint) past it,
    in one transaction; the rows it changed. Two folders' rounds of a store
    run at once; in the rare case their transactions still deadlock, the page
    is written again (it changes nothing twice) rather than failing the attempt."""
    position.link = page.next_link
    position.read += len(page.messages) + len(page.removed)
    position.done = page.delta_link is not None
    for attempt in range(1, DEADLOCK_RETRIES + 1):
        try:
            return _write_delta_page(conn, chunk, page, position, lease=lease)
        except psycopg.errors.DeadlockDetected:
            if attempt == DEADLOCK_RETRIES:
                raise
            log.info("%s: a page write deadlocked with another round; writing it again", chunk)
            time.sleep(random.uniform(0.05, 0.2) * attempt)
    raise AssertionError("unreachable")


def _write_delta_page(
    conn: Connection, chunk: Chunk, page: DeltaPage, position: RoundPosition, *, lease: timedelta
) -> int:
    folder_id = chunk.folder_id
    assert folder_id is not None
    keys = {"store_id": chunk.store_id, "folder_id": folder_id, "chunk_id": chunk.id}
    with conn.transaction():
        _fence(conn, chunk, position, lease=lease)
        news = _not_stored_as_is(conn, chunk, page)
        touched = sorted({m.provider_message_id for m in news} | set(page.removed))
        if touched:
            conn.execute(query("lock_page_rows"), {**keys, "ids": touched})
        changed = 0
        if news:
            changed += conn.execute(
                query("upsert_emails"),
                {
                    "store_id": chunk.store_id,
                    "sync_job_id": chunk.parent_sync_job_id,
                    "page": page_json(news),
                },
            ).rowcount
        if page.messages and position.full:
            ids = [m.provider_message_id for m in page.messages]
            conn.execute(query("remember_seen"), {**keys, "ids": ids})
        if page.removed:
            changed += conn.execute(query("mark_removed"), {**keys, "ids": page.removed}).rowcount
        if position.done:
            if position.full:
                changed += conn.execute(query("reconcile_full_round"), keys).rowcount
                conn.execute(query("forget_seen"), keys)
            conn.execute(
                query("save_folder_state"),
                {
                    **keys,
                    "folder_name": chunk.folder_name or folder_id,
                    "delta_link": page.delta_link,
                    "full": position.full,
                },
            )
        if changed:
            conn.execute(query("count_synced"), {"chunk_id": chunk.id, "count": changed})
    return changed


def _not_stored_as_is(conn: Connection, chunk: Chunk, page: DeltaPage) -> list[Message]:
    """The page's messages, in this folder, that the store does not hold at
    their version (Graph's changeKey changes with every change to a message),
    in this folder and not marked deleted. Only these are written: a first
    round after a full job, or a page read twice, leaves stored rows alone,
    without parsing their bodies into the database or locking them."""
    folder_id = chunk.folder_id
    here = [
        m if m.folder_id == folder_id else dataclasses.replace(m, folder_id=folder_id)
        for m in page.messages
    ]
    if not here:
        return []
    stored = {
        row["provider_message_id"]: row
        for row in conn.execute(
            query("stored_versions"),
            {"store_id": chunk.store_id, "ids": [m.provider_message_id for m in here]},
        )
    }
    return [
        m
        for m in here
        if (row := stored.get(m.provider_message_id)) is None
        or m.change_key is None
        or row["change_key"] != m.change_key
        or row["folder_id"] != folder_id
        or row["deleted"]
    ]


def _restart_full(
    conn: Connection, chunk: Chunk, position: RoundPosition, *, reason: str, lease: timedelta
) -> None:
    """Graph dropped the folder's state: forget it, and run a full round from the start."""
    position.link, position.full, position.read = None, True, 0
    position.full_reason = reason
    keys = {"store_id": chunk.store_id, "folder_id": chunk.folder_id, "chunk_id": chunk.id}
    with conn.transaction():
        _fence(conn, chunk, position, lease=lease)
        conn.execute(query("drop_delta_link"), keys)
        conn.execute(query("forget_seen"), keys)


def _folder_gone(
    conn: Connection, chunk: Chunk, position: RoundPosition, *, lease: timedelta
) -> None:
    position.link, position.done = None, True
    keys = {"store_id": chunk.store_id, "folder_id": chunk.folder_id, "chunk_id": chunk.id}
    with conn.transaction():
        _fence(conn, chunk, position, lease=lease)
        row = conn.execute(query("folder_gone"), keys).fetchone()
        conn.execute(query("forget_seen"), keys)
        if row and row["marked"]:
            conn.execute(query("count_synced"), {"chunk_id": chunk.id, "count": row["marked"]})


def _fence(conn: Connection, chunk: Chunk, position: RoundPosition, *, lease: timedelta) -> None:
    # What a page changed is counted once it is written (count_synced).
    save_checkpoint(conn, chunk, position.checkpoint(), counted=0, lease=lease)
