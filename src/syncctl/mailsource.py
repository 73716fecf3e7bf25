"""The seam between the queue and a mail service.

Planning a job needs how many messages a window holds and when the message
at a position of it was received (to cut the window into chunks of about
equal counts); running a chunk needs one page of messages at a time.
Microsoft Graph is one implementation (graph.py); tests use others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

# Graph's largest page of messages.
PAGE_SIZE = 1000
# Graph serves a mailbox at most this many requests at once (the fifth gets
# 429 MailboxConcurrency): the most chunks of one job worth running at once.
MAILBOX_CONCURRENCY = 4


@dataclass(frozen=True)
class Window:
    """The received-time window of a job: from (inclusive, optional) to (exclusive)."""

    received_from: datetime | None
    received_to: datetime | None


@dataclass(frozen=True)
class Message:
    """One message as syncctl stores it (a row of `emails`)."""

    provider_message_id: str
    received_at: datetime | None
    internet_message_id: str | None = None
    conversation_id: str | None = None
    subject: str | None = None
    from_address: str | None = None
    from_name: str | None = None
    to_recipients: list[dict[str, Any]] = field(default_factory=list)
    cc_recipients: list[dict[str, Any]] = field(default_factory=list)
    bcc_recipients: list[dict[str, Any]] = field(default_factory=list)
    sent_at: datetime | None = None
    is_read: bool | None = None
    is_draft: bool | None = None
    has_attachments: bool | None = None
    importance: str | None = None
    flag_status: str | None = None
    body_content_type: str | None = None
    body: str | None = None


@dataclass(frozen=True)
class Page:
    """Messages from one request, and where the next page starts (None: the end)."""

    messages: list[Message]
    next_link: str | None


class MailSourceError(Exception):
    """A mail request failed. permanent: retrying cannot help (mailbox gone, access
    refused). whole_mailbox: the mailbox itself is gone or refused, so every
    chunk of it would fail alike (implies permanent)."""

    def __init__(
        self, message: str, *, permanent: bool = False, whole_mailbox: bool = False
    ) -> None:
        super().__init__(message)
        self.permanent = permanent or whole_mailbox
        self.whole_mailbox = whole_mailbox


class NextLinkExpired(MailSourceError):
    """The service no longer accepts a next-page link it gave earlier; list again instead."""


class Interrupted(MailSourceError):
    """A wait (for a request slot, a Retry-After, a backoff) was cut short
    because the caller is stopping; nothing is wrong with the mailbox."""


class MailSource(Protocol):
    def count(self, mailbox: str, window: Window) -> int:
        """How many messages the mailbox holds in the window."""
        ...

    def received_at(self, mailbox: str, window: Window, position: int) -> datetime | None:
        """When the message at position (0: the oldest) of the window was received;
        None when the window holds no message there."""
        ...

    def fetch_page(
        self,
        mailbox: str,
        window: Window,
        *,
        skip: int,
        top: int,
        next_link: str | None = None,
    ) -> Page:
        """One page in receivedDateTime order: from next_link when given, else
        the top messages after skipping skip of the window. NextLinkExpired when
        the service refuses next_link."""
        ...

    def interrupt(self) -> None:
        """Stop waiting: from now on a wait for a request slot, a Retry-After or a
        backoff, in progress or to come, raises Interrupted at once. A request
        already sent is answered (or times out) as usual."""
        ...
