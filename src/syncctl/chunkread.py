"""What a chunk reads, page by page, and where a retried chunk resumes.

A chunk of a job syncctl created owns a time window and lists exactly it
(`receivedDateTime ge start and lt end`). It pages by received time, not by
the next links Graph gives: those links count messages with `$skip`, so a
message deleted from the window between two pages (retention, a user
emptying a folder) shifts every later one down and the next page starts
past a message no page reads. Each page after the first asks for the window
from the latest received time read so far; the messages at that very second
come again and are dropped by id. The checkpoint holds that time and those
ids, so a retried chunk resumes inside its window exactly where it stopped,
whatever became of Graph's links.

A chunk of a job created before time windows (or by the original
create_sync_chunks) reads from its offset ($skip) and stops after its
estimated count; the last one reads to the end of the job's window.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from syncctl.mailsource import PAGE_SIZE, MailSource, Message, NextLinkExpired, Page, Window
from syncctl.queue import Chunk

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PageRequest:
    """The next page of a chunk: Graph's link when there is one, else (and when
    the link is refused) top messages of window after skip."""

    next_link: str | None
    window: Window
    skip: int
    top: int


def fetch(source: MailSource, mailbox: str, request: PageRequest) -> Page:
    """The page a request asks for; a refused next link is listed again from
    the request's window instead."""
    if request.next_link is not None:
        try:
            return source.fetch_page(
                mailbox,
                request.window,
                skip=request.skip,
                top=request.top,
                next_link=request.next_link,
            )
        except NextLinkExpired as exc:
            log.warning("%s; listing again from the checkpoint instead", exc)
    return source.fetch_page(mailbox, request.window, skip=request.skip, top=request.top)


class ChunkReader(ABC):
    """A chunk's position: what was read, the next link, and whether the end is
    reached. next_request() says what to fetch, advance() takes the page."""

    def __init__(self, chunk: Chunk) -> None:
        checkpoint = chunk.checkpoint or {}
        self.chunk = chunk
        self.read = int(checkpoint.get("read") or 0)
        self.next_link: str | None = checkpoint.get("next_link") or None
        # A checkpoint without a next page: the end was reached before.
        self.at_end = chunk.checkpoint is not None and self.next_link is None

    @abstractmethod
    def next_request(self) -> PageRequest | None:
        """The next page to fetch; None once the chunk is read."""

    @abstractmethod
    def advance(self, page: Page) -> list[Message]:
        """Take a fetched page; the messages of it that belong to the chunk."""

    def checkpoint(self) -> dict[str, Any]:
        """Where a retry resumes, saved with each page."""
        return {"next_link": self.next_link, "read": self.read}


class WindowReader(ChunkReader):
    """A time-window chunk: every message of [window_start, window_end), paged by
    received time."""

    def __init__(self, chunk: Chunk) -> None:
        super().__init__(chunk)
        checkpoint = chunk.checkpoint or {}
        reached = checkpoint.get("received_through")
        self.received_through = datetime.fromisoformat(reached) if reached else None
        # Ids read at received_through: the next page lists that second again.
        self.seen_at_through: set[str] = set(checkpoint.get("seen_at_through") or [])
        # Graph's link is not followed (see the module's docstring); a checkpoint
        # of an older release that holds one resumes from its received time.
        if "at_end" in checkpoint:
            self.at_end = bool(checkpoint["at_end"])
        self.next_link = None
        self._skip_seen = False

    def next_request(self) -> PageRequest | None:
        if self.at_end:
            return None
        start = self.received_through or self.chunk.window_start
        # More than a page of messages in one second: step over those read.
        skip = len(self.seen_at_through) if self._skip_seen else 0
        return PageRequest(None, Window(start, self.chunk.window_end), skip=skip, top=PAGE_SIZE)

    def advance(self, page: Page) -> list[Message]:
        new = [
            m
            for m in page.messages
            if not (
                m.received_at is not None
                and m.received_at == self.received_through
                and m.provider_message_id in self.seen_at_through
            )
        ]
        self._skip_seen = bool(page.messages) and not new and page.next_link is not None
        self.read += len(new)
        for message in new:
            if message.received_at is None:
                continue
            if self.received_through is None or message.received_at > self.received_through:
                self.received_through = message.received_at
                self.seen_at_through = set()
            if message.received_at == self.received_through:
                self.seen_at_through.add(message.provider_message_id)
        # Graph says whether the window holds more after this page; its link is not used.
        self.at_end = page.next_link is None
        return new

    def checkpoint(self) -> dict[str, Any]:
        reached = self.received_through.isoformat() if self.received_through else None
        return {
            "next_link": None,
            "at_end": self.at_end,
            "read": self.read,
            "received_through": reached,
            "seen_at_through": sorted(self.seen_at_through),
        }


class OffsetReader(ChunkReader):
    """An offset chunk: estimated_emails messages from start_offset of the job's
    window; the last chunk reads to the window's end, so nothing is left behind."""

    def __init__(self, chunk: Chunk, job_window: Window) -> None:
        super().__init__(chunk)
        self.job_window = job_window
        self.last = chunk.chunk_index == chunk.total_chunks

    def next_request(self) -> PageRequest | None:
        left = self.chunk.estimated_emails - self.read
        if self.at_end or (not self.last and left <= 0):
            return None
        return PageRequest(
            self.next_link,
            self.job_window,
            skip=self.chunk.start_offset + self.read,
            top=PAGE_SIZE if self.last else min(PAGE_SIZE, left),
        )

    def advance(self, page: Page) -> list[Message]:
        messages = page.messages
        if not self.last:
            messages = messages[: self.chunk.estimated_emails - self.read]
        self.read += len(messages)
        self.next_link = page.next_link
        self.at_end = page.next_link is None
        return messages


def reader_for(chunk: Chunk, job_window: Window) -> ChunkReader:
    """The reader a chunk needs: its own window, or offsets into its job's."""
    if chunk.window_end is not None:
        return WindowReader(chunk)
    return OffsetReader(chunk, job_window)
