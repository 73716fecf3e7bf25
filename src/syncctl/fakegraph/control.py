"""The control endpoint: tests and the demo change the mailboxes of a server running elsewhere.

``POST /_fake/mailboxes/{email}/changes`` with a JSON object of counts, all
optional, ``{"add": 5, "edit": 3, "move": 2, "delete": 1,
"expire_delta_tokens": true}``: adds new messages to the Inbox, edits, moves
(each to another visible folder) and deletes messages picked at random, in
that order, then expires the mailbox's delta tokens; answered 200 with
``{"added": [ids], "edited": [ids], "moved": [{"id", "from", "to"}],
"deleted": [ids]}``. ``GET /_fake/mailboxes/{email}/folders`` answers
``{"value": [{"id", "name", "parent", "hidden", "total"}]}``, parents before
their children.

It is local test tooling: no bearer token, not in the record of requests,
no faults. Bad input is 400 with ``{"error": "<one sentence>"}``; a mailbox
not served is 404.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from syncctl.fakegraph import odata

if TYPE_CHECKING:
    from syncctl.fakegraph.server import FakeGraphServer

PREFIX = "/_fake"
# The most changes of one kind a request may ask for.
MAX_CHANGES = 100_000
COUNTS = ("add", "edit", "move", "delete")
_PATH = re.compile(rf"^{PREFIX}/mailboxes/(?P<mailbox>[^/]+)/(?P<what>changes|folders)/?$")
_JSON = "application/json; charset=utf-8"


def is_control(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


class _Refused(Exception):
    def __init__(self, status: int, sentence: str) -> None:
        super().__init__(sentence)
        self.status = status


def answer(server: FakeGraphServer, method: str, path: str, body: bytes) -> odata.Answer:
    """The answer to one request to the control endpoint."""
    try:
        return _json(200, _serve(server, method, path, body))
    except _Refused as exc:
        return _json(exc.status, {"error": str(exc)}, error_code="ControlRefused")


def _serve(server: FakeGraphServer, method: str, path: str, body: bytes) -> Any:
    match = _PATH.match(path)
    if match is None:
        raise _Refused(
            404,
            "No such control endpoint; use POST /_fake/mailboxes/{email}/changes "
            "or GET /_fake/mailboxes/{email}/folders.",
        )
    email, what = match["mailbox"], match["what"]
    expected = "POST" if what == "changes" else "GET"
    if method != expected:
        raise _Refused(405, f"Use {expected} for /_fake/mailboxes/{{email}}/{what}.")
    unknown = _Refused(404, f"No mailbox {email} is served here.")
    if not server.serves(email):
        raise unknown
    try:
        if what == "folders":
            return {"value": server.folders(email)}
        return server.apply_changes(email, **_changes(body))
    except KeyError:  # removed meanwhile
        raise unknown from None
    except ValueError as exc:
        raise _Refused(400, _sentence(str(exc))) from None


def _changes(body: bytes) -> dict[str, Any]:
    """The changes a request body asks for; ValueError with one sentence when it is not valid."""
    if not body.strip():
        return {}
    try:
        document = json.loads(body)
    except ValueError:
        raise ValueError(
            'The body is not JSON; send an object such as {"add": 5, "delete": 1}.'
        ) from None
    if not isinstance(document, dict):
        raise ValueError('The body must be a JSON object such as {"add": 5, "delete": 1}.')
    changes: dict[str, Any] = {}
    for name, value in document.items():
        if name in COUNTS:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name!r} must be a whole number of messages, not {value!r}.")
            if not 0 <= value <= MAX_CHANGES:
                raise ValueError(f"{name!r} must be from 0 to {MAX_CHANGES}, not {value}.")
        elif name == "expire_delta_tokens":
            if not isinstance(value, bool):
                raise ValueError(f"'expire_delta_tokens' must be true or false, not {value!r}.")
        else:
            raise ValueError(
                f"Unknown change {name!r}; give add, edit, move, delete or expire_delta_tokens."
            )
        changes[name] = value
    return changes


def _sentence(text: str) -> str:
    text = text.strip()
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


def _json(status: int, document: Any, *, error_code: str | None = None) -> odata.Answer:
    return odata.Answer(
        status, odata.json_bytes(document), content_type=_JSON, error_code=error_code
    )
