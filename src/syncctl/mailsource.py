"""The seam between the queue and a mail service.

A worker needs two things from a mail service: how many messages a window
holds (to plan chunks) and one page of messages at a position (to run
them). Microsoft Graph is one implementation (graph.py); tests use others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol


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
    """A mail request failed. permanent: retrying cannot help (mailbox gone, access refused)."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class MailSource(Protocol):
    def count(self, mailbox: str, window: Window) -> int:
        """How many messages the mailbox holds in the window."""
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
        the top messages after skipping skip of the window."""
        ...
