"""Writing a page of messages: clean, batch, upsert, checkpoint, in one transaction."""

from __future__ import annotations

import json
import re
from dataclasses import fields
from datetime import datetime, timedelta
from typing import Any

from psycopg.types.json import Jsonb

from syncctl.db import Connection, query
from syncctl.mailsource import Message
from syncctl.queue import Chunk

_COLUMNS = [f.name for f in fields(Message)]
# A surrogate code point alone (JSON can escape one; UTF-8 cannot encode it).
_SURROGATE = re.compile("[\ud800-\udfff]")
# json's escape of a NUL: \u0000 after an even number of backslashes (an odd
# number means the message held a backslash followed by the text u0000).
_JSON_NUL = "\\u0000"
_JSON_NUL_ESCAPE = re.compile(r"(\\+)u0000")


class LeaseLost(Exception):
    """This worker no longer holds the chunk: it was reaped, cancelled or reset."""


def clean_text(value: str | None) -> str | None:
    """Text PostgreSQL can store: no NUL bytes, no lone surrogates (each becomes U+FFFD)."""
    if value is None:
        return None
    value = value.replace("\x00", "")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = _SURROGATE.sub("\ufffd", value)
    return value


def clean_json(value: Any) -> Any:
    """A JSON value with every string in it (keys too) cleaned: jsonb rejects \\u0000."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, dict):
        return {clean_text(str(k)): clean_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_json(v) for v in value]
    return value


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
    the page is committed. The page goes in as one multi-row upsert, so a
    page is stored whole or not at all.
    """
    with conn.transaction():
        row = conn.execute(
            query("save_checkpoint"),
            {
                "checkpoint": Jsonb(clean_json(checkpoint)),
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
            conn.execute(
                query("upsert_emails"),
                {
                    "store_id": chunk.store_id,
                    "sync_job_id": chunk.parent_sync_job_id,
                    "page": _page_json(messages),
                },
            )
        synced: int = row["emails_synced"]
        return synced


def _page_json(messages: list[Message]) -> str:
    """The page as one JSON array of rows, each message once, cleaned as
    clean_text cleans: no NUL, each lone surrogate made U+FFFD."""
    # One statement cannot upsert a row twice: the last copy of a message wins.
    unique = {m.provider_message_id: m for m in messages}.values()
    # Cleaned in the serialised page, not value by value: a page is one string.
    text = json.dumps([vars(m) for m in unique], **_JSON_OPTIONS)
    if _JSON_NUL in text:
        # A backslash before the escape needs the careful path; otherwise every match is a NUL.
        if "\\" + _JSON_NUL in text:
            text = _JSON_NUL_ESCAPE.sub(_without_nul, text)
        else:
            text = text.replace(_JSON_NUL, "")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = _SURROGATE.sub("\ufffd", text)
    return text


def _without_nul(match: re.Match[str]) -> str:
    backslashes = match[1]
    return backslashes[:-1] if len(backslashes) % 2 else match[0]


def _json_value(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"a message field of type {type(value).__name__} cannot be stored")


_JSON_OPTIONS: dict[str, Any] = {
    "ensure_ascii": False,
    "separators": (",", ":"),
    "default": _json_value,
}
