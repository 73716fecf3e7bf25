"""An in-process mail source for tests: deterministic mailboxes, with faults on demand.

Mailbox `m` with n messages holds ids f"{m}-{i:06d}" for i in 0..n-1,
received one minute apart from FIRST_RECEIVED on, so every window, skip and
page is predictable. Every fetch is recorded in `calls`.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

from syncctl.mailsource import MailSourceError, Message, NextLinkExpired, Page, Window

FIRST_RECEIVED = datetime(2024, 1, 1, tzinfo=UTC)


def message_id(mailbox: str, index: int) -> str:
    return f"{mailbox}-{index:06d}"


def received_at(index: int) -> datetime:
    return FIRST_RECEIVED + timedelta(minutes=index)


@dataclass(frozen=True)
class FetchCall:
    """One fetch_page call: its arguments, where in the window it started, what it returned."""

    number: int  # 1-based, across all mailboxes
    mailbox: str
    skip: int
    top: int
    next_link: str | None
    window: Window  # the window listed: the link's own when following one
    position: int  # index in that window of the first message asked for
    returned: int = 0


@dataclass
class FakeMailSource:
    """Mailboxes of `mailboxes[email]` messages each; faults set by the fields below."""

    mailboxes: dict[str, int]
    # The largest page it serves, whatever top asks for (Graph's own cap is 1000).
    max_page: int = 1000
    # Seconds each fetch takes.
    page_delay: float = 0.0
    # Call numbers that raise a transient MailSourceError.
    transient_on_calls: set[int] = field(default_factory=set)
    # Mailboxes whose every fetch raises this error.
    fetch_errors: dict[str, Exception] = field(default_factory=dict)
    # Called with each call before it is served: block on an Event, raise, or act.
    before_fetch: Callable[[FetchCall], None] | None = None
    calls: list[FetchCall] = field(default_factory=list)
    # The most fetches of one mailbox that ran at the same time.
    max_in_flight: dict[str, int] = field(default_factory=dict)
    _in_flight: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    # Links handed out before this generation are refused.
    _links_from: int = field(default=0, init=False, repr=False)

    def expire_links(self) -> None:
        """Refuse every next link handed out so far (NextLinkExpired), as Graph
        refuses one it no longer knows; links handed out later work."""
        with self._lock:
            self._links_from += 1

    def interrupt(self) -> None:
        """Nothing here waits on Graph: fetches are not cut short."""

    def count(self, mailbox: str, window: Window) -> int:
        return len(self._window_indexes(mailbox, window))

    def received_at(self, mailbox: str, window: Window, position: int) -> datetime | None:
        indexes = self._window_indexes(mailbox, window)
        return received_at(indexes[position]) if position < len(indexes) else None

    def fetch_page(
        self,
        mailbox: str,
        window: Window,
        *,
        skip: int,
        top: int,
        next_link: str | None = None,
    ) -> Page:
        if next_link is not None:
            # A link stands for itself, as Graph's do: the window given with it is ignored.
            link_mailbox, window, position, page_top, _ = decode_link(next_link)
            assert link_mailbox == mailbox, "a next link was used for another mailbox"
        else:
            position, page_top = skip, top
        with self._lock:
            call = FetchCall(len(self.calls) + 1, mailbox, skip, top, next_link, window, position)
            self.calls.append(call)
            self._in_flight[mailbox] = self._in_flight.get(mailbox, 0) + 1
            self.max_in_flight[mailbox] = max(
                self.max_in_flight.get(mailbox, 0), self._in_flight[mailbox]
            )
        try:
            return self._serve(call, window, position, page_top)
        finally:
            with self._lock:
                self._in_flight[mailbox] -= 1

    def _serve(self, call: FetchCall, window: Window, position: int, top: int) -> Page:
        if self.before_fetch is not None:
            self.before_fetch(call)
        if call.next_link is not None and decode_link(call.next_link)[4] < self._links_from:
            raise NextLinkExpired(f"fake: next link of {call.mailbox} refused")
        if self.page_delay:
            time.sleep(self.page_delay)
        if call.number in self.transient_on_calls:
            raise MailSourceError(f"fake: transient failure on call {call.number}")
        if call.mailbox in self.fetch_errors:
            raise self.fetch_errors[call.mailbox]
        indexes = self._window_indexes(call.mailbox, window)
        served = indexes[position : position + min(top, self.max_page)]
        end = position + len(served)
        more = end < len(indexes)
        with self._lock:
            self.calls[call.number - 1] = replace(call, returned=len(served))
        return Page(
            messages=[_message(call.mailbox, i) for i in served],
            next_link=encode_link(call.mailbox, window, end, top, self._links_from)
            if more
            else None,
        )

    def _window_indexes(self, mailbox: str, window: Window) -> list[int]:
        if mailbox not in self.mailboxes:
            raise MailSourceError(f"fake: mailbox {mailbox} not found", permanent=True)
        return [
            i
            for i in range(self.mailboxes[mailbox])
            if (window.received_from is None or received_at(i) >= window.received_from)
            and (window.received_to is None or received_at(i) < window.received_to)
        ]

    def calls_for(self, mailbox: str) -> list[FetchCall]:
        with self._lock:
            return [c for c in self.calls if c.mailbox == mailbox]


def encode_link(mailbox: str, window: Window, position: int, top: int, generation: int) -> str:
    payload = json.dumps(
        {
            "mailbox": mailbox,
            "from": _iso(window.received_from),
            "to": _iso(window.received_to),
            "position": position,
            "top": top,
            "generation": generation,
        }
    )
    return "fake-next:" + base64.urlsafe_b64encode(payload.encode()).decode()


def decode_link(link: str) -> tuple[str, Window, int, int, int]:
    """The mailbox, window, position, page size and generation a next link stands for."""
    assert link.startswith("fake-next:"), f"not a next link of this source: {link!r}"
    decoded = json.loads(base64.urlsafe_b64decode(link[len("fake-next:") :]))
    window = Window(_time(decoded["from"]), _time(decoded["to"]))
    return (
        str(decoded["mailbox"]),
        window,
        int(decoded["position"]),
        int(decoded["top"]),
        int(decoded["generation"]),
    )


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def _time(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def _message(mailbox: str, index: int) -> Message:
    return Message(
        provider_message_id=message_id(mailbox, index),
        received_at=received_at(index),
        internet_message_id=f"<{index}@{mailbox}>",
        conversation_id=f"conversation-{index // 3}",
        subject=f"Message {index}",
        from_address="sender@example.com",
        body=f"Body of message {index}",
    )


@dataclass
class CountOnly:
    """A mail source that only counts: all that creating a job needs."""

    messages: int = 2500
    counts: dict[str, int] = field(default_factory=dict)  # per mailbox, else `messages`

    def count(self, mailbox: str, window: Window) -> int:
        return self.counts.get(mailbox, self.messages)

    def received_at(self, mailbox: str, window: Window, position: int) -> datetime | None:
        """A second per message from the window's start (or FIRST_RECEIVED)."""
        moment = (window.received_from or FIRST_RECEIVED) + timedelta(seconds=position)
        within = window.received_to is None or moment < window.received_to
        return moment if within and position < self.counts.get(mailbox, self.messages) else None

    def fetch_page(
        self, mailbox: str, window: Window, *, skip: int, top: int, next_link: str | None = None
    ) -> Page:
        raise AssertionError("these tests never fetch mail")

    def interrupt(self) -> None:
        """Nothing to cut short."""
