"""A mailbox's folders (with their counts), and delta rounds of one folder's messages.

Folders: `mailFolders` and, level by level, each folder's `childFolders`,
hidden ones included (`includeHiddenFolders=true`): a full job's listing
(`/messages`) is not limited to visible folders, so the rounds must not be
either, or messages the full job stored in a hidden folder would look
deleted.

A delta round of a folder: without a link, a full round (every message of
the folder, page by page, then a delta link); from the last round's delta
link, only what changed since: messages added, edited or moved in as whole
items, and `@removed` ids for messages deleted or moved out. No `$filter`:
Graph caps a filtered delta at 5,000 messages.
"""

from __future__ import annotations

from collections import deque
from typing import Any
from urllib.parse import quote

import orjson

from syncctl.cleantext import clean_escapes
from syncctl.graph.client import IMMUTABLE_IDS, GraphClient, Reply, describe, origin
from syncctl.graph.messages import (
    COUNT_HEADERS,
    SELECT_FIELDS,
    message_from_graph,
    page_document,
    plain_count,
    window_filter,
)
from syncctl.mailsource import (
    PAGE_SIZE,
    DeltaPage,
    DeltaStateLost,
    Folder,
    FolderGone,
    MailSourceError,
    Window,
)

# Graph's error codes for a delta state it no longer has.
_STATE_LOST_CODES = frozenset({"syncstatenotfound", "resyncrequired", "syncstateinvalid"})
_FOLDER_FIELDS = "id,displayName,parentFolderId,childFolderCount,totalItemCount"
# Folders per request: Graph's default page of folders is 10.
_FOLDER_PAGE = 250


def folders(client: GraphClient, mailbox: str) -> list[Folder]:
    """Every mail folder of the mailbox, hidden ones too, parents before their children."""
    found: list[Folder] = []
    pending: deque[tuple[str, str]] = deque([("mailFolders", "")])
    while pending:
        path, parent = pending.popleft()
        for item in _folder_pages(client, mailbox, path):
            folder = Folder(
                id=item["id"],
                path=f"{parent}/{item['name']}" if parent else item["name"],
                total=item["total"],
            )
            found.append(folder)
            if item["children"]:
                pending.append((f"mailFolders/{_segment(folder.id)}/childFolders", folder.path))
    return found


def folder_total(client: GraphClient, mailbox: str, folder_id: str) -> int:
    """The folder's totalItemCount: one request."""
    reply = client.get(
        mailbox,
        client.mailbox_url(mailbox, f"mailFolders/{_segment(folder_id)}"),
        {"$select": _FOLDER_FIELDS},
        expect=lambda reply: _folder_refusal(client, mailbox, folder_id, reply),
    )
    document = _document(client, mailbox, reply, "a folder")
    total = document.get("totalItemCount")
    if not isinstance(total, int) or isinstance(total, bool) or total < 0:
        raise MailSourceError(
            f"Graph gave no totalItemCount for folder {folder_id} of mailbox {mailbox}."
        )
    return total


def folder_count(client: GraphClient, mailbox: str, folder_id: str, window: Window) -> int:
    """How many messages of the folder were received in the window: one `$count` request."""
    reply = client.get(
        mailbox,
        client.mailbox_url(mailbox, f"mailFolders/{_segment(folder_id)}/messages/$count"),
        {"$filter": window_filter(window)},
        COUNT_HEADERS,
        expect=lambda reply: _folder_refusal(client, mailbox, folder_id, reply),
    )
    return plain_count(client, mailbox, reply)


def delta_page(
    client: GraphClient, mailbox: str, folder_id: str, link: str | None, *, page_size: int
) -> DeltaPage:
    """One page of the folder's delta round, from link or (None) a full round's start."""
    headers = {"Prefer": f"{IMMUTABLE_IDS}, odata.maxpagesize={max(1, min(page_size, PAGE_SIZE))}"}

    def expect(reply: Reply) -> MailSourceError | None:
        return _folder_refusal(client, mailbox, folder_id, reply)

    if link is None:
        url = client.mailbox_url(mailbox, f"mailFolders/{_segment(folder_id)}/messages/delta")
        reply = client.get(
            mailbox, url, {"$select": ",".join(SELECT_FIELDS)}, headers, expect=expect
        )
    else:
        if not client.same_origin(link):
            # Saved for another Graph endpoint (SYNCCTL_GRAPH_URL changed since):
            # never sent the token; the folder starts over from the configured one.
            raise DeltaStateLost(
                f"The delta link of folder {folder_id} of mailbox {mailbox} is for "
                f"{origin(link)}, not the configured Graph; the folder needs a full round."
            )
        reply = client.get(mailbox, link, None, headers, expect=expect)
    try:
        return parse_delta_page(reply.content)
    except ValueError as exc:
        raise MailSourceError(
            f"Graph returned a delta page of mailbox {mailbox} that is not valid Graph JSON "
            f"({client.scrub(str(exc))}); nothing of it was written."
        ) from None


def parse_delta_page(content: bytes) -> DeltaPage:
    """A delta response as a DeltaPage, its text cleaned for PostgreSQL;
    ValueError when it is not one."""
    document = page_document(content)
    next_link = document.get("@odata.nextLink")
    delta_link = document.get("@odata.deltaLink")
    for name, value in (("nextLink", next_link), ("deltaLink", delta_link)):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"'@odata.{name}' is not a string")
    if not next_link and not delta_link:
        raise ValueError("neither '@odata.nextLink' nor '@odata.deltaLink' in the answer")
    messages, removed = [], []
    for position, item in enumerate(document["value"]):
        if not isinstance(item, dict) or not isinstance(item.get("id"), str) or not item["id"]:
            raise ValueError(f"item {position} of the page is not a message with an id")
        if "@removed" in item:
            removed.append(item["id"])
        else:
            messages.append(message_from_graph(item))
    return DeltaPage(
        messages=messages,
        removed=removed,
        next_link=next_link or None,
        delta_link=None if next_link else delta_link,
    )


def _folder_pages(client: GraphClient, mailbox: str, path: str) -> list[dict[str, Any]]:
    """Every folder of one listing (all its pages), as {id, name, total, children}."""
    items: list[dict[str, Any]] = []
    url: str | None = client.mailbox_url(mailbox, path)
    params: dict[str, str] | None = {
        "$select": _FOLDER_FIELDS,
        "$top": str(_FOLDER_PAGE),
        "includeHiddenFolders": "true",
    }
    while url is not None:
        reply = client.get(mailbox, url, params)
        document = _document(client, mailbox, reply, "a folder listing")
        for position, item in enumerate(document["value"]):
            if not isinstance(item, dict) or not isinstance(item.get("id"), str):
                raise MailSourceError(
                    f"Graph listed folder {position} of mailbox {mailbox} without an id."
                )
            total = item.get("totalItemCount")
            items.append(
                {
                    "id": item["id"],
                    "name": str(item.get("displayName") or item["id"]),
                    "total": total if isinstance(total, int) else None,
                    "children": bool(item.get("childFolderCount")),
                }
            )
        link = document.get("@odata.nextLink")
        url, params = (link, None) if isinstance(link, str) and link else (None, None)
        if url is not None:
            client.check_link(mailbox, url)
    return items


def _document(client: GraphClient, mailbox: str, reply: Reply, what: str) -> dict[str, Any]:
    try:
        document = orjson.loads(clean_escapes(reply.content))
    except orjson.JSONDecodeError:
        document = None
    if not isinstance(document, dict):
        raise MailSourceError(
            f"Graph answered {what} of mailbox {mailbox} with something that is not JSON."
        )
    if "value" in document and not isinstance(document["value"], list):
        raise MailSourceError(f"Graph answered {what} of mailbox {mailbox} without a list.")
    document.setdefault("value", [])
    return document


def _folder_refusal(
    client: GraphClient, mailbox: str, folder_id: str, reply: Reply
) -> MailSourceError | None:
    """The error for a 4xx about the folder or its delta state; None: not one."""
    code = _error_code(reply).lower()
    what = client.scrub(describe(reply))
    if reply.status == 410 or code in _STATE_LOST_CODES:
        return DeltaStateLost(
            f"Graph no longer has the delta state of folder {folder_id} of mailbox {mailbox} "
            f"({what}); the folder needs a full round."
        )
    if reply.status == 404 and code == "erroritemnotfound":
        return FolderGone(f"Folder {folder_id} of mailbox {mailbox} no longer exists ({what}).")
    return None


def _error_code(reply: Reply) -> str:
    try:
        error = orjson.loads(reply.content).get("error", {})
        return str(error.get("code", ""))
    except (orjson.JSONDecodeError, AttributeError):
        return ""


def _segment(folder_id: str) -> str:
    """A folder id as one URL path segment (ids may hold '/' and '+')."""
    return quote(folder_id, safe="")
