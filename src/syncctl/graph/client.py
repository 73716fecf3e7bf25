"""Graph's HTTP client: every request with a token, a mailbox's request slot,
and the retries Graph's answers allow.

- a bearer token: SYNCCTL_GRAPH_TOKEN as is, or an app-only token from msal
  (client credentials), cached and renewed before it expires; a 401 renews
  it once (a fixed token cannot be renewed: it is sent once more, in case the
  refusal was passing), a second 401 fails the chunk for good;
- one of the mailbox's four request slots in PostgreSQL while the request
  is in flight, so every worker on every host together stays within Graph's
  per-mailbox limit;
- a bounded number of tries: 429, 503 and 504 after the Retry-After Graph
  gives (capped), other 5xx, resets and timeouts after an exponential
  backoff with jitter. 404 (no such mailbox: MailboxNotFound), 403 and other
  refusals fail at once, as permanent errors. A connection refused (nothing
  listening, no such host) fails at once too, naming the URL: Graph is not
  where SYNCCTL_GRAPH_URL says, and waiting will not bring it there;
- a request with no answer after settings.slow_request_notice seconds is
  logged once, so a hang shows while it lasts, not only when it times out.

No token or secret is ever part of a message, a log line or a repr.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from functools import partial
from urllib.parse import quote, urlsplit

import httpx

from syncctl import __version__, metrics
from syncctl.errors import clause
from syncctl.graph.auth import TokenError, TokenProvider, token_provider
from syncctl.graph.settings import CREDENTIALS_HINT, GraphSettings
from syncctl.graph.slots import MailboxSlots
from syncctl.graph.waiting import SlowRequests
from syncctl.mailsource import Interrupted, MailboxNotFound, MailSourceError, NextLinkExpired

log = logging.getLogger(__name__)

# A message keeps its id when it moves between folders.
IMMUTABLE_IDS = 'IdType="ImmutableId"'
# Graph's error messages are quoted up to this length.
_MAX_QUOTE = 300


@dataclass(frozen=True)
class Reply:
    status: int
    headers: httpx.Headers
    content: bytes


class _Transient(Exception):
    """A try failed in a way another try may not (timeout, reset, token endpoint down)."""


class GraphClient:
    """GET requests to Graph for a mailbox. Thread-safe; close() when done."""

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
        self._origin = origin(settings.url)
        self._slow = SlowRequests(settings.slow_request_notice)

    def __repr__(self) -> str:
        return f"GraphClient(url={self.settings.url!r})"

    def interrupt(self) -> None:
        """From now on, waits (slot, Retry-After, backoff) raise Interrupted at once."""
        self._interrupted.set()
        if self._slots is not None:
            self._slots.interrupt()

    def close(self) -> None:
        self._slow.close()
        self._client.close()
        if self._slots is not None:
            self._slots.close()

    def mailbox_url(self, mailbox: str, path: str) -> str:
        """The URL of path (e.g. "messages") under the mailbox."""
        return f"{self.settings.url}/users/{quote(mailbox.strip(), safe='@')}/{path}"

    def same_origin(self, link: str) -> bool:
        """Whether link is on the configured Graph host (scheme, host and port)."""
        return origin(link) == self._origin

    def check_link(self, mailbox: str, link: str) -> None:
        """Refuse a link Graph gave that leaves the configured Graph host: the
        token is never sent anywhere else."""
        if origin(link) != self._origin:
            raise MailSourceError(
                f"Graph's next page link for mailbox {mailbox} points at "
                f"{origin(link)}, not {self._origin}; not sending credentials there.",
                permanent=True,
            )

    def scrub(self, text: str) -> str:
        """text with every secret of the settings masked."""
        for secret in self.settings.secrets:
            text = text.replace(secret, "***")
        return text

    def get(
        self,
        mailbox: str,
        url: str,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        *,
        following_link: bool = False,
        expect: Callable[[Reply], MailSourceError | None] | None = None,
    ) -> Reply:
        """A successful reply, after the retries Graph's answers allow.
        following_link: url is a link Graph gave, which it may since refuse
        (NextLinkExpired). expect: looks at a 4xx answer first and returns the
        error to raise for it, or None for the usual handling."""
        return self._request(
            mailbox, url, params, headers or {}, following_link=following_link, expect=expect
        )

    def _request(
        self,
        mailbox: str,
        url: str,
        params: dict[str, str] | None,
        headers: dict[str, str],
        *,
        following_link: bool,
        expect: Callable[[Reply], MailSourceError | None] | None,
    ) -> Reply:
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
                problem = describe(reply)
                wait, reason = self._wait_or_raise(mailbox, reply, attempt, following_link, expect)
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
            f"{'try' if tries == 1 else 'tries'}; last: {clause(problem)}."
        )

    def _wait_or_raise(
        self,
        mailbox: str,
        reply: Reply,
        attempt: int,
        following_link: bool,
        expect: Callable[[Reply], MailSourceError | None] | None,
    ) -> tuple[float, str]:
        """How long to wait before trying again after a failed answer, and why;
        raises for an answer no retry can change."""
        expected = expect(reply) if expect is not None and reply.status < 500 else None
        if expected is not None:
            raise expected
        if reply.status in (429, 503, 504):
            after = self._retry_after(reply)
            if after is not None:
                return after, "retry_after"
            return self._backoff(attempt), "backoff"
        if reply.status >= 500 or reply.status == 408:
            return self._backoff(attempt), "backoff"
        if following_link and reply.status in (400, 410):
            raise NextLinkExpired(
                f"Graph no longer accepts a next page link of mailbox {mailbox} "
                f"({self.scrub(describe(reply))})."
            )
        raise self._refusal(mailbox, reply)

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
    ) -> Reply:
        """Send with the current token; on 401 once more, with a renewed token
        where it can be renewed (msal), else with the same fixed token."""
        token = self._token(mailbox, None)
        reply = self._send(mailbox, url, params, headers, token)
        if reply.status != 401:
            return reply
        renewable = self._tokens.renewable
        if renewable:
            log.info(
                "Graph refused the app token for mailbox %s (%s); renewing it and trying once more",
                mailbox,
                self.scrub(describe(reply)),
            )
        else:
            log.warning(
                "Graph refused the credentials for mailbox %s (%s): SYNCCTL_GRAPH_TOKEN is a "
                "fixed token, which syncctl cannot renew; sending it once more only in case "
                "the refusal was passing",
                mailbox,
                self.scrub(describe(reply)),
            )
        token = self._token(mailbox, token)
        reply = self._send(mailbox, url, params, headers, token)
        if reply.status == 401:
            what = self.scrub(describe(reply))
            if renewable:
                message = (
                    f"The credentials were refused by Graph for mailbox {mailbox} even with a "
                    f"renewed token ({what}); {CREDENTIALS_HINT}."
                )
            else:
                message = (
                    f"The credentials were refused by Graph for mailbox {mailbox} ({what}): "
                    "SYNCCTL_GRAPH_TOKEN is a fixed token, which syncctl cannot renew; set a "
                    "valid one, or SYNCCTL_TENANT_ID, SYNCCTL_CLIENT_ID and SYNCCTL_CLIENT_SECRET "
                    "(with the Mail.Read application permission) for tokens syncctl renews itself."
                )
            raise MailSourceError(message, permanent=True)
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
                    f"{clause(self.scrub(str(exc)))}; {CREDENTIALS_HINT}.",
                    permanent=True,
                ) from None
            raise _Transient(f"no Graph token: {self.scrub(str(exc))}") from None

    def _send(
        self,
        mailbox: str,
        url: str,
        params: dict[str, str] | None,
        headers: dict[str, str],
        token: str,
    ) -> Reply:
        """One HTTP request, holding a slot of the mailbox while it is in flight."""
        all_headers = {"Prefer": IMMUTABLE_IDS, **headers, "Authorization": f"Bearer {token}"}
        slot: AbstractContextManager[object] = (
            self._slots.hold(mailbox) if self._slots is not None else nullcontext()
        )
        try:
            with slot, self._slow.watch(partial(self._still_waiting, mailbox, url)):
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
                    return Reply(answer.status_code, answer.headers, bytes(body))
        except httpx.ConnectTimeout:
            metrics.count_graph_request(None)
            raise _Transient(
                f"connecting timed out after {self.settings.connect_timeout:g}s"
            ) from None
        except httpx.ConnectError as exc:
            # Nothing listening, or no such host. A worker waits it out with
            # backoff (an outage or a restart passes); a command a person runs
            # says so at once: another try in a few seconds would find the same.
            metrics.count_graph_request(None)
            if self.settings.retry_refused_connections:
                raise _Transient(
                    f"could not connect to {_without_query(url)} "
                    f"({clause(self.scrub(str(exc))) or type(exc).__name__})"
                ) from None
            raise MailSourceError(
                f"Could not connect to Graph at {_without_query(url)} "
                f"({clause(self.scrub(str(exc))) or type(exc).__name__}); check "
                f"SYNCCTL_GRAPH_URL (now {self.settings.url}) and that this host can reach it."
            ) from None
        except httpx.TimeoutException:
            metrics.count_graph_request(None)
            raise _Transient(
                f"no answer within the {self.settings.read_timeout:g}s read timeout"
            ) from None
        except httpx.RequestError as exc:
            metrics.count_graph_request(None)
            raise _Transient(
                f"connection failed ({type(exc).__name__}: {self.scrub(str(exc))})"
            ) from None

    def _still_waiting(self, mailbox: str, url: str, waited: float) -> None:
        log.warning(
            "Graph has not answered a request for mailbox %s in %gs (GET %s); still "
            "waiting, until the %gs read timeout ends the try if nothing arrives",
            mailbox,
            round(waited, 1),
            urlsplit(url).path,
            self.settings.read_timeout,
        )

    def _retry_after(self, reply: Reply) -> float | None:
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

    def _refusal(self, mailbox: str, reply: Reply) -> MailSourceError:
        """A permanent error for an answer no retry can change."""
        what = self.scrub(describe(reply))
        if reply.status == 404:
            return MailboxNotFound(
                f"Mailbox {mailbox} was not found in Graph ({what}); check the store's "
                "address with `syncctl store list`.",
                mailbox=mailbox,
                reason=what,
            )
        if reply.status == 403:
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


def describe(reply: Reply) -> str:
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


def _without_query(url: str) -> str:
    """url without its query (a next link's is long and says nothing to a person)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()
