"""Listing a mailbox's messages by received time, and Graph's message JSON.

Planning a job counts a window ($count) and finds when the message at a
position was received ($skip, $top=1); a chunk lists its window page by page.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson

from syncctl.cleantext import clean_escapes
from syncctl.graph.client import GraphClient, Reply
from syncctl.mailsource import PAGE_SIZE, MailSourceError, Message, Page, Window

# Every property syncctl stores, and nothing more.
SELECT_FIELDS = (
    "id",
    "receivedDateTime",
    "sentDateTime",
    "subject",
    "from",
    "sender",
    "toRecipients",
    "ccRecipients",
    "bccRecipients",
    "internetMessageId",
    "conversationId",
    "isRead",
    "isDraft",
    "hasAttachments",
    "importance",
    "flag",
    "body",
    "parentFolderId",
    "changeKey",
)
# $orderby must name the first $filter property (else InefficientFilter), so
# a window without a start still filters from a date before any mail.
_EARLIEST = datetime(1900, 1, 1, tzinfo=UTC)
# Graph counts with a $filter only under eventual consistency.
COUNT_HEADERS = {"ConsistencyLevel": "eventual"}


def count(client: GraphClient, mailbox: str, window: Window) -> int:
    """How many messages the mailbox holds in the window ($count, filtered)."""
    reply = client.get(
        mailbox,
        client.mailbox_url(mailbox, "messages/$count"),
        {"$filter": window_filter(window)},
        COUNT_HEADERS,
    )
    return plain_count(client, mailbox, reply)


def plain_count(client: GraphClient, mailbox: str, reply: Reply) -> int:
    """The number a `$count` request answered with (plain text)."""
    text = reply.content.decode("utf-8-sig", "replace").strip()
    if not text.isdigit():
        raise MailSourceError(
            f"Graph answered the message count of mailbox {mailbox} with something "
            f"that is not a number: {client.scrub(text[:80])!r}."
        )
    return int(text)


def received_at(
    client: GraphClient, mailbox: str, window: Window, position: int
) -> datetime | None:
    """When the message at position of the window was received: one request
    for one message's receivedDateTime ($skip, $top=1)."""
    params = {
        "$filter": window_filter(window),
        "$orderby": "receivedDateTime asc",
        "$select": "receivedDateTime",
        "$top": "1",
    }
    if position > 0:
        params["$skip"] = str(position)
    reply = client.get(mailbox, client.mailbox_url(mailbox, "messages"), params)
    try:
        page = parse_page(reply.content)
    except ValueError as exc:
        raise MailSourceError(
            f"Graph answered a look-up in mailbox {mailbox} with something that is not "
            f"valid Graph JSON ({client.scrub(str(exc))})."
        ) from None
    if not page.messages:
        return None
    received = page.messages[0].received_at
    if received is None:
        raise MailSourceError(
            f"Graph gave no receivedDateTime for message {position} of mailbox {mailbox}."
        )
    return received


def fetch_page(
    client: GraphClient,
    mailbox: str,
    window: Window,
    *,
    skip: int,
    top: int,
    next_link: str | None = None,
) -> Page:
    """One page in receivedDateTime order: next_link as Graph gave it, else
    $top messages of the window after $skip."""
    if next_link is not None:
        client.check_link(mailbox, next_link)
        reply = client.get(mailbox, next_link, following_link=True)
    else:
        params = {
            "$filter": window_filter(window),
            "$orderby": "receivedDateTime asc",
            "$select": ",".join(SELECT_FIELDS),
            "$top": str(max(1, min(top, PAGE_SIZE))),
        }
        if skip > 0:
            params["$skip"] = str(skip)
        reply = client.get(mailbox, client.mailbox_url(mailbox, "messages"), params)
    try:
        return parse_page(reply.content)
    except ValueError as exc:
        raise MailSourceError(
            f"Graph returned a page of mailbox {mailbox} that is not valid Graph JSON "
            f"({client.scrub(str(exc))}); nothing of it was written."
        ) from None


# -- Graph JSON ---------------------------------------------------------------


def window_filter(window: Window) -> str:
    """The $filter of a window: receivedDateTime from (inclusive) to (exclusive)."""
    clauses = [f"receivedDateTime ge {_odata_time(window.received_from or _EARLIEST)}"]
    if window.received_to is not None:
        clauses.append(f"receivedDateTime lt {_odata_time(window.received_to)}")
    return " and ".join(clauses)


def _odata_time(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)  # a naive time is taken as UTC
    moment = moment.astimezone(UTC)
    fraction = f".{moment.microsecond:06d}" if moment.microsecond else ""
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + fraction + "Z"


def page_document(content: bytes) -> dict[str, Any]:
    """A Graph page of messages (a listing's or a delta round's) as JSON, its
    text cleaned for PostgreSQL; ValueError when it has no list of items."""
    try:
        document = orjson.loads(clean_escapes(content))
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"unparsable JSON: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("value"), list):
        raise ValueError("no 'value' list of messages in the answer")
    return document


def parse_page(content: bytes) -> Page:
    """A Graph list response as a Page, its text cleaned for PostgreSQL;
    ValueError when it is not one."""
    document = page_document(content)
    next_link = document.get("@odata.nextLink")
    if next_link is not None and not isinstance(next_link, str):
        raise ValueError("'@odata.nextLink' is not a string")
    messages = []
    for position, item in enumerate(document["value"]):
        if not isinstance(item, dict) or not isinstance(item.get("id"), str) or not item["id"]:
            raise ValueError(f"item {position} of the page is not a message with an id")
        messages.append(message_from_graph(item))
    return Page(messages=messages, next_link=next_link or None)


def message_from_graph(item: Mapping[str, Any]) -> Message:
    """A Graph message resource as a Message; odd or missing fields become None."""
    sender = _address(item.get("from")) or _address(item.get("sender")) or {}
    body = _object(item.get("body"))
    flag = _object(item.get("flag"))
    return Message(
        provider_message_id=str(item["id"]),
        received_at=_time(item.get("receivedDateTime")),
        internet_message_id=_text(item.get("internetMessageId")),
        conversation_id=_text(item.get("conversationId")),
        subject=_text(item.get("subject")),
        from_address=sender.get("address"),
        from_name=sender.get("name"),
        to_recipients=_recipients(item.get("toRecipients")),
        cc_recipients=_recipients(item.get("ccRecipients")),
        bcc_recipients=_recipients(item.get("bccRecipients")),
        sent_at=_time(item.get("sentDateTime")),
        is_read=_flag(item.get("isRead")),
        is_draft=_flag(item.get("isDraft")),
        has_attachments=_flag(item.get("hasAttachments")),
        importance=_text(item.get("importance")),
        flag_status=_text(flag.get("flagStatus")),
        body_content_type=_text(body.get("contentType")),
        body=_text(body.get("content")),
        folder_id=_text(item.get("parentFolderId")),
        change_key=_text(item.get("changeKey")),
    )


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _flag(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return None


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _address(recipient: Any) -> dict[str, str | None] | None:
    """{"name", "address"} of a Graph recipient ({"emailAddress": {...}})."""
    if not isinstance(recipient, dict) or not isinstance(recipient.get("emailAddress"), dict):
        return None
    email = recipient["emailAddress"]
    return {"name": _text(email.get("name")), "address": _text(email.get("address"))}


def _recipients(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        return []
    return [a for a in (_address(r) for r in value) if a is not None]
