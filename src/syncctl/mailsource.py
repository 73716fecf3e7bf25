"""The seam between the queue and a mail service.

Planning a job needs how many messages a window holds and when the message
at a position of it was received (to cut the window into chunks of about
equal counts); running a chunk needs one page of messages at a time. An
incremental job needs the mailbox's folders and, per folder, the pages of a
delta round: what changed since the last round.
Microsoft Graph is one implementation (the graph package); tests use others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

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
    folder_id: str | None = None  # the mail folder it is in (Graph's parentFolderId)
    change_key: str | None = None  # Graph's version of the message: changes on every edit


@dataclass(frozen=True)
class Page:
    """Messages from one request, and where the next page starts (None: the end)."""

    messages: list[Message]
    next_link: str | None


@dataclass(frozen=True)
class Folder:
    """A mail folder: its id, its path of display names ("Inbox/Receipts"), and
    how many messages it holds (None when not asked)."""

    id: str
    path: str
    total: int | None = None


@dataclass(frozen=True)
class DeltaPage:
    """One page of a folder's delta round: messages added to or changed in the
    folder, ids that left it (deleted or moved away), and either the next
    page's link or, on the round's last page, the link of the next round."""

    messages: list[Message]
    removed: list[str]
    next_link: str | None
    delta_link: str | None


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


class DeltaStateLost(MailSourceError):
    """The service no longer knows the folder's sync state (expired, reset): the
    folder needs a full round."""


class FolderGone(MailSourceError):
    """The folder no longer exists (deleted since the job was created)."""


class MailboxNotFound(MailSourceError):
    """The service does not know the mailbox (a mistyped address, a deleted user,
    a user without a mailbox): bad input where a person named it, a failed job
    (once, not per chunk) where a worker reads it. reason: the service's own
    words, e.g. "404 ErrorInvalidUser: ..."."""

    def __init__(self, message: str, *, mailbox: str, reason: str) -> None:
        super().__init__(message, whole_mailbox=True)
        self.mailbox = mailbox
        self.reason = reason


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


@runtime_checkable
class MailboxCheck(Protocol):
    """A mail source that can tell whether a mailbox exists (one cheap request)."""

    def check_mailbox(self, mailbox: str) -> None:
        """Return when the service knows the mailbox; MailboxNotFound when it does
        not; MailSourceError when it cannot be asked (unreachable, refused)."""
        ...


@runtime_checkable
class FolderCount(Protocol):
    """A mail source that counts one folder's messages by received time (`verify`)."""

    def folder_count(self, mailbox: str, folder_id: str, window: Window) -> int:
        """How many messages the folder holds that were received in the window.
        FolderGone if the folder does not exist."""
        ...


@runtime_checkable
class DeltaSource(Protocol):
    """A mail source that also serves folders and delta rounds (incremental jobs)."""

    def folders(self, mailbox: str) -> list[Folder]:
        """Every mail folder of the mailbox, parents before their children."""
        ...

    def folder_total(self, mailbox: str, folder_id: str) -> int:
        """How many messages the folder holds now. FolderGone if it does not exist."""
        ...

    def delta_page(self, mailbox: str, folder_id: str, link: str | None) -> DeltaPage:
        """One page of a delta round of the folder: from link (a next link or the
        last round's delta link), or the first page of a full round when None.
        DeltaStateLost when the service refuses link's state; FolderGone when
        the folder no longer exists."""
        ...

    def interrupt(self) -> None:
        """As MailSource.interrupt."""
        ...
