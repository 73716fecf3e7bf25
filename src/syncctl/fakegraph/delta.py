"""``.../mailFolders/{id}/messages/delta``: rounds of a folder's messages and their tokens.

Without a token, a full round: every message in the folder now, in index
order. With a ``$deltatoken``, a change round: every message changed in or
out of the folder since the round that handed the token out started (added,
edited or moved in: the whole item; deleted or moved out: ``@removed``).
Pages are ``Prefer: odata.maxpagesize=N`` long (10 when not asked; at most
1000); every page but the last has an ``@odata.nextLink`` (``$skiptoken``),
the last an ``@odata.deltaLink`` (``$deltatoken``) for the next round.

Tokens are opaque: base64 of the folder, the mailbox's change version the
round started at (the next round reports what changed after it), the last
index handed out (pages are keyset, so changes do not shift them), the round's
``$select`` and the generation that expire_delta_tokens() and (for page
tokens) expire_links() make stale. A stale or undecodable token is 410 Gone
``syncStateNotFound`` with a ``Location`` that starts a full round again.
"""

from __future__ import annotations

import base64
import bisect
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from syncctl.fakegraph import odata
from syncctl.fakegraph.content import PROPERTIES
from syncctl.fakegraph.mailbox import Mailbox, MailFolder

if TYPE_CHECKING:
    from syncctl.fakegraph.server import FakeGraphServer

DEFAULT_PAGE = 10
MAX_PAGE = 1000
MESSAGE_TYPE = "#microsoft.graph.message"
# Query options Graph's message delta does not take (or this server does not).
UNSUPPORTED = ("$top", "$skip", "$orderby", "$filter", "$count", "$search", "$expand")
_ITEM_START = b'{"@odata.type":"#microsoft.graph.message",'


@dataclass(frozen=True)
class DeltaToken:
    """What a $deltatoken (page False) or $skiptoken (page True) stands for."""

    page: bool
    folder: str  # the folder's id
    start: int  # the mailbox's version when the round began: the next round's `since`
    since: int | None  # changes after this version; None: a full round
    after: int  # the last index the round handed out
    select: str | None
    generation: int  # the mailbox's delta generation
    links: int  # the server's link generation (expire_links)

    def encode(self) -> str:
        fields = [
            "p" if self.page else "d",
            self.folder,
            self.start,
            self.since,
            self.after,
            self.select,
            self.generation,
            self.links,
        ]
        text = json.dumps(fields, separators=(",", ":"))
        return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str) -> DeltaToken | None:
        """The token's fields; None when it is not a token of this server."""
        try:
            fields = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
            kind, folder, start, since, after, select, generation, links = fields
        except (ValueError, TypeError):  # not base64, not JSON, not eight fields
            return None
        if (
            kind not in ("p", "d")
            or not isinstance(folder, str)
            or not all(_is_int(n) for n in (start, after, generation, links))
            or not (since is None or _is_int(since))
            or not (select is None or isinstance(select, str))
        ):
            return None
        return cls(kind == "p", folder, start, since, after, select, generation, links)


@dataclass(frozen=True)
class _Round:
    """The round a request pages: as DeltaToken, for its folder."""

    start: int
    since: int | None
    after: int
    select: str | None


def answer(
    server: FakeGraphServer,
    mailbox: Mailbox,
    reference: str,
    query: dict[str, str],
    prefer: str,
) -> odata.Answer:
    """One page of a delta round of the folder `reference` (an id or a well-known name)."""
    for option in UNSUPPORTED:
        if option in query:
            raise odata.BadQuery(
                "ErrorInvalidUrlQuery",
                f"The query parameter '{option}' is not supported with delta queries.",
            )
    delta_token, page_token = query.get("$deltatoken"), query.get("$skiptoken")
    if delta_token is not None and page_token is not None:
        raise odata.BadQuery("BadRequest", "Give either $deltatoken or $skiptoken, not both.")
    size, asked = page_size(prefer)
    with server.mail_lock:
        folder = mailbox.folder(reference)
        if folder is None:
            raise odata.not_found()
        round_ = _round(
            server, mailbox, folder, query, delta_token=delta_token, page_token=page_token
        )
        select = odata.parse_select(round_.select, PROPERTIES, "message")
        if round_.since is None:
            chosen = mailbox.members_after(folder.number, round_.after, size + 1)
            items = [(index, True) for index in chosen[:size]]
        else:
            touched = mailbox.touched(folder.number, round_.since, round_.start)
            first = bisect.bisect_right(touched, round_.after)
            chosen = touched[first : first + size + 1]
            items = [(i, mailbox.folder_of(i) == folder.number) for i in chosen[:size]]
        last = len(chosen) <= size
        token = DeltaToken(
            page=not last,
            folder=folder.id,
            start=round_.start,
            since=None if last else round_.since,
            after=-1 if last else items[-1][0],
            select=round_.select,
            generation=mailbox.delta_generation,
            links=server.link_generation,
        )
        url = delta_url(server, mailbox, folder)
    link_name, link = (
        ("@odata.deltaLink", f"{url}?$deltatoken={token.encode()}")
        if last
        else ("@odata.nextLink", f"{url}?$skiptoken={token.encode()}")
    )
    rendered = []
    for index, held in items:
        if held:
            rendered.append(_ITEM_START + server._message_json(mailbox, index, select)[1:])
        else:
            removed = {"@odata.type": MESSAGE_TYPE, "id": mailbox.message_id(index)}
            rendered.append(odata.json_bytes({**removed, "@removed": {"reason": "deleted"}}))
    body = b"".join(
        [
            b'{"@odata.context":',
            odata.json_bytes(f"{server.url}/$metadata#Collection(message)"),
            b',"value":[',
            b",".join(rendered),
            b"],",
            odata.json_bytes(link_name),
            b":",
            odata.json_bytes(link),
            b"}",
        ]
    )
    headers = {"Preference-Applied": f"odata.maxpagesize={size}"} if asked else {}
    return odata.Answer(200, body, headers=headers, message_count=len(items))


def page_size(prefer: str) -> tuple[int, bool]:
    """The page size a Prefer header asks for (odata.maxpagesize, at most MAX_PAGE),
    and whether it asked; DEFAULT_PAGE when it did not, or not with a positive number."""
    for preference in prefer.split(","):
        name, _, value = preference.strip().partition("=")
        if name.strip().lower() == "odata.maxpagesize":
            try:
                size = int(value.strip().strip('"'))
            except ValueError:
                return DEFAULT_PAGE, False
            return (min(size, MAX_PAGE), True) if size > 0 else (DEFAULT_PAGE, False)
    return DEFAULT_PAGE, False


def delta_url(server: FakeGraphServer, mailbox: Mailbox, folder: MailFolder) -> str:
    """The folder's delta URL, without a token."""
    return f"{server.mailbox_url(mailbox)}/mailFolders/{quote(folder.id, safe='')}/messages/delta"


def _round(
    server: FakeGraphServer,
    mailbox: Mailbox,
    folder: MailFolder,
    query: dict[str, str],
    *,
    delta_token: str | None,
    page_token: str | None,
) -> _Round:
    """The round a request pages: a new full one, or the one its token names."""
    if delta_token is None and page_token is None:
        select = query.get("$select")
        odata.parse_select(select, PROPERTIES, "message")  # refused now, not on a later page
        return _Round(mailbox.version, None, -1, select)
    text = page_token if page_token is not None else delta_token
    assert text is not None
    token = DeltaToken.decode(text)
    if token is None:
        raise _gone(server, mailbox, folder, query.get("$select"))
    stale = (
        token.page != (page_token is not None)
        or token.folder != folder.id
        or token.generation != mailbox.delta_generation
        or (token.page and token.links != server.link_generation)
        or not 0 <= token.start <= mailbox.version
        or (token.since is not None and not 0 <= token.since <= token.start)
    )
    if stale:
        raise _gone(server, mailbox, folder, token.select)
    if token.page:
        return _Round(token.start, token.since, token.after, token.select)
    # A delta link: the changes since the round that handed it out began.
    return _Round(mailbox.version, token.start, -1, token.select)


def _gone(
    server: FakeGraphServer, mailbox: Mailbox, folder: MailFolder, select: str | None
) -> odata.BadQuery:
    location = delta_url(server, mailbox, folder)
    if select:
        location += f"?$select={quote(select, safe=',')}"
    return odata.BadQuery(
        "syncStateNotFound",
        "The sync state is not found or has expired; start a new round from the Location URL.",
        status=410,
        headers={"Location": location},
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
