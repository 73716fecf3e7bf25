"""Microsoft Graph as a mail source: auth, paging, throttling, errors.

One GraphMailSource serves every thread of a process. Each request:

- carries a bearer token: SYNCCTL_GRAPH_TOKEN as is, or an app-only token
  from msal (client credentials), cached and renewed before it expires; a
  401 renews it once, a second 401 fails the chunk for good;
- holds one of the mailbox's four request slots in PostgreSQL while it is in
  flight, so every worker on every host together stays within Graph's
  per-mailbox limit;
- is retried a bounded number of times: 429, 503 and 504 after the
  Retry-After Graph gives (capped), other 5xx, resets and timeouts after an
  exponential backoff with jitter. 404 (no such mailbox), 403 and other
  refusals fail at once, as permanent errors.

No token or secret is ever part of a message, a log line or a repr.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

import httpx
import orjson
import psycopg

from syncctl import __version__, metrics
from syncctl.cleantext import clean_escapes
from syncctl.config import DatabaseTarget
from syncctl.db import Connection, connect, query
from syncctl.errors import BadInput, DatabaseUnavailable
from syncctl.mailsource import (
    MAILBOX_CONCURRENCY,
    PAGE_SIZE,
    Interrupted,
    MailSourceError,
    Message,
    NextLinkExpired,
    Page,
    Window,
)

log = logging.getLogger(__name__)

DEFAULT_GRAPH_URL = "https://graph.microsoft.com/v1.0"
DEFAULT_AUTHORITY_HOST = "https://login.microsoftonline.com"
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
)
# A message keeps its id when it moves between folders.
IMMUTABLE_IDS = 'IdType="ImmutableId"'
# $orderby must name the first $filter property (else InefficientFilter), so
# a window without a start still filters from a date before any mail.
_EARLIEST = datetime(1900, 1, 1, tzinfo=UTC)
# Graph's error messages are quoted up to this length.
_MAX_QUOTE = 300
_CREDENTIALS_HINT = (
    "check SYNCCTL_GRAPH_TOKEN, or SYNCCTL_TENANT_ID, SYNCCTL_CLIENT_ID and "
    "SYNCCTL_CLIENT_SECRET and the app's Mail.Read application permission"
)


# -- settings ---------------------------------------------------------------


@dataclass(frozen=True)
class GraphSettings:
    """Where Graph is, how to authenticate, and how patient to be with it."""

    url: str = DEFAULT_GRAPH_URL
    token: str | None = field(default=None, repr=False)
    tenant_id: str | None = None
    client_id: str | None = None
    client_secret: str | None = field(default=None, repr=False)
    authority_host: str = DEFAULT_AUTHORITY_HOST
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    # A response still arriving after this long is abandoned (a server trickling bytes).
    request_deadline: float = 120.0
    # Tries per request (one page, one count) before the attempt fails.
    max_tries: int = 6
    # Longest wait a Retry-After is allowed to impose.
    retry_after_cap: float = 120.0
    backoff_base: float = 1.0
    backoff_cap: float = 30.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> GraphSettings:
        """Settings from SYNCCTL_GRAPH_URL, SYNCCTL_GRAPH_TOKEN, SYNCCTL_TENANT_ID,
        SYNCCTL_CLIENT_ID, SYNCCTL_CLIENT_SECRET and SYNCCTL_AUTHORITY_HOST."""
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        settings = cls(
            url=_graph_url(get("SYNCCTL_GRAPH_URL") or DEFAULT_GRAPH_URL),
            token=get("SYNCCTL_GRAPH_TOKEN"),
            tenant_id=get("SYNCCTL_TENANT_ID"),
            client_id=get("SYNCCTL_CLIENT_ID"),
            client_secret=get("SYNCCTL_CLIENT_SECRET"),
            authority_host=_authority_host(get("SYNCCTL_AUTHORITY_HOST") or DEFAULT_AUTHORITY_HOST),
        )
        settings.check_credentials()
        return settings

    def check_credentials(self) -> None:
        """Raise BadInput unless a token or a complete set of app credentials is given."""
        if self.token:
            return
        app = {
            "SYNCCTL_TENANT_ID": self.tenant_id,
            "SYNCCTL_CLIENT_ID": self.client_id,
            "SYNCCTL_CLIENT_SECRET": self.client_secret,
        }
        missing = [name for name, value in app.items() if not value]
        if len(missing) == len(app):
            raise BadInput(
                "No Graph credentials: set SYNCCTL_GRAPH_TOKEN, or SYNCCTL_TENANT_ID, "
                "SYNCCTL_CLIENT_ID and SYNCCTL_CLIENT_SECRET for an app registration."
            )
        if missing:
            raise BadInput(
                f"Graph app credentials are incomplete: set {', '.join(missing)} as well."
            )

    @property
    def graph_root(self) -> str:
        """The scheme and host of the Graph URL, e.g. https://graph.microsoft.com."""
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}"

    @property
    def scope(self) -> str:
        """The app-only scope: every application permission granted for this Graph."""
        return f"{self.graph_root}/.default"

    @property
    def authority(self) -> str:
        return f"{self.authority_host}/{self.tenant_id}"

    @property
    def longest_request(self) -> float:
        """The most seconds one request can take: waiting for a connection,
        connecting, the deadline, and the one read that may overrun it."""
        return 2 * self.connect_timeout + self.request_deadline + self.read_timeout

    @property
    def secrets(self) -> tuple[str, ...]:
        return tuple(s for s in (self.token, self.client_secret) if s)


def _graph_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise BadInput(
            f"SYNCCTL_GRAPH_URL {url!r} is not an http(s) URL; the default is {DEFAULT_GRAPH_URL}."
        )
    return url.rstrip("/")


def _authority_host(host: str) -> str:
    # National clouds are often given as a bare host name.
    return (host if "://" in host else f"https://{host}").rstrip("/")


# -- tokens -----------------------------------------------------------------


class TokenError(Exception):
    """No token could be had. refused: the identity platform said no (not a network fault)."""

    def __init__(self, message: str, *, refused: bool) -> None:
        super().__init__(message)
        self.refused = refused


class TokenProvider(Protocol):
    def token(self) -> str:
        """A bearer token that is valid now."""
        ...

    def refresh(self, rejected: str) -> str:
        """A new token after Graph rejected `rejected` with 401."""
        ...


class StaticToken:
    """SYNCCTL_GRAPH_TOKEN, used as is: it cannot be renewed."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __repr__(self) -> str:
        return "StaticToken(***)"

    def token(self) -> str:
        return self._token

    def refresh(self, rejected: str) -> str:
        return self._token


class ClientCredentialsApp(Protocol):
    """The part of msal.ConfidentialClientApplication syncctl uses."""

    def acquire_token_for_client(self, scopes: list[str]) -> dict[str, Any]: ...


class MsalTokens:
    """App-only tokens from msal, kept until `margin` seconds before they expire.

    A 401 means Graph no longer accepts the token it has (revoked, rotated
    keys): `refresh` then starts a new app, so msal's own cache cannot hand
    the same token back.
    """

    def __init__(
        self,
        app_factory: Callable[[], ClientCredentialsApp],
        scope: str,
        *,
        margin: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._app_factory = app_factory
        self._scope = scope
        self._margin = margin
        self._clock = clock
        self._lock = threading.Lock()
        self._app: ClientCredentialsApp | None = None
        self._token: str | None = None
        self._expires_at = 0.0

    def __repr__(self) -> str:
        return f"MsalTokens(scope={self._scope!r})"

    def token(self) -> str:
        with self._lock:
            if self._token is not None and self._clock() < self._expires_at - self._margin:
                return self._token
            return self._acquire()

    def refresh(self, rejected: str) -> str:
        with self._lock:
            if self._token is not None and self._token != rejected:
                return self._token  # another thread renewed it already
            self._app = None
            self._token = None
            return self._acquire()

    def _acquire(self) -> str:
        try:
            if self._app is None:
                self._app = self._app_factory()
            result = self._app.acquire_token_for_client(scopes=[self._scope])
        except ValueError as exc:
            # msal raises ValueError for an authority (tenant) it cannot use.
            self._app = None
            raise TokenError(
                f"the identity platform refused the tenant: {exc}", refused=True
            ) from None
        except Exception as exc:
            self._app = None
            raise TokenError(
                f"could not reach the identity platform ({type(exc).__name__}: {exc})",
                refused=False,
            ) from None
        token = result.get("access_token")
        if not token:
            error = result.get("error", "no token")
            description = str(result.get("error_description", "")).splitlines()
            reason = f"{error}: {description[0]}" if description else str(error)
            # Throttled or unavailable identity platform is worth retrying; anything else is a no.
            transient = error in ("temporarily_unavailable", "server_error", "slow_down")
            raise TokenError(f"the identity platform answered {reason}", refused=not transient)
        self._token = str(token)
        self._expires_at = self._clock() + float(result.get("expires_in", 3600))
        return self._token


def msal_app_factory(settings: GraphSettings) -> Callable[[], ClientCredentialsApp]:
    """Builds msal confidential clients for the settings' tenant and app."""

    def build() -> ClientCredentialsApp:
        # Imported on first use: only app-only auth needs it.
        import msal

        app: ClientCredentialsApp = msal.ConfidentialClientApplication(
            settings.client_id,
            client_credential=settings.client_secret,
            authority=settings.authority,
            token_cache=msal.TokenCache(),
            timeout=settings.connect_timeout + settings.read_timeout,
            app_name="syncctl",
            app_version=__version__,
        )
        return app

    return build


def token_provider(settings: GraphSettings) -> TokenProvider:
    """The token source the settings call for: the static token first, else msal."""
    settings.check_credentials()
    if settings.token:
        return StaticToken(settings.token)
    return MsalTokens(msal_app_factory(settings), settings.scope)


# -- per-mailbox request slots ------------------------------------------------

# How often a request that finds no free slot makes sure the mailbox's slot rows exist.
ENSURE_SLOTS_EVERY = 1.0


class MailboxSlots:
    """At most `limit` Graph requests in flight per mailbox, across every process
    that shares the database.

    A slot is a row of graph_request_slots held under a lease: a process that
    dies holding one frees it when the lease runs out. Within a process a
    semaphore per mailbox keeps extra threads from polling the database.
    """

    def __init__(
        self,
        target: DatabaseTarget,
        *,
        limit: int = MAILBOX_CONCURRENCY,
        lease: float = 180.0,
        max_wait: float = 600.0,
        poll: float = 0.05,
    ) -> None:
        self._target = target
        self._limit = limit
        self._lease = timedelta(seconds=lease)
        self._max_wait = max_wait
        self._poll = poll
        self._host = socket.gethostname()
        self._holder_prefix = f"{self._host}:{os.getpid()}"
        self._interrupted = threading.Event()
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self._local: dict[str, threading.BoundedSemaphore] = {}
        # When each mailbox's slot rows were last made sure of (time.monotonic()).
        self._ensured: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"MailboxSlots(database={self._target.masked_url}, limit={self._limit})"

    @contextmanager
    def hold(self, mailbox: str) -> Iterator[int]:
        """Hold one of the mailbox's slots for the duration; yields the slot number."""
        key = mailbox.strip().lower()
        deadline = time.monotonic() + self._max_wait
        local = self._semaphore(key)
        while not local.acquire(timeout=min(self._poll, max(0.0, deadline - time.monotonic()))):
            self._check_interrupted(mailbox)
            if time.monotonic() >= deadline:
                raise self._gave_up(mailbox)
        try:
            slot, holder = self._take(key, mailbox, deadline)
            try:
                yield slot
            finally:
                self._give_back(key, slot, holder)
        finally:
            local.release()

    def interrupt(self) -> None:
        """Every wait for a slot, now or later, raises Interrupted."""
        self._interrupted.set()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _check_interrupted(self, mailbox: str) -> None:
        if self._interrupted.is_set():
            raise Interrupted(f"Stopped while waiting for a Graph request slot of {mailbox}.")

    def _semaphore(self, key: str) -> threading.BoundedSemaphore:
        with self._lock:
            if key not in self._local:
                self._local[key] = threading.BoundedSemaphore(self._limit)
            return self._local[key]

    def _take(self, key: str, mailbox: str, deadline: float) -> tuple[int, str]:
        if key not in self._ensured:
            self._ensure(key)
        holder = f"{self._holder_prefix}:{uuid.uuid4().hex[:12]}"
        params = {"mailbox": key, "limit": self._limit, "holder": holder, "lease": self._lease}
        while True:
            row = self._run("take_request_slot", params)
            if row is not None:
                return int(row["slot"]), holder
            if time.monotonic() >= deadline:
                raise self._gave_up(mailbox)
            # Every slot busy, or the rows are gone: the table is UNLOGGED, so a
            # crash or a failover empties it. Make them again now and then.
            if time.monotonic() - self._ensured[key] >= ENSURE_SLOTS_EVERY:
                self._ensure(key)
                self._free_slots_of_dead_processes(key)
                continue
            # Other processes hold every slot: poll, spread out so they do not all retry at once.
            self._interrupted.wait(self._poll * random.uniform(0.5, 1.5))
            self._check_interrupted(mailbox)

    def _ensure(self, key: str) -> None:
        self._run("ensure_request_slots", {"mailbox": key, "limit": self._limit})
        self._ensured[key] = time.monotonic()

    def _free_slots_of_dead_processes(self, key: str) -> None:
        """Give back slots held by processes of this host that no longer run (a
        killed worker), instead of waiting out their lease. Holders name their
        host and process id; other hosts' slots wait for their lease."""
        with self._lock:
            if self._conn is None or self._conn.closed:
                return
            rows = self._conn.execute(
                query("request_slots_of_host"), {"mailbox": key, "prefix": f"{self._host}:"}
            ).fetchall()
        for row in rows:
            pid = _holder_pid(row["holder"])
            if pid is not None and pid != os.getpid() and not _process_alive(pid):
                log.info("slot %d of %s was held by process %d, now gone", row["slot"], key, pid)
                self._give_back(key, int(row["slot"]), row["holder"])

    def _give_back(self, key: str, slot: int, holder: str) -> None:
        try:
            self._run("release_request_slot", {"mailbox": key, "slot": slot, "holder": holder})
        except DatabaseUnavailable as exc:
            # The lease frees the slot in time; the request itself went fine.
            log.warning("could not give back request slot %d of %s: %s", slot, key, exc)

    def _run(self, name: str, params: dict[str, Any]) -> dict[str, Any] | None:
        with self._lock:
            for attempt in (1, 2):
                if self._conn is None or self._conn.closed:
                    self._conn = connect(self._target)
                try:
                    cursor = self._conn.execute(query(name), params)
                    return cursor.fetchone() if cursor.description is not None else None
                except psycopg.OperationalError as exc:
                    self._conn.close()
                    self._conn = None
                    if attempt == 2:
                        raise DatabaseUnavailable(
                            f"Lost the database at {self._target.masked_url} while taking a "
                            f"Graph request slot: {type(exc).__name__}"
                        ) from None
            raise AssertionError("unreachable")

    def _gave_up(self, mailbox: str) -> MailSourceError:
        return MailSourceError(
            f"No Graph request slot of mailbox {mailbox} came free within "
            f"{self._max_wait:g}s: other workers kept all {self._limit} busy."
        )


def _holder_pid(holder: str) -> int | None:
    """The process id in a slot holder (host:pid:random); None if it has none."""
    parts = holder.rsplit(":", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


# -- the mail source ----------------------------------------------------------


@dataclass(frozen=True)
class _Reply:
    status: int
    headers: httpx.Headers
    content: bytes


class _Transient(Exception):
    """A try failed in a way another try may not (timeout, reset, token endpoint down)."""


class GraphMailSource:
    """mailsource.MailSource over Microsoft Graph. Thread-safe; close() when done."""

    def __init__(
        self,
        settings: GraphSettings,
        *,
        tokens: TokenProvider | None = None,
        slots: MailboxSlots | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self.settings = settings
        self._tokens = tokens if tokens is not None else token_provider(settings)
        self._slots = slots
        self._sleep = sleep  # None: wait on _interrupted, so interrupt() cuts waits short
        self._interrupted = threading.Event()
        self._client = httpx.Client(
            timeout=httpx.Timeout(
                connect=settings.connect_timeout,
                read=settings.read_timeout,
                write=settings.read_timeout,
                pool=settings.connect_timeout,
            ),
            headers={"Accept": "application/json", "User-Agent": f"syncctl/{__version__}"},
            follow_redirects=False,
            transport=transport,
        )
        self._origin = _origin(settings.url)

    def __repr__(self) -> str:
        return f"GraphMailSource(url={self.settings.url!r})"

    def __enter__(self) -> GraphMailSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def interrupt(self) -> None:
        self._interrupted.set()
        if self._slots is not None:
            self._slots.interrupt()

    def close(self) -> None:
        self._client.close()
        if self._slots is not None:
            self._slots.close()

    # -- MailSource ------------------------------------------------------

    def count(self, mailbox: str, window: Window) -> int:
        """How many messages the mailbox holds in the window ($count, filtered)."""
        reply = self._request(
            mailbox,
            f"{self._messages_url(mailbox)}/$count",
            {"$filter": window_filter(window)},
            # Graph counts with a $filter only under eventual consistency.
            {"ConsistencyLevel": "eventual"},
        )
        text = reply.content.decode("utf-8-sig", "replace").strip()
        if not text.isdigit():
            raise MailSourceError(
                f"Graph answered the message count of mailbox {mailbox} with something "
                f"that is not a number: {self._scrub(text[:80])!r}."
            )
        return int(text)

    def received_at(self, mailbox: str, window: Window, position: int) -> datetime | None:
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
        reply = self._request(mailbox, self._messages_url(mailbox), params, {})
        try:
            page = parse_page(reply.content)
        except ValueError as exc:
            raise MailSourceError(
                f"Graph answered a look-up in mailbox {mailbox} with something that is not "
                f"valid Graph JSON ({self._scrub(str(exc))})."
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
        self,
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
            if _origin(next_link) != self._origin:
                raise MailSourceError(
                    f"Graph's next page link for mailbox {mailbox} points at "
                    f"{_origin(next_link)}, not {self._origin}; not sending credentials there.",
                    permanent=True,
                )
            reply = self._request(mailbox, next_link, None, {}, following_link=True)
        else:
            params = {
                "$filter": window_filter(window),
                "$orderby": "receivedDateTime asc",
                "$select": ",".join(SELECT_FIELDS),
                "$top": str(max(1, min(top, PAGE_SIZE))),
            }
            if skip > 0:
                params["$skip"] = str(skip)
            reply = self._request(mailbox, self._messages_url(mailbox), params, {})
        try:
            return parse_page(reply.content)
        except ValueError as exc:
            raise MailSourceError(
                f"Graph returned a page of mailbox {mailbox} that is not valid Graph JSON "
                f"({self._scrub(str(exc))}); nothing of it was written."
            ) from None

    # -- requests --------------------------------------------------------

    def _messages_url(self, mailbox: str) -> str:
        return f"{self.settings.url}/users/{quote(mailbox.strip(), safe='@')}/messages"

    def _request(
        self,
        mailbox: str,
        url: str,
        params: dict[str, str] | None,
        headers: dict[str, str],
        *,
        following_link: bool = False,
    ) -> _Reply:
        """A successful reply, after the retries Graph's answers allow.
        following_link: url is a next link Graph gave, which it may since refuse."""
        tries = max(1, self.settings.max_tries)
        problem = "no answer"
        for attempt in range(1, tries + 1):
            if self._interrupted.is_set():
                raise Interrupted(f"Stopped before asking Graph for mailbox {mailbox}.")
            try:
                reply = self._send_authorized(mailbox, url, params, headers)
            except _Transient as exc:
                problem = str(exc)
                wait, reason = self._backoff(attempt), "backoff"
            else:
                if 200 <= reply.status < 300:
                    return reply
                problem = _describe(reply)
                if reply.status in (429, 503, 504):
                    after = self._retry_after(reply)
                    if after is None:
                        wait, reason = self._backoff(attempt), "backoff"
                    else:
                        wait, reason = after, "retry_after"
                elif reply.status >= 500 or reply.status == 408:
                    wait, reason = self._backoff(attempt), "backoff"
                elif following_link and reply.status in (400, 410):
                    raise NextLinkExpired(
                        f"Graph no longer accepts a next page link of mailbox {mailbox} "
                        f"({self._scrub(_describe(reply))})."
                    )
                else:
                    raise self._refusal(mailbox, reply)
            if attempt == tries:
                break
            log.warning(
                "Graph request for mailbox %s failed (%s); try %d of %d in %.2fs",
                mailbox,
                problem,
                attempt + 1,
                tries,
                wait,
            )
            metrics.GRAPH_THROTTLE_WAIT.labels(reason=reason).inc(wait)
            self._pause(mailbox, wait)
        raise MailSourceError(
            f"Graph request for mailbox {mailbox} gave up after {tries} "
            f"{'try' if tries == 1 else 'tries'}; last: {problem}."
        )

    def _pause(self, mailbox: str, seconds: float) -> None:
        """Wait before the next try; Interrupted at once if the caller stops meanwhile."""
        if self._sleep is not None:
            self._sleep(seconds)
        else:
            self._interrupted.wait(seconds)
        if self._interrupted.is_set():
            raise Interrupted(
                f"Stopped while waiting {seconds:.2f}s to ask Graph again for mailbox {mailbox}."
            )

    def _send_authorized(
        self,
        mailbox: str,
        url: str,
        params: dict[str, str] | None,
        headers: dict[str, str],
    ) -> _Reply:
        """Send with the current token; on 401 once more with a renewed one."""
        token = self._token(mailbox, None)
        reply = self._send(mailbox, url, params, headers, token)
        if reply.status != 401:
            return reply
        log.info(
            "Graph answered 401 for mailbox %s; renewing the token and trying once more", mailbox
        )
        token = self._token(mailbox, token)
        reply = self._send(mailbox, url, params, headers, token)
        if reply.status == 401:
            raise MailSourceError(
                f"The credentials were refused by Graph for mailbox {mailbox} "
                f"({_describe(reply)}); {_CREDENTIALS_HINT}.",
                permanent=True,
            )
        return reply

    def _token(self, mailbox: str, rejected: str | None) -> str:
        try:
            if rejected is None:
                return self._tokens.token()
            return self._tokens.refresh(rejected)
        except TokenError as exc:
            if exc.refused:
                raise MailSourceError(
                    f"The credentials were refused for mailbox {mailbox}: "
                    f"{self._scrub(str(exc))}; {_CREDENTIALS_HINT}.",
                    permanent=True,
                ) from None
            raise _Transient(f"no Graph token: {self._scrub(str(exc))}") from None

    def _send(
        self,
        mailbox: str,
        url: str,
        params: dict[str, str] | None,
        headers: dict[str, str],
        token: str,
    ) -> _Reply:
        """One HTTP request, holding a slot of the mailbox while it is in flight."""
        all_headers = {"Prefer": IMMUTABLE_IDS, **headers, "Authorization": f"Bearer {token}"}
        slot: AbstractContextManager[object] = (
            self._slots.hold(mailbox) if self._slots is not None else nullcontext()
        )
        try:
            with slot:
                # The deadline starts once the slot is held: waiting for one is not Graph's time.
                deadline = time.monotonic() + self.settings.request_deadline
                with self._client.stream("GET", url, params=params, headers=all_headers) as answer:
                    body = bytearray()
                    for piece in answer.iter_bytes():
                        body += piece
                        if time.monotonic() > deadline:
                            metrics.count_graph_request(None)
                            raise _Transient(
                                f"the answer took longer than {self.settings.request_deadline:g}s"
                            )
                    metrics.count_graph_request(answer.status_code)
                    return _Reply(answer.status_code, answer.headers, bytes(body))
        except httpx.ConnectTimeout:
            metrics.count_graph_request(None)
            raise _Transient(
                f"connecting timed out after {self.settings.connect_timeout:g}s"
            ) from None
        except httpx.TimeoutException:
            metrics.count_graph_request(None)
            raise _Transient(
                f"no answer within the {self.settings.read_timeout:g}s read timeout"
            ) from None
        except httpx.RequestError as exc:
            metrics.count_graph_request(None)
            raise _Transient(
                f"connection failed ({type(exc).__name__}: {self._scrub(str(exc))})"
            ) from None

    def _retry_after(self, reply: _Reply) -> float | None:
        """Graph's Retry-After in seconds (it may be fractional), capped; None if absent."""
        value = reply.headers.get("Retry-After")
        if value is None:
            return None
        try:
            seconds = float(value)
        except ValueError:
            try:
                seconds = (parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds()
            except (TypeError, ValueError):
                return None
        return min(max(seconds, 0.0), self.settings.retry_after_cap)

    def _backoff(self, attempt: int) -> float:
        """Exponential in the attempt, capped, with jitter so workers spread out."""
        ceiling = min(self.settings.backoff_cap, self.settings.backoff_base * 2.0 ** (attempt - 1))
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def _refusal(self, mailbox: str, reply: _Reply) -> MailSourceError:
        """A permanent error for an answer no retry can change."""
        what = self._scrub(_describe(reply))
        if reply.status == 404:
            message = f"Mailbox {mailbox} was not found in Graph ({what})."
        elif reply.status == 403:
            message = (
                f"Graph denied access to mailbox {mailbox} ({what}); the app needs the "
                "Mail.Read application permission, and any application access policy "
                "must include the mailbox."
            )
        else:
            return MailSourceError(
                f"Graph rejected the request for mailbox {mailbox} ({what}).", permanent=True
            )
        return MailSourceError(message, whole_mailbox=True)

    def _scrub(self, text: str) -> str:
        for secret in self.settings.secrets:
            text = text.replace(secret, "***")
        return text


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


def parse_page(content: bytes) -> Page:
    """A Graph list response as a Page, its text cleaned for PostgreSQL;
    ValueError when it is not one."""
    try:
        document = orjson.loads(clean_escapes(content))
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"unparsable JSON: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("value"), list):
        raise ValueError("no 'value' list of messages in the answer")
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


def _describe(reply: _Reply) -> str:
    """'503 ServiceUnavailable: message' from a Graph error answer."""
    code, message = "", ""
    try:
        error = json.loads(reply.content).get("error", {})
        code, message = str(error.get("code", "")), str(error.get("message", ""))
    except (ValueError, AttributeError, UnicodeDecodeError):
        message = reply.content[:_MAX_QUOTE].decode("utf-8", "replace").strip()
    text = f"{reply.status} {code}".strip()
    if message:
        text += f": {message[:_MAX_QUOTE]}"
    return text


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


# -- for the CLI --------------------------------------------------------------


def open_mail_source(target: DatabaseTarget) -> GraphMailSource:
    """Graph as configured by the environment, its per-mailbox request slots kept
    in target's database. Raises BadInput when no credentials are configured."""
    settings = GraphSettings.from_env()
    # A slot outlives any request that holds it, so only a crashed holder's slot expires.
    slots = MailboxSlots(target, lease=settings.longest_request + 30.0)
    return GraphMailSource(settings, slots=slots)
