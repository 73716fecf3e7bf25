"""Live progress of sync jobs: `syncctl status --watch` and the demo.

Each refresh runs one report query (reports.job_rows) and turns its rows into
JobProgress: chunks done of total, messages synced of estimated, the rate
measured between refreshes, an ETA, failed and retried counts, and the stuck
chunks by name. On a terminal the frame is redrawn in place; anywhere else
(a pipe, a file, a log) each refresh prints one plain line per job.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal
from uuid import UUID

from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from syncctl import output, reports
from syncctl.config import DatabaseTarget
from syncctl.db import Connection, connection
from syncctl.durations import format_duration, format_time
from syncctl.operations import unknown_job

# The rate is measured over the refreshes of about this long ago up to now.
RATE_WINDOW = timedelta(seconds=5)
# How often a waiting watch looks at its `until` condition.
UNTIL_CHECK = 0.1
STUCK_STYLE = "bold red"
# Narrower consoles get two lines per job instead of one table row.
WIDE_LAYOUT = 100
UNKNOWN = "-"

WatchEnd = Literal["finished", "until", "interrupted"]


@dataclass(frozen=True)
class StuckChunk:
    """A chunk processing past its lease, or for longer than reports.STUCK_AFTER."""

    chunk_index: int
    worker_id: str | None
    reason: str  # "lease expired" or "processing too long"


@dataclass(frozen=True)
class JobProgress:
    """One job as the progress view shows it."""

    job_id: UUID
    store: str
    status: str
    chunks_done: int
    chunks_failed: int
    total_chunks: int
    messages: int
    estimated: int
    retried: int
    rate: float | None  # messages per second; None until it can be measured
    eta: timedelta | None  # None when finished or the rate is unknown
    stuck: tuple[StuckChunk, ...]
    created_at: datetime | None = None
    # Every message received before this is stored (the job's watermark); None: not yet.
    synced_through: datetime | None = None

    @property
    def active(self) -> bool:
        return self.status in reports.ACTIVE

    @property
    def chunks_finished(self) -> int:
        return self.chunks_done + self.chunks_failed

    @property
    def percent(self) -> float | None:
        """Messages synced as a percentage of the estimate (None when nothing was estimated)."""
        return min(100.0, self.messages * 100.0 / self.estimated) if self.estimated else None


class RateMeter:
    """Turns report rows into JobProgress, remembering earlier refreshes to measure rates.

    A running job's rate is the messages synced between the oldest refresh
    within the window and now, by the database's clock; at its first refresh,
    the average since it started. A finished job's rate is its average.
    """

    def __init__(self, window: timedelta = RATE_WINDOW) -> None:
        self._window = window
        self._samples: dict[UUID, deque[tuple[datetime, int]]] = {}

    def measure(self, rows: Sequence[Mapping[str, Any]]) -> list[JobProgress]:
        """JobProgress for each row of reports.job_rows, oldest job first."""
        jobs = [self._progress(row) for row in rows]
        return sorted(jobs, key=lambda job: (job.created_at is None, job.created_at, job.job_id))

    def _progress(self, row: Mapping[str, Any]) -> JobProgress:
        estimated = int(row["estimated_emails"] or 0)
        messages = int(row["emails_synced"])
        status = str(row["status"])
        rate = self._rate(row)
        eta = None
        if status in reports.ACTIVE and rate and estimated > messages:
            eta = timedelta(seconds=(estimated - messages) / rate)
        return JobProgress(
            job_id=row["job_id"],
            store=str(row["store_email"] or row["store_name"] or "(store deleted)")
            + (" (incremental)" if row.get("sync_type") == "incremental" else ""),
            status=status,
            chunks_done=int(row["chunks_done"]),
            chunks_failed=int(row["chunks_failed"]),
            total_chunks=int(row["total_chunks"]),
            messages=messages,
            estimated=estimated,
            retried=int(row["retried"]),
            rate=rate,
            eta=eta,
            stuck=tuple(
                StuckChunk(int(s["chunk_index"]), s.get("worker_id"), str(s["reason"]))
                for s in row["stuck_chunks"]
            ),
            created_at=row.get("created_at"),
            synced_through=row.get("synced_through"),
        )

    def _rate(self, row: Mapping[str, Any]) -> float | None:
        now: datetime = row["sampled_at"]
        synced = int(row["emails_synced"])
        started: datetime | None = row["started_at"]
        if row["status"] not in reports.ACTIVE:
            self._samples.pop(row["job_id"], None)
            return _average(synced, started, row["completed_at"])
        samples = self._samples.setdefault(row["job_id"], deque())
        samples.append((now, synced))
        # Keep the newest sample at least a window old, to measure from.
        while len(samples) > 2 and now - samples[1][0] >= self._window:
            samples.popleft()
        first_at, first_synced = samples[0]
        elapsed = (now - first_at).total_seconds()
        if elapsed <= 0:
            return _average(synced, started, now)
        return max(0, synced - first_synced) / elapsed


def _average(synced: int, started: datetime | None, ended: datetime | None) -> float | None:
    if started is None or ended is None:
        return None
    elapsed = (ended - started).total_seconds()
    return synced / elapsed if elapsed > 0 else None


# -- drawing ------------------------------------------------------------------


def render(jobs: Sequence[JobProgress]) -> RenderableType:
    """One frame: a row and a bar per job, then each stuck chunk by name. As wide as the
    console allows: one table row per job, or two lines per job on a narrow terminal."""
    if not jobs:
        return Text("No job is pending or processing.")
    return _Frame(tuple(jobs))


@dataclass(frozen=True)
class _Frame:
    jobs: tuple[JobProgress, ...]

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if options.max_width >= WIDE_LAYOUT:
            yield self._table()
        else:
            yield from self._stacked(options.max_width)
        for job in self.jobs:
            for chunk in job.stuck:
                yield Text(f"⚠ {_stuck_note(job, chunk)}", style=STUCK_STYLE)

    def _table(self) -> Table:
        # The bar takes the width left over; everything else keeps its natural width.
        table = Table(box=None, padding=(0, 1), pad_edge=False, expand=True)
        table.add_column("store", no_wrap=True, overflow="ellipsis")
        table.add_column("status", no_wrap=True)
        table.add_column("chunks", ratio=1)
        table.add_column("done", justify="right", no_wrap=True)
        table.add_column("messages", justify="right", no_wrap=True)
        table.add_column("rate", justify="right", no_wrap=True)
        table.add_column("ETA", justify="right", no_wrap=True)
        table.add_column("failed", justify="right", no_wrap=True)
        table.add_column("retried", justify="right", no_wrap=True)
        table.add_column("synced through", no_wrap=True)
        for job in self.jobs:
            table.add_row(
                Text(job.store),
                _status(job),
                _bar(job),
                Text(f"{job.chunks_finished}/{job.total_chunks}"),
                Text(f"{job.messages:,}/{job.estimated:,}"),
                Text(UNKNOWN if job.rate is None else f"{job.rate:,.0f}/s"),
                Text(_eta(job)),
                Text(str(job.chunks_failed), style="red" if job.chunks_failed else ""),
                Text(str(job.retried), style="yellow" if job.retried else ""),
                Text(_synced_through(job)),
                style=STUCK_STYLE if job.stuck else None,
            )
        return table

    def _stacked(self, width: int) -> Iterator[RenderableType]:
        store_width = min(max(len(job.store) for job in self.jobs), width // 2)
        for job in self.jobs:
            grid = Table.grid(padding=(0, 1), expand=True)
            grid.add_column(width=store_width, no_wrap=True, overflow="ellipsis")
            grid.add_column(width=10, no_wrap=True)
            grid.add_column(ratio=1)
            grid.add_column(width=7, justify="right", no_wrap=True)
            grid.add_row(
                Text(job.store),
                _status(job),
                _bar(job),
                Text(f"{job.chunks_finished}/{job.total_chunks}"),
                style=STUCK_STYLE if job.stuck else None,
            )
            yield grid
            yield Text(
                f"  {job.messages:,}/{job.estimated:,} messages, "
                f"{UNKNOWN if job.rate is None else f'{job.rate:,.0f}/s'}, ETA {_eta(job)}, "
                f"{job.chunks_failed} failed, {job.retried} retried",
                style="dim",
                overflow="ellipsis",
                no_wrap=True,
            )
            if job.synced_through is not None:
                yield Text(f"  synced through {_synced_through(job)}", style="dim")


def _status(job: JobProgress) -> Text:
    return Text("stuck" if job.stuck else job.status, style=_status_style(job))


def _bar(job: JobProgress) -> ProgressBar:
    """Chunks finished of total; red once a chunk failed, in the stuck style while one is stuck."""
    return ProgressBar(
        total=max(job.total_chunks, 1),
        completed=job.chunks_finished if job.total_chunks else 1,
        complete_style=STUCK_STYLE if job.stuck else "yellow",
        finished_style="red" if job.chunks_failed or job.status == "failed" else "green",
    )


def plain_line(job: JobProgress) -> str:
    """The job's progress as one line of plain text, for pipes and logs."""
    line = (
        f"{job.store} job {job.job_id} {job.status}: "
        f"chunks {job.chunks_finished}/{job.total_chunks} "
        f"({job.chunks_failed} failed, {job.retried} retried), "
        f"messages {_messages(job)}, {_rate(job.rate)}, ETA {_eta(job)}, "
        f"synced through {_synced_through(job)}"
    )
    for chunk in job.stuck:
        line += f"; STUCK {_stuck_note(job, chunk)}"
    return line


def _status_style(job: JobProgress) -> str:
    if job.stuck:
        return STUCK_STYLE
    return {"completed": "green", "failed": "red", "cancelled": "dim", "processing": "cyan"}.get(
        job.status, ""
    )


def _messages(job: JobProgress) -> str:
    shown = f"{job.messages}/{job.estimated}"
    return shown if job.percent is None else f"{shown} ({job.percent:.0f}%)"


def _rate(rate: float | None) -> str:
    return UNKNOWN if rate is None else f"{rate:.0f} msg/s"


def _eta(job: JobProgress) -> str:
    if not job.active:
        return UNKNOWN
    return UNKNOWN if job.eta is None else format_duration(job.eta + timedelta(seconds=0.999))


def _synced_through(job: JobProgress) -> str:
    return UNKNOWN if job.synced_through is None else format_time(job.synced_through)


def _stuck_note(job: JobProgress, chunk: StuckChunk) -> str:
    return (
        f"{job.store} chunk {chunk.chunk_index}/{job.total_chunks} stuck: {chunk.reason} "
        f"(worker {chunk.worker_id or 'unknown'})"
    )


# -- watching -----------------------------------------------------------------


def watch(
    target_or_conn: DatabaseTarget | Connection,
    *,
    job_id: UUID | Collection[UUID] | None = None,
    interval: float = 1.0,
    until: Callable[[], bool] | None = None,
    console: Console | None = None,
) -> WatchEnd:
    """Show the progress of the jobs named (else of every active job, and of those
    that finish while watched) every `interval` seconds, until they are all
    finished ("finished"), `until` returns true ("until"), or Ctrl-C ("interrupted").
    Redraws in place on a terminal; anywhere else prints a plain line per active job
    each refresh, and one more when it finishes."""
    console = console if console is not None else Console(highlight=False)
    named = frozenset([job_id] if isinstance(job_id, UUID) else job_id or ())
    with _connected(target_or_conn) as conn:
        frames = _Frames(conn, named)
        try:
            if console.is_terminal:
                return _redraw(console, frames, interval, until)
            return _print_lines(console, frames, interval, until)
        except KeyboardInterrupt:
            return "interrupted"


class _Frames:
    """The jobs of each refresh: the ones named, else the active ones and those seen before."""

    def __init__(self, conn: Connection, named: frozenset[UUID]) -> None:
        self._conn = conn
        self._named = named
        self._seen: set[UUID] = set()
        self._meter = RateMeter()

    def next(self) -> list[JobProgress]:
        rows = reports.job_rows(
            self._conn, job_ids=self._named or self._seen, active=not self._named
        )
        missing = self._named - {row["job_id"] for row in rows}
        if missing:
            raise unknown_job(min(missing))
        self._seen.update(row["job_id"] for row in rows)
        return self._meter.measure(rows)


def _redraw(
    console: Console, frames: _Frames, interval: float, until: Callable[[], bool] | None
) -> WatchEnd:
    # Messages written to stdout or stderr meanwhile are printed above the frame.
    with Live(console=console, auto_refresh=False, transient=False) as live:
        while True:
            jobs = frames.next()
            live.update(render(jobs), refresh=True)
            end = _end(jobs, until)
            if end is not None:
                return end
            _pause(interval, until)


def _print_lines(
    console: Console, frames: _Frames, interval: float, until: Callable[[], bool] | None
) -> WatchEnd:
    # A finished job's line no longer changes: it is printed once.
    printed_finished: set[UUID] = set()
    while True:
        jobs = frames.next()
        if not jobs:
            output.message("No job is pending or processing; `syncctl status` lists recent ones.")
        for job in jobs:
            if job.job_id in printed_finished:
                continue
            console.print(Text(plain_line(job)), soft_wrap=True)
            if not job.active:
                printed_finished.add(job.job_id)
        end = _end(jobs, until)
        if end is not None:
            return end
        _pause(interval, until)


def _end(jobs: Sequence[JobProgress], until: Callable[[], bool] | None) -> WatchEnd | None:
    if not any(job.active for job in jobs):
        return "finished"
    if until is not None and until():
        return "until"
    return None


def _pause(seconds: float, until: Callable[[], bool] | None) -> None:
    """Wait `seconds`, or less once `until` turns true."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if until is not None and until():
            return
        time.sleep(min(left, UNTIL_CHECK))


@contextmanager
def _connected(target_or_conn: DatabaseTarget | Connection) -> Iterator[Connection]:
    if isinstance(target_or_conn, DatabaseTarget):
        with connection(target_or_conn) as conn:
            yield conn
    else:
        yield target_or_conn
