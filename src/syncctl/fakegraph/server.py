"""The server: its mailboxes' Python API, HTTP handling, routing, faults and the record."""

from __future__ import annotations

import contextlib
import logging
import random
import re
import secrets
import socket
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from syncctl.fakegraph import content, control, delta, folders, messages, odata
from syncctl.fakegraph.churn import Churn, apply_random
from syncctl.fakegraph.mailbox import Mailbox, MailFolder, whole_second

log = logging.getLogger(__name__)

# Requests kept in the record (a long load run must not grow without bound).
MAX_RECORDED = 100_000
# The largest request body read (only the control endpoint takes one).
MAX_BODY = 1 << 20

_USER_PATH = re.compile(rf"^{re.escape(odata.API_PREFIX)}/users/(?P<mailbox>[^/]+)(?P<rest>/.*)?$")
# A folder segment: /{id} or ('{id}'), as Graph's own links write it.
_FOLDER = r"(?:/(?P<folder>[^/()']+)|\('(?P<quoted>[^'/]+)'\))"
# An endpoint: (server, mailbox, folder named in the path or "", query, Prefer header) -> answer.
_Endpoint = Callable[["FakeGraphServer", Mailbox, str, dict[str, str], str], odata.Answer]
# What each path under /users/{mailbox} is.
_ROUTES: tuple[tuple[re.Pattern[str], _Endpoint], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), endpoint)
    for pattern, endpoint in (
        (r"^/messages/?$", lambda fake, mailbox, _, query, __: messages.page(fake, mailbox, query)),
        (
            r"^/messages/\$count/?$",
            lambda fake, mailbox, _, query, __: messages.count(fake, mailbox, query),
        ),
        (
            r"^/mailFolders/?$",
            lambda fake, mailbox, _, query, __: folders.listing(fake, mailbox, None, query),
        ),
        (
            rf"^/mailFolders{_FOLDER}/?$",
            lambda fake, mailbox, folder, query, _: folders.one(fake, mailbox, folder, query),
        ),
        (
            rf"^/mailFolders{_FOLDER}/messages/\$count/?$",
            lambda fake, mailbox, folder, query, _: messages.count(fake, mailbox, query, folder),
        ),
        (
            rf"^/mailFolders{_FOLDER}/childFolders/?$",
            lambda fake, mailbox, folder, query, _: folders.listing(fake, mailbox, folder, query),
        ),
        (rf"^/mailFolders{_FOLDER}/messages/delta(?:\(\))?/?$", delta.answer),
    )
)


@dataclass(frozen=True)
class ServedRequest:
    """One request as the server saw it. Times are time.monotonic().

    path is the URL's path, decoded: for a folder's requests it names the
    folder (as the client did: its id, or a well-known name such as inbox)."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # without Authorization
    mailbox: str | None
    authorized: bool
    status: int
    error_code: str | None
    message_count: int
    received_at: float
    answered_at: float


@dataclass
class _Fault:
    status: int
    retry_after: float | None
    code: str | None
    body: bytes | None
    hang: bool


class FakeGraphServer:
    """A Graph-compatible server on 127.0.0.1; use as a context manager or start()/stop().

    mailboxes: {email: number of messages}. seed: changes every generated
    message. token: the bearer token it accepts (generated when None).
    folders: each mailbox's folders, as add_mailbox takes them (None: the
    default layout). churn: random changes a second to each mailbox while
    the server runs (about half new messages, a quarter edits, the rest moves
    and deletes). Faults: throttle_rate (share of requests answered 429 with
    Retry-After retry_after seconds), error_rate (share answered
    500/502/503/504), latency (seconds added to each request), hang (share of
    requests never answered; True for all), enforce_concurrency (a mailbox's
    request beyond this many in flight gets 429 MailboxConcurrency, as Graph
    does; None: no limit). add_mailbox can give one mailbox its own
    throttle_rate, retry_after and latency, ties (same_time) and folders.

    A mailbox changes while it is read: delete_messages and delete_oldest take
    messages out, add_messages puts new ones in at any received times,
    deliver appends generated ones, edit_messages and move_messages change
    them, add_folder and delete_folder change the folders, and message_ids
    says what it holds now. Each change is logged for delta rounds.
    Messages are listed in receivedDateTime order; at one time, generated
    messages come first by index, then added ones in the order added
    (descending is the exact reverse). Added messages are numbered from
    FIRST_ADDED_INDEX up, so message(), received_at() and delete_messages()
    take their indexes too.

    before_answer(mailbox, query), when set, is called for every authorized
    request to an existing mailbox once it is counted in flight, before its
    faults, latency and answer: a test can block in it to hold the request
    back. If it raises, the request is answered 500 and the error logged.
    expire_links() makes every @odata.nextLink handed out so far stale (each
    link carries a $skiptoken of the generation it was made in): 400 for a
    listing's, 410 for a delta round's. expire_delta_tokens() makes every
    delta and page token of delta rounds stale (410).

    The control endpoint (see control.py) at control_url changes mailboxes
    from another process.
    """

    def __init__(
        self,
        mailboxes: Mapping[str, int] | None = None,
        *,
        seed: int = 0,
        token: str | None = None,
        port: int = 0,
        throttle_rate: float = 0.0,
        retry_after: float = 1.0,
        error_rate: float = 0.0,
        latency: float = 0.0,
        hang: float = 0.0,
        enforce_concurrency: int | None = 4,
        folders: int | Sequence[str] | None = None,
        churn: float = 0.0,
    ) -> None:
        if churn < 0:
            raise ValueError(f"churn is changes a second, zero or more, not {churn}")
        self.seed = seed
        self.token = token if token is not None else secrets.token_urlsafe(24)
        self.port = port
        self.throttle_rate = throttle_rate
        self.retry_after = retry_after
        self.error_rate = error_rate
        self.latency = latency
        self.hang = float(hang)
        self.enforce_concurrency = enforce_concurrency
        self.churn = churn
        self.before_answer: Callable[[str, dict[str, str]], None] | None = None
        # Guards the mailboxes and the link generation; its own lock, so a
        # listing never waits on the record or the in-flight counts.
        self.mail_lock = threading.Lock()
        self._mailboxes: dict[str, Mailbox] = {}
        self.link_generation = 0
        self._folders = folders
        for email, count in (mailboxes or {}).items():
            self.add_mailbox(email, count)
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        self._faults: deque[_Fault] = deque()
        self._record: deque[ServedRequest] = deque(maxlen=MAX_RECORDED)
        self._in_flight: dict[str, int] = {}
        self._max_in_flight: dict[str, int] = {}
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._churn: Churn | None = None

    def __repr__(self) -> str:
        return f"FakeGraphServer(url={self.url!r}, mailboxes={len(self._mailboxes)})"

    # -- lifecycle -------------------------------------------------------

    @property
    def url(self) -> str:
        """The Graph root to set as SYNCCTL_GRAPH_URL, e.g. http://127.0.0.1:PORT/v1.0."""
        return f"http://127.0.0.1:{self.port}{odata.API_PREFIX}"

    @property
    def control_url(self) -> str:
        """The root of the control endpoint, e.g. http://127.0.0.1:PORT/_fake."""
        return f"http://127.0.0.1:{self.port}{control.PREFIX}"

    def start(self) -> FakeGraphServer:
        if self._httpd is not None:
            return self
        self._stopping.clear()
        httpd = _HTTPServer(("127.0.0.1", self.port), _Handler)
        httpd.fake = self
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fake-graph",
            daemon=True,
        )
        self._thread.start()
        if self.churn > 0:
            self._churn = Churn(self.churn, lambda: self._mailboxes, self.mail_lock)
            self._churn.start()
        return self

    def stop(self) -> None:
        """Stop serving; requests left hanging are closed without an answer."""
        self._stopping.set()
        with self._lock:
            # Taken under the lock: serve() and its caller may both stop the server.
            httpd, self._httpd = self._httpd, None
            thread, self._thread = self._thread, None
            churning, self._churn = self._churn, None
            connections = list(self._connections)
        if churning is not None:
            churning.stop()
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        for connection in connections:
            # Kept-alive connections would otherwise still be served after stop().
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        if thread is not None:
            thread.join()

    def __enter__(self) -> FakeGraphServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until stop() (or timeout); True once stopped."""
        return self._stopping.wait(timeout)

    # -- mailboxes -------------------------------------------------------

    def add_mailbox(
        self,
        email: str,
        count: int,
        *,
        throttle_rate: float | None = None,
        retry_after: float | None = None,
        latency: float | None = None,
        same_time: int = 1,
        folders: int | Sequence[str] | None = None,
    ) -> None:
        """Serve a mailbox of count messages, each `same_time` consecutive ones
        received at one time; the fault settings given apply to its requests
        instead of the server's (one mailbox can throttle hard).

        folders: None for the server's choice (by default Inbox with a child
        Receipts, Sent Items, Archive, Deleted Items); N for N folders, the
        first the Inbox, some inside others from three on; or names, all at
        the top level. Generated messages are spread over the folders, the
        Inbox holding the most."""
        key = email.strip().lower()
        mailbox = Mailbox(
            self.seed,
            key,
            count,
            same_time=same_time,
            folders=self._folders if folders is None else folders,
            throttle_rate=throttle_rate,
            retry_after=retry_after,
            latency=latency,
        )
        with self.mail_lock:
            self._mailboxes[key] = mailbox

    def remove_mailbox(self, email: str) -> None:
        """The mailbox is gone (a deleted user): its requests get 404 ErrorInvalidUser."""
        with self.mail_lock:
            del self._mailboxes[email.strip().lower()]

    def serves(self, email: str) -> bool:
        """Whether the mailbox is served."""
        with self.mail_lock:
            return email.strip().lower() in self._mailboxes

    def deliver(self, email: str, count: int) -> None:
        """New mail arrives: count more generated messages, received after the
        generated ones (added ones may be later still)."""
        with self.mail_lock:
            self._mailbox(email).deliver(count)

    def add_messages(
        self, email: str, received_times: Iterable[datetime], folder: str | None = None
    ) -> list[str]:
        """New messages received at the given times, which may fall between or tie
        with the others, in the folder (an id or a well-known name; None: the
        Inbox); their ids, in the order given. Times are kept to the whole
        second, as Graph's are (naive ones are UTC). Their indexes are
        FIRST_ADDED_INDEX, FIRST_ADDED_INDEX + 1, ... in the order added."""
        with self.mail_lock:
            mailbox = self._mailbox(email)
            number = mailbox.inbox if folder is None else self._folder(mailbox, folder).number
            indexes = [mailbox.add(whole_second(moment), number) for moment in received_times]
        return [mailbox.message_id(index) for index in indexes]

    def delete_messages(self, email: str, indexes: Iterable[int]) -> None:
        """The messages are deleted: no longer listed, counted or reached by $skip,
        and the ones after them move down; delta rounds report them removed.
        Deleting one again is fine."""
        with self.mail_lock:
            mailbox = self._mailbox(email)
            chosen = list(dict.fromkeys(indexes))
            unknown = sorted(index for index in chosen if not mailbox.has(index))
            if unknown:
                raise ValueError(f"mailbox {mailbox.name} has no message {unknown[0]}")
            for index in chosen:
                mailbox.delete(index)

    def delete_oldest(self, email: str, count: int) -> list[str]:
        """Delete the `count` oldest messages still in the mailbox (all of them if
        it holds fewer); the ids deleted, oldest first."""
        if count < 0:
            raise ValueError(f"cannot delete {count} messages")
        with self.mail_lock:
            mailbox = self._mailbox(email)
            oldest = list(mailbox.listing([])[:count])
            for index in oldest:
                mailbox.delete(index)
        return [mailbox.message_id(index) for index in oldest]

    def edit_messages(self, email: str, indexes: Iterable[int]) -> list[str]:
        """Edit messages the mailbox holds: each edit gives a message a new
        changeKey, etag and lastModifiedDateTime, flips isRead and adds a
        category; their ids."""
        with self.mail_lock:
            mailbox = self._mailbox(email)
            chosen = self._held(mailbox, indexes)
            for index in chosen:
                mailbox.edit(index)
        return [mailbox.message_id(index) for index in chosen]

    def move_messages(self, email: str, indexes: Iterable[int], folder_id: str) -> list[str]:
        """Move messages the mailbox holds to the folder (an id or a well-known
        name); their ids, which stay the same (immutable ids)."""
        with self.mail_lock:
            mailbox = self._mailbox(email)
            to = self._folder(mailbox, folder_id).number
            chosen = self._held(mailbox, indexes)
            for index in chosen:
                mailbox.move(index, to)
        return [mailbox.message_id(index) for index in chosen]

    def add_folder(
        self, email: str, name: str, parent: str | None = None, *, hidden: bool = False
    ) -> str:
        """A new, empty folder in parent (an id or well-known name; None: the top
        level); its id. Hidden folders are listed only with includeHiddenFolders=true."""
        with self.mail_lock:
            mailbox = self._mailbox(email)
            number = None if parent is None else self._folder(mailbox, parent).number
            return mailbox.add_folder(name, number, hidden=hidden).id

    def delete_folder(self, email: str, folder_id: str) -> None:
        """The folder, its child folders and their messages are gone (delta rounds
        of it answer 404). The Inbox cannot be deleted."""
        with self.mail_lock:
            mailbox = self._mailbox(email)
            mailbox.delete_folder(self._folder(mailbox, folder_id).number)

    def folders(self, email: str) -> list[dict[str, Any]]:
        """Every folder of the mailbox, parents before their children:
        {id, name, parent (its id; None at the top level), hidden, total}."""
        with self.mail_lock:
            mailbox = self._mailbox(email)
            found: list[dict[str, Any]] = []

            def walk(parent: MailFolder | None) -> None:
                number = None if parent is None else parent.number
                for folder in mailbox.children(number, hidden=True):
                    found.append(
                        {
                            "id": folder.id,
                            "name": folder.name,
                            "parent": None if parent is None else parent.id,
                            "hidden": folder.hidden,
                            "total": mailbox.total(folder.number),
                        }
                    )
                    walk(folder)

            walk(None)
        return found

    def message_ids(self, email: str, folder: str | None = None) -> list[str]:
        """The ids of every message the mailbox (or the folder: an id or a
        well-known name) holds now, oldest first."""
        with self.mail_lock:
            mailbox = self._mailbox(email)
            listing = mailbox.listing([])
            if folder is not None:
                number = self._folder(mailbox, folder).number
                listing = [index for index in listing if mailbox.folder_of(index) == number]
        return [mailbox.message_id(index) for index in listing]

    def index_of(self, email: str, message_id: str) -> int:
        """The index of the message with this id, held or deleted (ValueError: none).
        A generated message is found by generating ids in index order (once: they
        are remembered), so the first look into a large mailbox takes a while."""
        with self.mail_lock:
            mailbox = self._mailbox(email)
            index = mailbox.index_of(message_id)
        if index is None:
            raise ValueError(f"mailbox {mailbox.name} has no message {message_id}")
        return index

    def folder_of(self, email: str, message_id: str) -> str:
        """The id of the folder the message is in now (ValueError once deleted)."""
        index = self.index_of(email, message_id)
        with self.mail_lock:
            mailbox = self._mailbox(email)
            if mailbox.folder_of(index) is None:
                raise ValueError(f"mailbox {mailbox.name} no longer holds message {message_id}")
            return mailbox.folder_id_of(index)

    def apply_changes(
        self,
        email: str,
        *,
        add: int = 0,
        edit: int = 0,
        move: int = 0,
        delete: int = 0,
        expire_delta_tokens: bool = False,
    ) -> dict[str, Any]:
        """Random changes, as the control endpoint makes them: `add` new messages
        in the Inbox, then `edit`, `move` (to another visible folder) and `delete`
        messages picked at random; {"added": [ids], "edited": [ids], "moved":
        [{"id", "from", "to"}], "deleted": [ids]}. ValueError, before any
        change, when the mailbox has too few messages or folders."""
        with self.mail_lock:
            mailbox = self._mailbox(email)
            applied = apply_random(mailbox, add=add, edit=edit, move=move, delete=delete)
            if expire_delta_tokens:
                mailbox.delta_generation += 1
        return applied.as_json()

    def expire_delta_tokens(self, email: str | None = None) -> None:
        """Every delta and page token of delta rounds handed out so far for the
        mailbox (None: every mailbox) is refused from now on: 410 Gone
        syncStateNotFound, with a Location that starts a full round again."""
        with self.mail_lock:
            chosen = self._mailboxes.values() if email is None else [self._mailbox(email)]
            for mailbox in chosen:
                mailbox.delta_generation += 1

    def expire_links(self) -> None:
        """Every @odata.nextLink handed out so far is refused from now on (400
        BadRequest, as Graph refuses an expired page token; a delta round's, 410),
        new requests, and the links they hand out, work."""
        with self.mail_lock:
            self.link_generation += 1

    @property
    def mailboxes(self) -> dict[str, int]:
        """{email: number of messages held now} of every mailbox served."""
        with self.mail_lock:
            return {name: mailbox.size for name, mailbox in self._mailboxes.items()}

    def mailbox_size(self, email: str) -> int:
        """The number of messages the mailbox holds now."""
        with self.mail_lock:
            return self._mailbox(email).size

    def received_at(self, email: str, index: int) -> datetime:
        """When message `index` (0 is the oldest generated one) of the mailbox was received."""
        return self._mailbox(email).received(index)

    def message(self, email: str, index: int) -> dict[str, Any]:
        """Message `index` (0 is the oldest generated one) as Graph's JSON, every
        property, as it is now; a deleted message's too."""
        return self._message(self._mailbox(email), index)

    def mailbox_url(self, mailbox: Mailbox) -> str:
        """The Graph URL of the mailbox, e.g. http://127.0.0.1:PORT/v1.0/users/ann@contoso.com."""
        return f"{self.url}/users/{quote(mailbox.name, safe='@')}"

    def _mailbox(self, email: str) -> Mailbox:
        return self._mailboxes[email.strip().lower()]

    @staticmethod
    def _folder(mailbox: Mailbox, reference: str) -> MailFolder:
        folder = mailbox.folder(reference)
        if folder is None:
            raise ValueError(f"mailbox {mailbox.name} has no folder {reference!r}")
        return folder

    @staticmethod
    def _held(mailbox: Mailbox, indexes: Iterable[int]) -> list[int]:
        chosen = list(dict.fromkeys(indexes))
        missing = [index for index in chosen if not mailbox.holds(index)]
        if missing:
            raise ValueError(f"mailbox {mailbox.name} holds no message {missing[0]}")
        return chosen

    # -- a message's JSON (a subclass may keep what these build) ----------

    def _message(self, mailbox: Mailbox, index: int) -> dict[str, Any]:
        """Message `index` of the mailbox as Graph's JSON, in its folder now, with its edits."""
        return content.message(
            self.seed,
            mailbox.name,
            index,
            mailbox.received(index),
            folder_id=mailbox.folder_id_of(index),
            edits=mailbox.edits.get(index, 0),
        )

    def _message_json(self, mailbox: Mailbox, index: int, select: list[str] | None) -> bytes:
        """Message `index` of the mailbox as the JSON of one item of a page."""
        return odata.json_bytes(odata.project(self._message(mailbox, index), select))

    # -- faults and record -----------------------------------------------

    def fail_next(
        self,
        status: int = 503,
        *,
        count: int = 1,
        retry_after: float | None = None,
        code: str | None = None,
        body: bytes | None = None,
        hang: bool = False,
    ) -> None:
        """Answer the next `count` authorized requests with `status` (and body,
        Retry-After, error code), or leave them hanging, instead of serving them."""
        with self._lock:
            for _ in range(count):
                self._faults.append(_Fault(status, retry_after, code, body, hang))

    @property
    def requests(self) -> list[ServedRequest]:
        with self._lock:
            return list(self._record)

    def max_in_flight(self, email: str) -> int:
        """The most requests for the mailbox that were in flight at once."""
        with self._lock:
            return self._max_in_flight.get(email.strip().lower(), 0)

    def reset_record(self) -> None:
        with self._lock:
            self._record.clear()
            self._max_in_flight.clear()

    # -- serving ---------------------------------------------------------

    def _handle(self, handler: _Handler) -> None:
        received = time.monotonic()
        parts = urlsplit(handler.path)
        path = unquote(parts.path)
        body = handler.read_body()
        if control.is_control(path):
            # Test tooling: no token, no faults, not in the record.
            _write(handler, control.answer(self, handler.command, path, body))
            return
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        match = _USER_PATH.match(path)
        mailbox_key = match["mailbox"].strip().lower() if match else None
        authorized = handler.headers.get("Authorization", "") == f"Bearer {self.token}"
        in_flight = 0
        if mailbox_key is not None:
            with self._lock:
                in_flight = self._in_flight.get(mailbox_key, 0) + 1
                self._in_flight[mailbox_key] = in_flight
                self._max_in_flight[mailbox_key] = max(
                    self._max_in_flight.get(mailbox_key, 0), in_flight
                )

        def record(answer: odata.Answer) -> None:
            served = ServedRequest(
                method=handler.command,
                path=path,
                query=query,
                headers={k: v for k, v in handler.headers.items() if k.lower() != "authorization"},
                mailbox=mailbox_key,
                authorized=authorized,
                status=0 if answer.hang else answer.status,
                error_code=answer.error_code,
                message_count=answer.message_count,
                received_at=received,
                answered_at=time.monotonic(),
            )
            with self._lock:
                self._record.append(served)

        try:
            prefer = ", ".join(handler.headers.get_all("Prefer") or [])
            answer = self._answer(
                handler.command, match, query, prefer, authorized, in_flight=in_flight
            )
            if answer.hang:
                record(answer)  # now, so tests see the request while it hangs
                self._stopping.wait()
        finally:
            # Counted out before the answer is written: a client that has read
            # it may send its next request at once.
            if mailbox_key is not None:
                with self._lock:
                    self._in_flight[mailbox_key] -= 1
        if answer.hang:
            handler.close_connection = True
            return
        record(answer)
        _write(handler, answer)

    def _answer(
        self,
        method: str,
        match: re.Match[str] | None,
        query: dict[str, str],
        prefer: str,
        authorized: bool,
        *,
        in_flight: int,
    ) -> odata.Answer:
        if method != "GET":
            return odata.error(405, "Request_BadRequest", "Only GET is served here.")
        if not authorized:
            return odata.error(
                401,
                "InvalidAuthenticationToken",
                "Access token validation failure. Invalid audience.",
                headers={"WWW-Authenticate": 'Bearer realm="", error="invalid_token"'},
            )
        mailbox = self._mailboxes.get(match["mailbox"].strip().lower()) if match else None
        before_answer = self.before_answer
        if mailbox is not None and before_answer is not None:
            try:
                before_answer(mailbox.name, dict(query))
            except Exception:
                # A broken hook must show in the test's output, not end this thread silently.
                log.exception("fake graph: before_answer raised for %s", mailbox.name)
                return odata.error(500, "InternalServerError", "The before_answer hook raised.")
        retry_after = _own(mailbox, "retry_after", self.retry_after)
        if self.enforce_concurrency is not None and in_flight > self.enforce_concurrency:
            return odata.error(
                429,
                "ApplicationThrottled",
                "Application is over its MailboxConcurrency limit.",
                headers={"Retry-After": odata.seconds(retry_after)},
            )
        fault = self._next_fault(_own(mailbox, "throttle_rate", self.throttle_rate), retry_after)
        if fault is not None:
            return fault
        latency = _own(mailbox, "latency", self.latency)
        if latency:
            self._stopping.wait(latency)
        return self._route(match, query, prefer)

    def _route(
        self, match: re.Match[str] | None, query: dict[str, str], prefer: str
    ) -> odata.Answer:
        if match is None:
            return odata.error(404, "UnknownError", "Resource not found for the segment.")
        mailbox = self._mailboxes.get(match["mailbox"].strip().lower())
        if mailbox is None:
            return odata.error(
                404, "ErrorInvalidUser", f"The requested user '{match['mailbox']}' is invalid."
            )
        rest = match["rest"] or ""
        for pattern, endpoint in _ROUTES:
            route = pattern.match(rest)
            if route is not None:
                folder = route.groupdict().get("folder") or route.groupdict().get("quoted") or ""
                try:
                    return endpoint(self, mailbox, folder, query, prefer)
                except odata.BadQuery as exc:
                    return exc.answer()
        return odata.error(404, "UnknownError", "Resource not found for the segment.")

    def _next_fault(self, throttle_rate: float, retry_after: float) -> odata.Answer | None:
        """A fault queued by fail_next, else one drawn at the configured rates, else None."""
        with self._lock:
            if self._faults:
                return _fault_answer(self._faults.popleft())
            if self._random.random() < self.hang:
                return odata.Answer(0, b"", hang=True)
            if self._random.random() < throttle_rate:
                return odata.error(
                    429,
                    "TooManyRequests",
                    "Please retry again later.",
                    headers={"Retry-After": odata.seconds(retry_after)},
                )
            if self._random.random() < self.error_rate:
                status = self._random.choice((500, 502, 503, 504))
                return odata.error(status, odata.DEFAULT_CODES[status], "Injected server error.")
        return None


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeGraphServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that went away mid-answer (a killed worker) is normal here.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Graph
    server_version = "FakeGraph/1.0"
    # An idle keep-alive connection is dropped after this many seconds.
    timeout = 30

    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        with self.server.fake._lock:
            self.server.fake._connections.add(self.connection)

    def finish(self) -> None:
        with self.server.fake._lock:
            self.server.fake._connections.discard(self.connection)
        super().finish()

    def do_GET(self) -> None:
        self.server.fake._handle(self)

    do_POST = do_PATCH = do_DELETE = do_PUT = do_GET

    def read_body(self) -> bytes:
        """The request's body (read, so a kept-alive connection stays in step)."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        if length > MAX_BODY:
            self.close_connection = True
            return b""
        return self.rfile.read(length) if length > 0 else b""

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("fake graph: " + format, *args)


def _write(handler: BaseHTTPRequestHandler, answer: odata.Answer) -> None:
    handler.send_response(answer.status)
    handler.send_header("Content-Type", answer.content_type)
    handler.send_header("Content-Length", str(len(answer.body)))
    handler.send_header("request-id", str(uuid.uuid4()))
    for name, value in answer.headers.items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(answer.body)


def _own(mailbox: Mailbox | None, setting: str, default: float) -> float:
    """The mailbox's own value of a fault setting, else the server's."""
    value: float | None = getattr(mailbox, setting, None)
    return default if value is None else value


def _fault_answer(fault: _Fault) -> odata.Answer:
    if fault.hang:
        return odata.Answer(0, b"", hang=True)
    headers = {}
    if fault.retry_after is not None:
        headers["Retry-After"] = odata.seconds(fault.retry_after)
    if fault.body is not None:
        # The code, if given, is only for the record: tests find the fault in it.
        return odata.Answer(fault.status, fault.body, headers=headers, error_code=fault.code)
    code = fault.code or odata.DEFAULT_CODES.get(fault.status, "UnknownError")
    return odata.error(fault.status, code, "Injected fault.", headers=headers)
