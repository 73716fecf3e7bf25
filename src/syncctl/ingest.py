"""Writing a page of messages: clean, batch, upsert, checkpoint, in one transaction."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import psycopg
from psycopg.types.json import Jsonb

from syncctl.cleantext import clean_escapes, clean_json, clean_text
from syncctl.db import Connection, query
from syncctl.mailsource import Message
from syncctl.queue import Chunk


class LeaseLost(Exception):
    """This worker no longer holds the chunk: it was reaped, cancelled or reset."""


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
    the page is committed. The page goes in whole or not at all, in the
    same transaction.
    """
    with conn.transaction():
        synced = save_checkpoint(conn, chunk, checkpoint, counted=len(messages), lease=lease)
        if messages:
            _store(conn, chunk, messages)
        return synced


def save_checkpoint(
    conn: Connection, chunk: Chunk, checkpoint: dict[str, Any], *, counted: int, lease: timedelta
) -> int:
    """The fence of a page: save the chunk's checkpoint, add counted to its
    emails_synced and extend its lease, only while this claim holds it (else
    LeaseLost); the row stays locked against the reaper until the caller's
    transaction commits. Returns emails_synced."""
    row = conn.execute(
        query("save_checkpoint"),
        {
            "checkpoint": Jsonb(clean_json(checkpoint)),
            "page_size": counted,
            "lease": lease,
            "chunk_id": chunk.id,
            "claim_seq": chunk.claim_seq,
        },
    ).fetchone()
    if row is None:
        raise LeaseLost(
            f"{chunk} no longer belongs to claim {chunk.claim_seq} of worker {chunk.worker_id}"
        )
    synced: int = row["emails_synced"]
    return synced


def _store(conn: Connection, chunk: Chunk, messages: list[Message]) -> None:
    """New messages go in by binary COPY, the cheapest way into a table. A page
    that holds a message already stored (a retried or overlapping page, or one
    message twice) makes the COPY fail on the unique key; the page is then
    upserted instead, which changes only what changed."""
    try:
        try:
            _copy(conn, chunk, messages, clean=False)
        except (psycopg.errors.CharacterNotInRepertoire, UnicodeEncodeError):
            # Text PostgreSQL cannot hold (a NUL, a lone surrogate): clean every value.
            _copy(conn, chunk, messages, clean=True)
    except psycopg.errors.UniqueViolation:
        conn.execute(
            query("upsert_emails"),
            {
                "store_id": chunk.store_id,
                "sync_job_id": chunk.parent_sync_job_id,
                "page": page_json(messages),
            },
        )


# The types of copy_emails's columns, in its order: a binary COPY is typed by the client.
_COPY_TYPES = ["uuid", "uuid", *["text"] * 6, *["jsonb"] * 3, *["timestamptz"] * 2]
_COPY_TYPES += [*["boolean"] * 3, *["text"] * 6]


def _copy(conn: Connection, chunk: Chunk, messages: list[Message], *, clean: bool) -> None:
    text = clean_text if clean else _as_is
    # A savepoint: a failed COPY is undone and the page's transaction goes on.
    with conn.transaction(), conn.cursor() as cursor, cursor.copy(query("copy_emails")) as copy:
        copy.set_types(_COPY_TYPES)
        for m in messages:
            copy.write_row(
                (
                    chunk.store_id,
                    chunk.parent_sync_job_id,
                    text(m.provider_message_id),
                    text(m.internet_message_id),
                    text(m.conversation_id),
                    text(m.subject),
                    text(m.from_address),
                    text(m.from_name),
                    Jsonb(m.to_recipients, _json_bytes),
                    Jsonb(m.cc_recipients, _json_bytes),
                    Jsonb(m.bcc_recipients, _json_bytes),
                    _aware(m.received_at),
                    _aware(m.sent_at),
                    m.is_read,
                    m.is_draft,
                    m.has_attachments,
                    text(m.importance),
                    text(m.flag_status),
                    text(m.body_content_type),
                    text(m.body),
                    text(m.folder_id),
                    text(m.change_key),
                )
            )


def _as_is(value: str | None) -> str | None:
    return value


def _aware(moment: datetime | None) -> datetime | None:
    """A time without a zone is taken as UTC, as Graph's times are."""
    if moment is not None and moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment


def page_json(messages: list[Message]) -> str:
    """The page as one JSON array of rows, each message once, cleaned as
    clean_text cleans: no NUL, each lone surrogate made U+FFFD."""
    # One statement cannot upsert a row twice: the last copy of a message wins.
    rows = [vars(m) for m in {m.provider_message_id: m for m in messages}.values()]
    return _json_bytes(rows).decode("utf-8")


def _json_bytes(value: Any) -> bytes:
    """JSON PostgreSQL accepts as json and jsonb, its strings cleaned as clean_text cleans."""
    try:
        data = orjson.dumps(value, option=orjson.OPT_NAIVE_UTC)
    except orjson.JSONEncodeError:
        # A lone surrogate (orjson writes only valid UTF-8): clean value by value.
        data = orjson.dumps(clean_json(value), option=orjson.OPT_NAIVE_UTC)
    # NULs travel as \u0000 escapes, which PostgreSQL refuses in text and jsonb.
    return clean_escapes(data)
