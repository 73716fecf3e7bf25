"""Writing a page of messages: clean, upsert, checkpoint, in one transaction."""

from __future__ import annotations

from dataclasses import asdict
from datetime import timedelta
from typing import Any

from psycopg.types.json import Jsonb

from syncctl.db import Connection, query
from syncctl.mailsource import Message
from syncctl.queue import Chunk


class LeaseLost(Exception):
    """This worker no longer holds the chunk: it was reaped, cancelled or reset."""


def clean_text(value: str | None) -> str | None:
    """Text PostgreSQL can store: no NUL bytes, no lone surrogates."""
    if value is None:
        return None
    return value.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")


def write_page(
    conn: Connection,
    chunk: Chunk,
    messages: list[Message],
    *,
    checkpoint: dict[str, Any],
    lease: timedelta,
) -> int:
    """Store one page and advance the chunk's checkpoint; return emails_synced.

    The checkpoint is written first: it is the fence (a worker that lost the
    chunk writes nothing) and it locks the chunk against the reaper until
    the page is committed.
    """
    with conn.transaction():
        row = conn.execute(
            query("save_checkpoint"),
            {
                "checkpoint": Jsonb(checkpoint),
                "page_size": len(messages),
                "lease": lease,
                "chunk_id": chunk.id,
                "worker_id": chunk.worker_id,
                "attempt": chunk.attempts,
            },
        ).fetchone()
        if row is None:
            raise LeaseLost(f"{chunk} no longer belongs to worker {chunk.worker_id}")
        if messages:
            with conn.cursor() as cur:
                cur.executemany(query("upsert_email"), [_email_row(chunk, m) for m in messages])
        synced: int = row["emails_synced"]
        return synced


def _email_row(chunk: Chunk, message: Message) -> dict[str, Any]:
    row: dict[str, Any] = asdict(message)
    for key, value in row.items():
        if isinstance(value, str):
            row[key] = clean_text(value)
        elif isinstance(value, list):
            row[key] = Jsonb(value)
    row["store_id"] = chunk.store_id
    row["sync_job_id"] = chunk.parent_sync_job_id
    return row
