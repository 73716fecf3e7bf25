"""``/users/{mailbox}/messages`` and ``.../messages/$count``: every folder's messages by time;
``.../mailFolders/{id}/messages/$count``: one folder's.

``$top`` (1-1000, default 10), ``$skip``, ``$orderby=receivedDateTime asc|desc``,
a ``receivedDateTime`` ``$filter``, ``$select``, ``$count=true`` and an
absolute ``@odata.nextLink`` carrying a ``$skiptoken`` that expire_links()
can make stale. A count takes the same ``$filter``.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING
from urllib.parse import quote

from syncctl.fakegraph import odata
from syncctl.fakegraph.content import PROPERTIES
from syncctl.fakegraph.mailbox import Clauses, Mailbox

if TYPE_CHECKING:
    from syncctl.fakegraph.server import FakeGraphServer

_FILTER_CLAUSE = re.compile(r"^\s*(?P<prop>\w+)\s+(?P<op>eq|ne|gt|ge|lt|le)\s+(?P<value>\S+)\s*$")


def count(
    server: FakeGraphServer, mailbox: Mailbox, query: dict[str, str], folder: str | None = None
) -> odata.Answer:
    """GET .../messages/$count, or (folder: its id or well-known name) a folder's."""
    clauses = parse_filter(query.get("$filter"), None)
    with server.mail_lock:
        if folder is None:
            total = len(mailbox.listing(clauses))
        else:
            found = mailbox.folder(folder)
            if found is None:
                raise odata.not_found()
            if clauses:
                listing = mailbox.listing(clauses)
                total = sum(1 for index in listing if mailbox.folder_of(index) == found.number)
            else:
                total = mailbox.total(found.number)  # no listing: a mailbox of millions stays cheap
    return odata.Answer(200, str(total).encode(), content_type="text/plain; charset=utf-8")


def page(server: FakeGraphServer, mailbox: Mailbox, query: dict[str, str]) -> odata.Answer:
    top = odata.top(query)
    skip = odata.integer(query, "$skip", 0)
    descending = parse_orderby(query.get("$orderby"))
    clauses = parse_filter(
        query.get("$filter"), "receivedDateTime" if "$orderby" in query else None
    )
    select = odata.parse_select(query.get("$select"), PROPERTIES, "message")
    with server.mail_lock:
        generation = server.link_generation
        odata.check_page_link(query, generation)
        # A range or a fresh list: safe to read once the lock is released.
        listing = mailbox.listing(clauses)
    total = len(listing)
    indexes = (listing[::-1] if descending else listing)[skip : skip + top]
    context = f"{server.url}/$metadata#users('{quote(mailbox.name, safe='@')}')/messages"
    if select:
        context += f"({','.join(select)})"
    parts = [b'{"@odata.context":', odata.json_bytes(context)]
    if query.get("$count", "").lower() == "true":
        parts += [b',"@odata.count":', odata.json_bytes(total)]
    # Serialised message by message (the same bytes as one document), so a
    # subclass can keep each message's JSON instead of building it again.
    parts += [
        b',"value":[',
        b",".join(server._message_json(mailbox, i, select) for i in indexes),
        b"]",
    ]
    if skip + top < total:
        # $skip places the next page; $skiptoken says which links expire_links() refuses.
        params = {**query, "$skip": str(skip + top), "$skiptoken": odata.skiptoken(generation)}
        next_link = f"{server.mailbox_url(mailbox)}/messages?{odata.encode_query(params)}"
        parts += [b',"@odata.nextLink":', odata.json_bytes(next_link)]
    parts.append(b"}")
    return odata.Answer(200, b"".join(parts), message_count=len(indexes))


def parse_orderby(value: str | None) -> bool:
    """Whether the order is descending (Graph lists messages newest first by default)."""
    if value is None:
        return True
    words = value.split()
    if not words or words[0] != "receivedDateTime" or len(words) > 2:
        raise odata.BadQuery(
            "BadRequest", f"This server orders by receivedDateTime only, not {value!r}."
        )
    direction = words[1].lower() if len(words) == 2 else "asc"
    if direction not in ("asc", "desc"):
        raise odata.BadQuery("BadRequest", f"Invalid $orderby direction {words[1]!r}.")
    return direction == "desc"


def parse_filter(value: str | None, ordered_by: str | None) -> Clauses:
    """[(operator, time)] of a receivedDateTime filter joined by 'and'."""
    if value is None or not value.strip():
        return []
    clauses = []
    for number, text in enumerate(re.split(r"\s+and\s+", value.strip())):
        match = _FILTER_CLAUSE.match(text)
        if match is None:
            raise odata.BadQuery("BadRequest", "Invalid filter clause")
        if number == 0 and ordered_by is not None and match["prop"] != ordered_by:
            raise odata.BadQuery(
                "InefficientFilter",
                "The restriction or sort order is too complex for this operation.",
            )
        if match["prop"] != "receivedDateTime" or match["op"] == "ne":
            raise odata.BadQuery(
                "BadRequest", "This server filters on receivedDateTime with eq/gt/ge/lt/le only."
            )
        try:
            moment = datetime.fromisoformat(match["value"].replace("Z", "+00:00"))
        except ValueError:
            raise odata.BadQuery(
                "BadRequest", f"Invalid date {match['value']!r} in the filter."
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        clauses.append((match["op"], moment))
    return clauses
