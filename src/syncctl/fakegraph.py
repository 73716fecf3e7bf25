"""A local Graph-compatible mail server, for the demo, tests, staging and load runs.

It serves ``/v1.0/users/{mailbox}/messages`` and ``.../messages/$count`` on
127.0.0.1 with Graph's semantics for what syncctl uses: ``$top`` (1-1000,
default 10), ``$skip``, ``$orderby=receivedDateTime asc|desc``, a
``receivedDateTime`` ``$filter``, ``$select``, ``$count=true`` and an absolute
``@odata.nextLink``; bearer auth; Graph's error bodies.

Mailboxes are generated, not stored: message i of a mailbox is computed from
(seed, mailbox, i), and messages are received in index order (``same_time``
consecutive ones share one time, for ties), so a window is found by binary
search and a mailbox of millions costs no memory.

A mailbox can change while it is read, as a real one does. Deleted messages
(``delete_messages``, ``delete_oldest``) are no longer listed, counted or
reached by ``$skip``: the ones after them move down. Added messages
(``add_messages``, at any times) are listed among the others in
receivedDateTime order. Only a changed mailbox lists its window message by
message; an unchanged one stays arithmetic. ``expire_links`` refuses every
``@odata.nextLink`` handed out so far, and ``before_answer`` lets a test hold
back or slow down chosen requests.

Faults are switched on by the knobs (rates apply to every request) or queued
one by one with ``fail_next``. Every request is recorded, with the most
requests a mailbox had in flight at once.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import hashlib
import json
import logging
import operator
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
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from syncctl.errors import BadInput

log = logging.getLogger(__name__)

API_PREFIX = "/v1.0"
DEFAULT_TOP = 10
MAX_TOP = 1000
# Messages are spread over these ten years, in index order.
FIRST_RECEIVED = datetime(2015, 1, 1, tzinfo=UTC)
RECEIVED_SPAN = timedelta(days=3653)
# Received times are whole seconds, at most a day apart.
MAX_STEP = 86_400
# Requests kept in the record (a long load run must not grow without bound).
MAX_RECORDED = 100_000
# Messages added at chosen times are numbered from here, far above any generated one.
FIRST_ADDED_INDEX = 10**9

PROPERTIES = (
    "createdDateTime",
    "lastModifiedDateTime",
    "changeKey",
    "categories",
    "receivedDateTime",
    "sentDateTime",
    "hasAttachments",
    "internetMessageId",
    "subject",
    "bodyPreview",
    "importance",
    "parentFolderId",
    "conversationId",
    "isDeliveryReceiptRequested",
    "isReadReceiptRequested",
    "isRead",
    "isDraft",
    "webLink",
    "inferenceClassification",
    "body",
    "sender",
    "from",
    "toRecipients",
    "ccRecipients",
    "bccRecipients",
    "replyTo",
    "flag",
)

_MESSAGES_PATH = re.compile(
    rf"^{re.escape(API_PREFIX)}/users/(?P<mailbox>[^/]+)/messages(?P<count>/\$count)?/?$"
)
_FILTER_CLAUSE = re.compile(r"^\s*(?P<prop>\w+)\s+(?P<op>eq|ne|gt|ge|lt|le)\s+(?P<value>\S+)\s*$")
_COMPARISONS: dict[str, Callable[[datetime, datetime], bool]] = {
    "eq": operator.eq,
    "gt": operator.gt,
    "ge": operator.ge,
    "lt": operator.lt,
    "le": operator.le,
}
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")

_NAMES = (
    "Megan Bowen",
    "Adele Vance",
    "Zoë Brontë",
    "José Álvarez",
    "Łukasz Żółć",
    "田中 太郎",
    "Олена Коваленко",
    "محمد علي",
    "Søren Kierkegård",
    "Nguyễn Thị Hồng",
    "O'Brien, Siobhán",
    "",
)
_DOMAINS = ("contoso.com", "fabrikam.example", "例え.jp", "tailspin.example")
_SUBJECTS = (
    "Quarterly report",
    "Lunch on Friday?",
    "Invoice #{n}",
    "Your order has shipped",
    "Réunion de l'équipe — ordre du jour",
    "会議の議事録",
    "Отчёт за неделю",
    "Happy birthday 🎉🎂",
    "مرحبا بالعالم",
    "Re: Re: Fwd: contract draft v{n}",
    "MyAnalytics | Your past week",
    "",
)
_WORDS = (
    "the meeting moved to Thursday",
    "please find the figures attached",
    "thanks for your help",
    "see the notes below",
    "naïve café déjà vu",
    "ありがとうございます",
    "🚀 launch checklist",
    "let me know what you think",
)


@dataclass(frozen=True)
class ServedRequest:
    """One request as the server saw it. Times are time.monotonic()."""

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


@dataclass
class _Answer:
    status: int
    body: bytes
    content_type: str = "application/json; odata.metadata=minimal; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)
    error_code: str | None = None
    message_count: int = 0
    hang: bool = False


@dataclass
class _Mailbox:
    name: str
    generated: int  # messages 0 .. generated-1, computed from (seed, name, index)
    step: int  # seconds between consecutive received slots
    same_time: int  # consecutive generated messages sharing one slot: one received time
    # This mailbox's own fault settings; None: the server's.
    throttle_rate: float | None = None
    retry_after: float | None = None
    latency: float | None = None
    # Changes since generation: {index from FIRST_ADDED_INDEX up: received time}, and
    # the indexes (generated or added) deleted. Entries are never taken out of `added`.
    added: dict[int, datetime] = field(default_factory=dict)
    deleted: set[int] = field(default_factory=set)

    @property
    def size(self) -> int:
        """Messages held now (every deleted index is one that exists)."""
        return self.generated + len(self.added) - len(self.deleted)

    @property
    def changed(self) -> bool:
        return bool(self.added or self.deleted)

    def has(self, index: int) -> bool:
        """Whether the index is a message of this mailbox, deleted or not."""
        return 0 <= index < self.generated or index in self.added


class FakeGraphServer:
    """A Graph-compatible server on 127.0.0.1; use as a context manager or start()/stop().

    mailboxes: {email: number of messages}. seed: changes every generated
    message. token: the bearer token it accepts (generated when None).
    Faults: throttle_rate (share of requests answered 429 with Retry-After
    retry_after seconds), error_rate (share answered 500/502/503/504),
    latency (seconds added to each request), hang (share of requests never
    answered; True for all), enforce_concurrency (a mailbox's request beyond
    this many in flight gets 429 MailboxConcurrency, as Graph does; None: no
    limit). add_mailbox can give one mailbox its own throttle_rate,
    retry_after and latency, and ties (same_time).

    A mailbox changes while it is read: delete_messages and delete_oldest take
    messages out, add_messages puts new ones in at any received times,
    deliver appends generated ones, and message_ids says what it holds now.
    Messages are listed in receivedDateTime order; at one time, generated
    messages come first by index, then added ones in the order added
    (descending is the exact reverse). Added messages are numbered from
    FIRST_ADDED_INDEX up, so message(), received_at() and delete_messages()
    take their indexes too.

    before_answer(mailbox, query), when set, is called for every authorized
    request to an existing mailbox once it is counted in flight, before its
    faults, latency and answer: a test can block in it to hold the request
    back. If it raises, the request is answered 500 and the error logged.
    expire_links() makes every @odata.nextLink handed out so far answer 400
    (each link carries a $skiptoken of the generation it was made in).
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
    ) -> None:
        self.seed = seed
        self.token = token if token is not None else secrets.token_urlsafe(24)
        self.port = port
        self.throttle_rate = throttle_rate
        self.retry_after = retry_after
        self.error_rate = error_rate
        self.latency = latency
        self.hang = float(hang)
        self.enforce_concurrency = enforce_concurrency
        self.before_answer: Callable[[str, dict[str, str]], None] | None = None
        # Guards the mailboxes and the link generation; its own lock, so a
        # listing never waits on the record or the in-flight counts.
        self._mail_lock = threading.Lock()
        self._mailboxes: dict[str, _Mailbox] = {}
        self._link_generation = 0
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

    def __repr__(self) -> str:
        return f"FakeGraphServer(url={self.url!r}, mailboxes={len(self._mailboxes)})"

    # -- lifecycle -------------------------------------------------------

    @property
    def url(self) -> str:
        """The Graph root to set as SYNCCTL_GRAPH_URL, e.g. http://127.0.0.1:PORT/v1.0."""
        return f"http://127.0.0.1:{self.port}{API_PREFIX}"

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
        return self

    def stop(self) -> None:
        """Stop serving; requests left hanging are closed without an answer."""
        self._stopping.set()
        with self._lock:
            # Taken under the lock: serve() and its caller may both stop the server.
            httpd, self._httpd = self._httpd, None
            thread, self._thread = self._thread, None
            connections = list(self._connections)
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
    ) -> None:
        """Serve a mailbox of count messages, each `same_time` consecutive ones
        received at one time; the fault settings given apply to its requests
        instead of the server's (one mailbox can throttle hard)."""
        if not 0 <= count < FIRST_ADDED_INDEX:
            raise ValueError(f"a mailbox cannot hold {count} messages")
        if same_time < 1:
            raise ValueError(f"same_time must be at least 1, not {same_time}")
        slots = -(-count // same_time)
        step = max(1, min(MAX_STEP, int(RECEIVED_SPAN.total_seconds()) // max(slots, 1)))
        key = email.strip().lower()
        with self._mail_lock:
            self._mailboxes[key] = _Mailbox(
                key, count, step, same_time, throttle_rate, retry_after, latency
            )

    def remove_mailbox(self, email: str) -> None:
        """The mailbox is gone (a deleted user): its requests get 404 ErrorInvalidUser."""
        with self._mail_lock:
            del self._mailboxes[email.strip().lower()]

    def deliver(self, email: str, count: int) -> None:
        """New mail arrives: count more generated messages, received after the
        generated ones (added ones may be later still)."""
        with self._mail_lock:
            mailbox = self._mailbox(email)
            if count < 0 or mailbox.generated + count >= FIRST_ADDED_INDEX:
                raise ValueError(f"cannot deliver {count} messages to {mailbox.name}")
            mailbox.generated += count

    def add_messages(self, email: str, received_times: Iterable[datetime]) -> list[str]:
        """New messages received at the given times, which may fall between or tie
        with the others; their ids, in the order given. Times are kept to the whole
        second, as Graph's are (naive ones are UTC). Their indexes are
        FIRST_ADDED_INDEX, FIRST_ADDED_INDEX + 1, ... in the order added."""
        with self._mail_lock:
            mailbox = self._mailbox(email)
            indexes = []
            for received in received_times:
                index = FIRST_ADDED_INDEX + len(mailbox.added)
                mailbox.added[index] = _whole_second(received)
                indexes.append(index)
        return [_message_id(self._digest(mailbox, index)) for index in indexes]

    def delete_messages(self, email: str, indexes: Iterable[int]) -> None:
        """The messages are deleted: no longer listed, counted or reached by $skip,
        and the ones after them move down. Deleting one again is fine."""
        with self._mail_lock:
            mailbox = self._mailbox(email)
            chosen = set(indexes)
            unknown = sorted(index for index in chosen if not mailbox.has(index))
            if unknown:
                raise ValueError(f"mailbox {mailbox.name} has no message {unknown[0]}")
            mailbox.deleted |= chosen

    def delete_oldest(self, email: str, count: int) -> list[str]:
        """Delete the `count` oldest messages still in the mailbox (all of them if
        it holds fewer); the ids deleted, oldest first."""
        if count < 0:
            raise ValueError(f"cannot delete {count} messages")
        with self._mail_lock:
            mailbox = self._mailbox(email)
            oldest = self._listing(mailbox, [])[:count]
            mailbox.deleted.update(oldest)
        return [_message_id(self._digest(mailbox, index)) for index in oldest]

    def message_ids(self, email: str) -> list[str]:
        """The ids of every message the mailbox holds now, oldest first."""
        with self._mail_lock:
            mailbox = self._mailbox(email)
            listing = self._listing(mailbox, [])
        return [_message_id(self._digest(mailbox, index)) for index in listing]

    def expire_links(self) -> None:
        """Every @odata.nextLink handed out so far is refused from now on (400
        BadRequest), as Graph refuses an expired page token; new requests, and
        the links they hand out, work."""
        with self._mail_lock:
            self._link_generation += 1

    @property
    def mailboxes(self) -> dict[str, int]:
        """{email: number of messages held now} of every mailbox served."""
        with self._mail_lock:
            return {name: mailbox.size for name, mailbox in self._mailboxes.items()}

    def mailbox_size(self, email: str) -> int:
        """The number of messages the mailbox holds now."""
        with self._mail_lock:
            return self._mailbox(email).size

    def received_at(self, email: str, index: int) -> datetime:
        """When message `index` (0 is the oldest generated one) of the mailbox was received."""
        return self._received(self._mailbox(email), index)

    def message(self, email: str, index: int) -> dict[str, Any]:
        """Message `index` (0 is the oldest generated one) as Graph's JSON, every
        property; a deleted message's too."""
        return self._message(self._mailbox(email), index)

    def _mailbox(self, email: str) -> _Mailbox:
        return self._mailboxes[email.strip().lower()]

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

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        received = time.monotonic()
        parts = urlsplit(handler.path)
        path = unquote(parts.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        match = _MESSAGES_PATH.match(path)
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

        def record(answer: _Answer) -> None:
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
            answer = self._answer(handler.command, match, query, authorized, in_flight=in_flight)
            if answer.hang:
                record(answer)  # now, so tests see the request while it hangs
                self._stopping.wait()
        finally:
            # Counted out before the answer is written: a client that has read
            # it may send its next request at once.
            if mailbox_key is not None:
                with self._lock:
                    self._in_flight[mailbox_key] -= 1
        if not answer.hang:
            record(answer)
        if answer.hang:
            handler.close_connection = True
            return
        handler.send_response(answer.status)
        handler.send_header("Content-Type", answer.content_type)
        handler.send_header("Content-Length", str(len(answer.body)))
        handler.send_header("request-id", str(uuid.uuid4()))
        for name, value in answer.headers.items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(answer.body)

    def _answer(
        self,
        method: str,
        match: re.Match[str] | None,
        query: dict[str, str],
        authorized: bool,
        *,
        in_flight: int,
    ) -> _Answer:
        if method != "GET":
            return _error(405, "Request_BadRequest", "Only GET is served here.")
        if not authorized:
            return _error(
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
                return _error(500, "InternalServerError", "The before_answer hook raised.")
        retry_after = _own(mailbox, "retry_after", self.retry_after)
        if self.enforce_concurrency is not None and in_flight > self.enforce_concurrency:
            return _error(
                429,
                "ApplicationThrottled",
                "Application is over its MailboxConcurrency limit.",
                headers={"Retry-After": _seconds(retry_after)},
            )
        fault = self._next_fault(_own(mailbox, "throttle_rate", self.throttle_rate), retry_after)
        if fault is not None:
            return fault
        latency = _own(mailbox, "latency", self.latency)
        if latency:
            self._stopping.wait(latency)
        return self._route(match, query)

    def _route(self, match: re.Match[str] | None, query: dict[str, str]) -> _Answer:
        if match is None:
            return _error(404, "UnknownError", "Resource not found for the segment.")
        mailbox = self._mailboxes.get(match["mailbox"].strip().lower())
        if mailbox is None:
            return _error(
                404, "ErrorInvalidUser", f"The requested user '{match['mailbox']}' is invalid."
            )
        try:
            if match["count"]:
                return self._count(mailbox, query)
            return self._list(mailbox, query)
        except _BadQuery as exc:
            return _error(400, exc.code, str(exc))

    def _next_fault(self, throttle_rate: float, retry_after: float) -> _Answer | None:
        """A fault queued by fail_next, else one drawn at the configured rates, else None."""
        with self._lock:
            if self._faults:
                return _fault_answer(self._faults.popleft())
            if self._random.random() < self.hang:
                return _Answer(0, b"", hang=True)
            if self._random.random() < throttle_rate:
                return _error(
                    429,
                    "TooManyRequests",
                    "Please retry again later.",
                    headers={"Retry-After": _seconds(retry_after)},
                )
            if self._random.random() < self.error_rate:
                status = self._random.choice((500, 502, 503, 504))
                return _error(status, _DEFAULT_CODES[status], "Injected server error.")
        return None

    def _count(self, mailbox: _Mailbox, query: dict[str, str]) -> _Answer:
        clauses = _parse_filter(query.get("$filter"), None)
        with self._mail_lock:
            total = len(self._listing(mailbox, clauses))
        return _Answer(200, str(total).encode(), content_type="text/plain; charset=utf-8")

    def _list(self, mailbox: _Mailbox, query: dict[str, str]) -> _Answer:
        top = _integer(query, "$top", DEFAULT_TOP)
        if not 1 <= top <= MAX_TOP:
            raise _BadQuery(
                "ErrorInvalidArgument", f"The value of $top must be between 1 and {MAX_TOP}."
            )
        skip = _integer(query, "$skip", 0)
        descending = _parse_orderby(query.get("$orderby"))
        clauses = _parse_filter(
            query.get("$filter"), "receivedDateTime" if "$orderby" in query else None
        )
        select = _parse_select(query.get("$select"))
        skiptoken = query.get("$skiptoken")
        with self._mail_lock:
            generation = self._link_generation
            if skiptoken is not None and _link_generation_of(skiptoken) != generation:
                raise _BadQuery(
                    "BadRequest",
                    "The page token is no longer valid; start again from the first page.",
                )
            # A range or a fresh list: safe to read once the lock is released.
            listing = self._listing(mailbox, clauses)
        total = len(listing)
        indexes = (listing[::-1] if descending else listing)[skip : skip + top]
        context = f"{self.url}/$metadata#users('{quote(mailbox.name, safe='@')}')/messages"
        if select:
            context += f"({','.join(select)})"
        parts = [b'{"@odata.context":', _json(context)]
        if query.get("$count", "").lower() == "true":
            parts += [b',"@odata.count":', _json(total)]
        # Serialised message by message (the same bytes as one document), so a
        # subclass can keep each message's JSON instead of building it again.
        parts += [b',"value":[', b",".join(self._message_json(mailbox, i, select) for i in indexes)]
        parts.append(b"]")
        if skip + top < total:
            next_link = self._next_link(mailbox, query, skip + top, generation)
            parts += [b',"@odata.nextLink":', _json(next_link)]
        parts.append(b"}")
        return _Answer(200, b"".join(parts), message_count=len(indexes))

    def _message_json(self, mailbox: _Mailbox, index: int, select: list[str] | None) -> bytes:
        """Message `index` of the mailbox as the JSON of one item of a page."""
        return _json(_project(self._message(mailbox, index), select))

    def _next_link(
        self, mailbox: _Mailbox, query: dict[str, str], skip: int, generation: int
    ) -> str:
        # $skip places the next page; $skiptoken says which links expire_links() refuses.
        params = {**query, "$skip": str(skip), "$skiptoken": _skiptoken(generation)}
        encoded = "&".join(f"{k}={quote(v, safe='')}" for k, v in params.items())
        return f"{self.url}/users/{quote(mailbox.name, safe='@')}/messages?{encoded}"

    # -- the generated mailbox -------------------------------------------

    def _listing(self, mailbox: _Mailbox, clauses: list[tuple[str, datetime]]) -> Sequence[int]:
        """The indexes of the messages held now matching every clause, oldest first;
        at one received time, generated ones by index, then added ones as added."""
        low, high = self._window(mailbox, clauses)
        if not mailbox.changed:
            return range(low, high)  # no per-message list: a mailbox of millions stays cheap
        generated = [index for index in range(low, high) if index not in mailbox.deleted]
        added = sorted(
            (received, index)
            for index, received in mailbox.added.items()
            if index not in mailbox.deleted and _matches(received, clauses)
        )
        listing: list[int] = []
        taken = 0
        for received, index in added:
            # It follows every generated message received at or before its time.
            follows = self._first_index(mailbox, received, after=True)
            cut = bisect.bisect_left(generated, follows, taken)
            listing += generated[taken:cut]
            listing.append(index)
            taken = cut
        listing += generated[taken:]
        return listing

    def _window(self, mailbox: _Mailbox, clauses: list[tuple[str, datetime]]) -> tuple[int, int]:
        """The range [low, high) of generated indexes matching every clause."""
        low, high = 0, mailbox.generated
        for op, moment in clauses:
            first_at_or_after = self._first_index(mailbox, moment, after=False)
            first_after = self._first_index(mailbox, moment, after=True)
            if op == "ge":
                low = max(low, first_at_or_after)
            elif op == "gt":
                low = max(low, first_after)
            elif op == "lt":
                high = min(high, first_at_or_after)
            elif op == "le":
                high = min(high, first_after)
            elif op == "eq":
                low, high = max(low, first_at_or_after), min(high, first_after)
        return low, max(low, high)

    def _first_index(self, mailbox: _Mailbox, moment: datetime, *, after: bool) -> int:
        """The first generated index received at or (after=True) strictly after
        moment, by binary search: received times never decrease with the index."""
        low, high = 0, mailbox.generated
        while low < high:
            middle = (low + high) // 2
            received = self._received(mailbox, middle)
            if received > moment or (not after and received == moment):
                high = middle
            else:
                low = middle + 1
        return low

    def _digest(self, mailbox: _Mailbox, index: int, salt: str = "") -> bytes:
        return hashlib.blake2b(
            f"{self.seed}\x00{mailbox.name}\x00{index}\x00{salt}".encode(), digest_size=24
        ).digest()

    def _received(self, mailbox: _Mailbox, index: int) -> datetime:
        if index >= FIRST_ADDED_INDEX:
            return mailbox.added[index]  # no lock needed: an entry never changes once added
        # One slot of `step` seconds per `same_time` messages, a random second
        # within it: never decreasing, so index order is received order.
        slot = index // mailbox.same_time
        jitter = int.from_bytes(self._digest(mailbox, slot)[:8]) % mailbox.step
        return FIRST_RECEIVED + timedelta(seconds=slot * mailbox.step + jitter)

    def _message(self, mailbox: _Mailbox, index: int) -> dict[str, Any]:
        digest = self._digest(mailbox, index)
        rng = random.Random(int.from_bytes(digest[8:]))
        received = self._received(mailbox, index)
        sent = received - timedelta(seconds=rng.randrange(1, 300))
        message_id = _message_id(digest)

        # Consecutive messages form threads of up to four: one conversation, one subject.
        thread = index // 4
        thread_rng = random.Random(int.from_bytes(self._digest(mailbox, thread, "thread")))
        in_thread = thread_rng.random() < 0.4
        subject_rng = thread_rng if in_thread else rng
        subject: str | None = subject_rng.choice(_SUBJECTS).format(n=subject_rng.randrange(1000))
        if in_thread and index % 4:
            subject = f"RE: {subject}"
        conversation_key = f"t{thread}" if in_thread else f"m{index}"
        conversation_id = (
            "AAQkAG"
            + hashlib.blake2b(
                f"{self.seed}\x00{mailbox.name}\x00{conversation_key}".encode(), digest_size=12
            ).hexdigest()
        )

        is_draft = rng.random() < 0.02
        sender = None if is_draft and rng.random() < 0.5 else _recipient(rng)
        html = rng.random() < 0.7
        paragraphs = [rng.choice(_WORDS) for _ in range(rng.randrange(0, 6))]
        if rng.random() < 0.003:
            paragraphs.append("x" * 200_000)  # an occasional very long message
        text = "\r\n\r\n".join(paragraphs)
        content = (
            f'<html><head><meta charset="utf-8"></head><body>'
            f"{''.join(f'<p>{p}</p>' for p in paragraphs)}</body></html>"
            if html
            else text
        )
        # Real mailboxes hold text PostgreSQL cannot store as is.
        if rng.random() < 0.01:
            content = content[: len(content) // 2] + "\x00" + content[len(content) // 2 :]
        if subject is not None and rng.random() < 0.005:
            subject += "\x00"
        if subject is not None and rng.random() < 0.003:
            subject += "\ud83d"  # half of a surrogate pair
        if rng.random() < 0.02:
            subject = None

        return {
            "@odata.etag": f'W/"{base64.b64encode(digest[:12]).decode()}"',
            "id": message_id,
            "createdDateTime": _graph_time(received),
            "lastModifiedDateTime": _graph_time(received),
            "changeKey": base64.b64encode(digest[:16]).decode(),
            "categories": ["Blue category"] if rng.random() < 0.05 else [],
            "receivedDateTime": _graph_time(received),
            "sentDateTime": _graph_time(sent),
            "hasAttachments": rng.random() < 0.2,
            "internetMessageId": f"<{digest[:10].hex()}@{rng.choice(_DOMAINS)}>",
            "subject": subject,
            "bodyPreview": text[:255],
            "importance": rng.choices(("normal", "high", "low"), (90, 7, 3))[0],
            "parentFolderId": "AAMkAGInbox",
            "conversationId": conversation_id,
            "isDeliveryReceiptRequested": False,
            "isReadReceiptRequested": rng.random() < 0.05,
            "isRead": rng.random() < 0.6,
            "isDraft": is_draft,
            "webLink": f"https://outlook.office365.com/owa/?ItemID={message_id}",
            "inferenceClassification": rng.choice(("focused", "other")),
            "body": {"contentType": "html" if html else "text", "content": content},
            "sender": sender,
            "from": sender,
            "toRecipients": [_recipient(rng) for _ in range(rng.randrange(0, 4))],
            "ccRecipients": [_recipient(rng) for _ in range(rng.choice((0, 0, 0, 1, 2)))],
            "bccRecipients": [_recipient(rng)] if rng.random() < 0.03 else [],
            "replyTo": [],
            "flag": {
                "flagStatus": rng.choices(("notFlagged", "flagged", "complete"), (85, 10, 5))[0]
            },
        }


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

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("fake graph: " + format, *args)


class _BadQuery(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


_DEFAULT_CODES = {
    400: "BadRequest",
    401: "InvalidAuthenticationToken",
    403: "ErrorAccessDenied",
    404: "ErrorItemNotFound",
    429: "TooManyRequests",
    500: "InternalServerError",
    502: "BadGateway",
    503: "ServiceUnavailable",
    504: "GatewayTimeout",
}


def _error(
    status: int, code: str, message: str, *, headers: dict[str, str] | None = None
) -> _Answer:
    request_id = str(uuid.uuid4())
    body = {
        "error": {
            "code": code,
            "message": message,
            "innerError": {
                "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"),
                "request-id": request_id,
                "client-request-id": request_id,
            },
        }
    }
    return _Answer(status, _json(body), headers=headers or {}, error_code=code)


def _own(mailbox: _Mailbox | None, setting: str, default: float) -> float:
    """The mailbox's own value of a fault setting, else the server's."""
    value: float | None = getattr(mailbox, setting, None)
    return default if value is None else value


def _fault_answer(fault: _Fault) -> _Answer:
    if fault.hang:
        return _Answer(0, b"", hang=True)
    headers = {}
    if fault.retry_after is not None:
        headers["Retry-After"] = _seconds(fault.retry_after)
    if fault.body is not None:
        # The code, if given, is only for the record: tests find the fault in it.
        return _Answer(fault.status, fault.body, headers=headers, error_code=fault.code)
    code = fault.code or _DEFAULT_CODES.get(fault.status, "UnknownError")
    return _error(fault.status, code, "Injected fault.", headers=headers)


def _json(document: Any) -> bytes:
    text = json.dumps(document, ensure_ascii=False)
    # Graph sends a lone surrogate escaped; raw, it could not be UTF-8.
    text = _LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    return text.encode("utf-8")


def _message_id(digest: bytes) -> str:
    """The Graph id of the message whose digest this is."""
    return "AAMkAG" + base64.urlsafe_b64encode(digest).decode().rstrip("=")


def _whole_second(moment: datetime) -> datetime:
    """A received time as Graph keeps it: UTC (naive means UTC), whole seconds."""
    utc = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return utc.replace(microsecond=0)


def _matches(received: datetime, clauses: list[tuple[str, datetime]]) -> bool:
    return all(_COMPARISONS[op](received, moment) for op, moment in clauses)


def _skiptoken(generation: int) -> str:
    """An opaque page token naming the generation of links it belongs to."""
    return base64.urlsafe_b64encode(f"links:{generation}".encode()).decode().rstrip("=")


def _link_generation_of(skiptoken: str) -> int | None:
    """The generation a $skiptoken was handed out in; None if it is not one of ours."""
    try:
        text = base64.urlsafe_b64decode(skiptoken + "=" * (-len(skiptoken) % 4)).decode()
        kind, _, number = text.partition(":")
        return int(number) if kind == "links" else None
    except ValueError:  # not base64, not UTF-8, or no number
        return None


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _graph_time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _recipient(rng: random.Random) -> dict[str, Any]:
    name = rng.choice(_NAMES)
    local = re.sub(r"[^a-z]", "", name.lower()) or f"user{rng.randrange(100)}"
    return {"emailAddress": {"name": name, "address": f"{local}@{rng.choice(_DOMAINS)}"}}


def _project(message: dict[str, Any], select: list[str] | None) -> dict[str, Any]:
    if select is None:
        return message
    keep = {"@odata.etag", "id", *select}
    return {k: v for k, v in message.items() if k in keep}


def _integer(query: dict[str, str], name: str, default: int) -> int:
    value = query.get(name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise _BadQuery("BadRequest", f"Invalid value '{value}' for {name}.") from None
    if number < 0:
        raise _BadQuery("BadRequest", f"Invalid value '{value}' for {name}.")
    return number


def _parse_orderby(value: str | None) -> bool:
    """Whether the order is descending (Graph lists messages newest first by default)."""
    if value is None:
        return True
    words = value.split()
    if not words or words[0] != "receivedDateTime" or len(words) > 2:
        raise _BadQuery(
            "BadRequest", f"This server orders by receivedDateTime only, not {value!r}."
        )
    direction = words[1].lower() if len(words) == 2 else "asc"
    if direction not in ("asc", "desc"):
        raise _BadQuery("BadRequest", f"Invalid $orderby direction {words[1]!r}.")
    return direction == "desc"


def _parse_filter(value: str | None, ordered_by: str | None) -> list[tuple[str, datetime]]:
    """[(operator, time)] of a receivedDateTime filter joined by 'and'."""
    if value is None or not value.strip():
        return []
    clauses = []
    for number, text in enumerate(re.split(r"\s+and\s+", value.strip())):
        match = _FILTER_CLAUSE.match(text)
        if match is None:
            raise _BadQuery("BadRequest", "Invalid filter clause")
        if number == 0 and ordered_by is not None and match["prop"] != ordered_by:
            raise _BadQuery(
                "InefficientFilter",
                "The restriction or sort order is too complex for this operation.",
            )
        if match["prop"] != "receivedDateTime" or match["op"] == "ne":
            raise _BadQuery(
                "BadRequest", "This server filters on receivedDateTime with eq/gt/ge/lt/le only."
            )
        try:
            moment = datetime.fromisoformat(match["value"].replace("Z", "+00:00"))
        except ValueError:
            raise _BadQuery(
                "BadRequest", f"Invalid date {match['value']!r} in the filter."
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        clauses.append((match["op"], moment))
    return clauses


def _parse_select(value: str | None) -> list[str] | None:
    if value is None or not value.strip():
        return None
    names = [name.strip() for name in value.split(",") if name.strip()]
    for name in names:
        if name != "id" and name not in PROPERTIES:
            raise _BadQuery(
                "RequestBroker--ParseUri",
                f"Could not find a property named '{name}' on type 'microsoft.graph.message'.",
            )
    return names


# -- for the CLI --------------------------------------------------------------


def parse_mailboxes(specs: Iterable[str]) -> dict[str, int]:
    """{email: count} from EMAIL=COUNT strings, as `syncctl dev fake-graph --mailbox` takes them."""
    mailboxes: dict[str, int] = {}
    for spec in specs:
        email, sep, count = spec.rpartition("=")
        if not sep or "@" not in email or not count.strip().isdigit():
            raise BadInput(
                f"--mailbox {spec!r}: give it as EMAIL=COUNT, e.g. ann@example.com=5000."
            )
        mailboxes[email.strip()] = int(count)
    return mailboxes


def serve(server: FakeGraphServer, *, announce: Callable[[str], None] = print) -> None:
    """Run the server until interrupted (Ctrl-C), announcing how to point syncctl at it."""
    with server:
        announce(f"Graph-compatible server at {server.url}")
        for email, count in sorted(server.mailboxes.items()):
            announce(f"  mailbox {email}: {count} messages")
        announce(f"export SYNCCTL_GRAPH_URL={server.url}")
        announce(f"export SYNCCTL_GRAPH_TOKEN={server.token}")
        try:
            while not server.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
