"""Cutting a job's window into chunks: how large, and where the boundaries fall.

A chunk owns a time window, [window_start, window_end) on receivedDateTime,
not a range of offsets: offsets move when old mail is deleted during a sync,
and a chunk that starts at an offset then starts past messages no chunk
reads. The boundaries are the received times of the messages at each
multiple of the chunk size, looked up in the mailbox when the job is
created, so chunks hold about equal counts. Messages that share a
boundary's time all belong to the later chunk (`ge start`, `lt end`).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime

from syncctl.mailsource import MAILBOX_CONCURRENCY, PAGE_SIZE, MailSource, Window

# Past this many messages a chunk is split further; a page checkpoint makes a
# large chunk as resumable as a small one.
MAX_CHUNK_SIZE = 50_000


@dataclass(frozen=True)
class PlannedChunk:
    """One chunk of a plan: its window, and where it sits in the count (an estimate)."""

    chunk_index: int
    window_start: datetime | None  # None: from the mailbox's first message
    window_end: datetime | None
    start_offset: int
    end_offset: int
    estimated_emails: int


def chunk_size_for(count: int, parallel: int) -> int:
    """Messages per chunk when the operator does not say: `parallel` chunks, or
    a multiple of it when one would hold more than MAX_CHUNK_SIZE, so the
    chunks of a job run in full rounds; whole pages."""
    rounds = max(1, math.ceil(count / (MAX_CHUNK_SIZE * parallel)))
    size = math.ceil(count / (rounds * parallel) / PAGE_SIZE) * PAGE_SIZE
    return max(PAGE_SIZE, min(MAX_CHUNK_SIZE, size))


def plan_chunks(
    source: MailSource, mailbox: str, window: Window, *, count: int, chunk_size: int
) -> list[PlannedChunk]:
    """The chunks of `count` messages of the window, about chunk_size each,
    tiling the window with no gap and no overlap. One look-up per boundary,
    up to Graph's per-mailbox limit at once."""
    if count <= 0:
        return []
    positions = list(range(chunk_size, count, chunk_size))
    times = _received_times(source, mailbox, window, positions)
    # The mailbox may change while it is looked up: keep only boundaries that
    # rise and fall inside the window. Tied times merge two chunks into one.
    cuts: list[tuple[int, datetime]] = []
    previous = window.received_from
    for position, moment in zip(positions, times, strict=True):
        if moment is None:
            break
        if previous is not None and moment <= previous:
            continue
        if window.received_to is not None and moment >= window.received_to:
            break
        cuts.append((position, moment))
        previous = moment
    starts = [(0, window.received_from), *cuts]
    ends = [*cuts, (count, window.received_to)]
    return [
        PlannedChunk(
            chunk_index=index,
            window_start=start_at,
            window_end=end_at,
            start_offset=start,
            end_offset=max(start, end - 1),
            estimated_emails=max(0, end - start),
        )
        for index, ((start, start_at), (end, end_at)) in enumerate(
            zip(starts, ends, strict=True), start=1
        )
    ]


def _received_times(
    source: MailSource, mailbox: str, window: Window, positions: list[int]
) -> list[datetime | None]:
    if len(positions) <= 1:
        return [source.received_at(mailbox, window, p) for p in positions]
    with ThreadPoolExecutor(
        max_workers=min(MAILBOX_CONCURRENCY, len(positions)), thread_name_prefix="syncctl-plan"
    ) as pool:
        return list(pool.map(lambda p: source.received_at(mailbox, window, p), positions))
