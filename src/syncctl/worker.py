"""The worker: claim chunks, read them page by page into `emails`, finish them.

One process runs `concurrency` slots, each a thread with its own connection
looping claim -> run chunk -> finish. Beside them a maintenance thread
heartbeats every chunk the process holds and reaps lost leases, and a
listener thread wakes idle slots when the queue notifies that chunks became
claimable. The rules (order, fencing, backoff, roll-up) are the queue's;
this module only keeps leases alive and moves pages.
"""

from __future__ import annotations

import gc
import logging
import os
import random
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar, copy_context
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from types import FrameType
from typing import Any

import psycopg

from syncctl import metrics
from syncctl.chunkread import fetch, reader_for
from syncctl.config import DatabaseTarget, scrub_secrets
from syncctl.db import Connection, connect, query
from syncctl.deltasync import run_round
from syncctl.durations import format_time
from syncctl.errors import DatabaseUnavailable
from syncctl.ingest import LeaseLost, write_page
from syncctl.mailsource import DeltaSource, MailSource, MailSourceError, Page, Window
from syncctl.queue import Chunk, Outcome, fail_job, finish_chunk, heartbeat, queue_has_work, reap
from syncctl.queue import claim_chunk as claim_next_chunk

log = logging.getLogger("syncctl.worker")

# Reap at least this often, whatever the lease.
MAX_REAP_INTERVAL = 30.0
# Reconnecting waits between these, doubling, with jitter.
RECONNECT_BASE = 0.5
RECONNECT_CAP = 30.0
# How often the main thread notices a `stop` event set by its caller.
STOP_CHECK_INTERVAL = 0.1
# How long the listener waits for notifications before checking for shutdown.
LISTEN_TIMEOUT = 0.5
# Shortest idle wait: a job claimable now but locked by another worker's claim.
MIN_IDLE_WAIT = 0.05
# last_error and log lines quote an error's first line, at most this long.
MAX_ERROR_LENGTH = 500
# A worker's cycle collector runs after this many new containers (Python's default: 700).
_GC_YOUNG_THRESHOLD = 50_000


@dataclass(frozen=True)
class WorkerOptions:
    """How one worker process runs."""

    concurrency: int = 1  # chunks at once in this process
    lease: timedelta = timedelta(seconds=60)
    worker_id: str | None = None  # default: "<host>:<pid>:<random hex>", never reused
    drain: bool = False  # exit once the queue is drained
    poll_only: bool = False  # no LISTEN (for PgBouncer transaction pooling)
    poll_interval: timedelta = timedelta(seconds=5)
    retry_base: timedelta = timedelta(seconds=5)  # backoff base passed to finish_chunk
    metrics_port: int | None = None  # serve Prometheus metrics on every interface at this port


def run_worker(
    target: DatabaseTarget,
    source: MailSource,
    options: WorkerOptions,
    *,
    stop: threading.Event | None = None,
) -> int:
    """Run until stopped (SIGTERM/SIGINT or `stop` set) or, with drain, until drained.
    Returns the exit code: 0, or 1 when drain is set and a chunk this worker ran ended `failed`."""
    return Worker(target, source, options, stop=stop).run()


def tune_garbage_collector() -> None:
    """Make a worker process's cycle collector run less often.

    A page of mail parses into tens of thousands of dicts, lists and
    messages, none of them in a reference cycle; with Python's default
    thresholds the cycle collector runs every 700 of them and rescans
    what the process holds: about a quarter of the time spent parsing a page.
    Reference counting still frees each page as soon as it is written.
    Call once, at the start of a process that is a worker and nothing else.
    """
    gc.freeze()  # what was loaded at start-up is never garbage
    gc.set_threshold(_GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def default_worker_id() -> str:
    """A worker id no other process has used: host, pid and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class _HeldChunk:
    """A chunk this process holds; `lost` once its lease is found taken away."""

    def __init__(self, chunk: Chunk, chunk_log: _ChunkLog) -> None:
        self.chunk = chunk
        self.log = chunk_log
        self.lost = False
        # Set before the attempt ends, so the heartbeat does not mistake the end for a loss.
        self.finishing = False


def _chunk_prefix(fields: Mapping[str, Any]) -> str:
    return (
        f"job {fields['job_id']} chunk {fields['chunk_index']}/{fields['total_chunks']} "
        f"store {fields['store']} worker {fields['worker_id']}"
    )


class _ChunkLog(logging.LoggerAdapter[logging.Logger]):
    """Prefixes every line with the chunk's job, index, store and worker."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        extra = self.extra or {}
        kwargs["extra"] = {**extra, **kwargs.get("extra", {})}
        return f"{_chunk_prefix(extra)}: {msg}", kwargs


# The chunk the current slot thread is running, for lines logged below the
# worker (the Graph client's retries) that know only the mailbox.
_current_chunk: ContextVar[Mapping[str, Any] | None] = ContextVar("syncctl_chunk", default=None)


class ChunkContextFilter(logging.Filter):
    """Gives a line logged while a chunk runs the chunk's fields, as the worker's own lines have."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = _current_chunk.get()
        if fields is not None and not hasattr(record, "job_id"):
            record.__dict__.update(fields)
            record.msg = f"{_chunk_prefix(fields)}: {record.msg}"
        return True


class Worker:
    """One worker process's slots, heartbeats, reaping and wake-ups."""

    def __init__(
        self,
        target: DatabaseTarget,
        source: MailSource,
        options: WorkerOptions,
        *,
        stop: threading.Event | None = None,
    ) -> None:
        if options.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {options.concurrency}")
        if options.lease <= timedelta(0):
            raise ValueError(f"the lease must be positive, not {options.lease}")
        self.target = target
        self.source = source
        self.options = options
        self.worker_id = options.worker_id or default_worker_id()
        # Set on SIGTERM/SIGINT or by the caller: release chunks and exit.
        self._stop = stop if stop is not None else threading.Event()
        # Set on stop or once drained: slots claim nothing more.
        self._halt = threading.Event()
        # Set once every slot has exited: the maintenance threads follow.
        self._done = threading.Event()
        self._listening = threading.Event()
        self._wakeup = threading.Condition()
        self._generation = 0
        self._idle_slots = 0
        self._held: dict[int, _HeldChunk] = {}  # by claim number
        self._held_lock = threading.Lock()
        self._failed_chunks = 0
        self._fatal: BaseException | None = None

    # -- running -----------------------------------------------------------

    def run(self) -> int:
        """Run the slots until stopped or drained; return the exit code."""
        # Metrics are served before the first connection, so a port already taken fails the start.
        port = self.options.metrics_port
        with metrics.metrics_served(port) if port is not None else nullcontext():
            return self._run()

    def _run(self) -> int:
        roles = [f"slot-{number + 1}" for number in range(self.options.concurrency)]
        roles += ["heartbeat", "reaper"]
        if not self.options.poll_only:
            roles.append("listener")
        # Open every connection up front: a database that cannot be reached at
        # start is a configuration error, reported as such.
        opened: list[Connection] = []
        try:
            for role in roles:
                opened.append(self._open(role))
        except BaseException:
            for conn in opened:
                conn.close()
            raise
        slot_conns = opened[: self.options.concurrency]
        heartbeat_conn, reaper_conn = opened[
            self.options.concurrency : self.options.concurrency + 2
        ]
        listen_conn = None if self.options.poll_only else opened[-1]

        # Heartbeats have a thread and a connection of their own: a slow reap
        # (or any wait on another session) never delays a lease renewal.
        lease = self.options.lease.total_seconds()
        background = [
            threading.Thread(
                target=self._guarded,
                args=(
                    "heartbeat",
                    partial(self._every, "heartbeat", lease / 3, self._heartbeat_held),
                    heartbeat_conn,
                ),
                name="syncctl-heartbeat",
                daemon=True,
            ),
            threading.Thread(
                target=self._guarded,
                args=(
                    "reaper",
                    partial(self._every, "reaper", min(lease / 2, MAX_REAP_INTERVAL), self._reap),
                    reaper_conn,
                ),
                name="syncctl-reaper",
                daemon=True,
            ),
        ]
        if listen_conn is not None:
            background.append(
                threading.Thread(
                    target=self._guarded,
                    args=("listener", self._listen, listen_conn),
                    name="syncctl-listener",
                    daemon=True,
                )
            )
        slots = [
            threading.Thread(
                target=self._guarded,
                args=(f"slot-{number + 1}", partial(self._slot, f"slot-{number + 1}"), conn),
                name=f"syncctl-slot-{number + 1}",
                daemon=True,
            )
            for number, conn in enumerate(slot_conns)
        ]
        log.info(
            "worker %s starting: %d slot(s), lease %ss, %s",
            self.worker_id,
            self.options.concurrency,
            self.options.lease.total_seconds(),
            "polling only" if self.options.poll_only else "listening for new chunks",
        )
        with self._signals_handled():
            try:
                for thread in [*background, *slots]:
                    thread.start()
                while alive := [thread for thread in slots if thread.is_alive()]:
                    if self._stop.is_set() and not self._halt.is_set():
                        self._request_stop()
                    alive[0].join(STOP_CHECK_INTERVAL)
            finally:
                self._halt.set()
                self._done.set()
                self._wake_all()
                for thread in background:
                    thread.join()
        if self._fatal is not None:
            raise self._fatal
        log.info("worker %s stopped", self.worker_id)
        return 1 if self.options.drain and self._failed_chunks else 0

    def is_idle(self) -> bool:
        """Whether every slot waits for work and, unless polling only, the listener listens."""
        with self._wakeup:
            idle = self._idle_slots == self.options.concurrency
        return idle and (self.options.poll_only or self._listening.is_set())

    def _guarded(
        self, role: str, loop: Callable[[Connection | None], None], conn: Connection
    ) -> None:
        """Run a thread's loop; an unexpected error stops the whole worker and is re-raised."""
        try:
            loop(conn)
        except BaseException as exc:
            log.exception("worker %s %s stopped on an unexpected error", self.worker_id, role)
            self._fatal = exc
            self._request_stop()

    def _request_stop(self) -> None:
        self._stop.set()
        self._halt.set()
        # Waits for Graph (Retry-After, backoff, a request slot) end now, not minutes later.
        self.source.interrupt()
        self._wake_all()

    @contextmanager
    def _signals_handled(self) -> Iterator[None]:
        """SIGTERM/SIGINT stop the worker gracefully; a second one exits at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def on_signal(signum: int, frame: FrameType | None) -> None:
            name = signal.Signals(signum).name
            if self._stop.is_set():
                log.warning("worker %s: second %s, exiting now", self.worker_id, name)
                raise SystemExit(128 + signum)
            log.info(
                "worker %s: %s received, finishing current pages and handing chunks back",
                self.worker_id,
                name,
            )
            self._request_stop()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                # None: the handler was not set from Python; the default is the closest.
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    # -- slots -------------------------------------------------------------

    def _slot(self, role: str, conn: Connection | None) -> None:
        # One helper thread per slot fetches the next page while the slot writes the current one.
        prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"syncctl-{role}-fetch")
        try:
            # A caller's stop is seen at once, not only at the run loop's next check.
            while not (self._halt.is_set() or self._stop.is_set()):
                if conn is None:
                    conn = self._reconnect(role, until=self._halt)
                    if conn is None:
                        break
                try:
                    self._claim_and_run(conn, prefetcher)
                except (psycopg.OperationalError, DatabaseUnavailable) as exc:
                    if not _connection_lost(exc, conn):
                        # A deadlock, a cancelled statement: the connection is fine, try again.
                        log.warning("worker %s %s: %s", self.worker_id, role, self._one_line(exc))
                        self._halt.wait(RECONNECT_BASE)
                        continue
                    log.warning(
                        "worker %s %s lost its database connection (%s); reconnecting",
                        self.worker_id,
                        role,
                        self._one_line(exc),
                    )
                    conn.close()
                    conn = None
        finally:
            prefetcher.shutdown(wait=True)
            if conn is not None:
                conn.close()

    def _claim_and_run(self, conn: Connection, prefetcher: ThreadPoolExecutor) -> None:
        with self._wakeup:
            seen = self._generation
        with metrics.CLAIM_LATENCY.time():
            chunk = claim_next_chunk(conn, worker_id=self.worker_id, lease=self.options.lease)
        if chunk is not None:
            metrics.CHUNKS_CLAIMED.inc()
            self._run_chunk(conn, chunk, prefetcher)
            return
        if self.options.drain and not self._holds_any() and not queue_has_work(conn):
            if not self._halt.is_set():
                log.info("worker %s: the queue is drained", self.worker_id)
            self._halt.set()
            self._wake_all()
            return
        self._idle(seen, self._idle_timeout(conn))

    def _idle_timeout(self, conn: Connection) -> float:
        """The poll interval, or less when a chunk's retry backoff ends sooner."""
        timeout = self.options.poll_interval.total_seconds()
        row = conn.execute(query("seconds_until_claimable")).fetchone()
        if row is not None and row["seconds"] is not None:
            timeout = min(timeout, max(row["seconds"], MIN_IDLE_WAIT))
        return timeout

    def _idle(self, seen_generation: int, timeout: float) -> None:
        with self._wakeup:
            self._idle_slots += 1
            try:
                self._wakeup.wait_for(
                    lambda: self._generation != seen_generation or self._halt.is_set(), timeout
                )
            finally:
                self._idle_slots -= 1

    def _wake_all(self) -> None:
        with self._wakeup:
            self._generation += 1
            self._wakeup.notify_all()

    # -- one chunk ---------------------------------------------------------

    def _run_chunk(self, conn: Connection, chunk: Chunk, prefetcher: ThreadPoolExecutor) -> None:
        chunk_log = self._chunk_log(chunk, store=str(chunk.store_id))
        held = self._hold(chunk, chunk_log)
        try:
            try:
                context = conn.execute(query("chunk_context"), {"chunk_id": chunk.id}).fetchone()
                if context is None:
                    raise LeaseLost(f"{chunk} was deleted")
                if not context["email"]:
                    raise MailSourceError(
                        f"store {chunk.store_id} has no email address", permanent=True
                    )
                chunk_log = held.log = self._chunk_log(chunk, store=context["email"])
                _current_chunk.set(chunk_log.extra)
                chunk_log.info(
                    "claimed, attempt %d of %d%s%s",
                    chunk.attempts,
                    chunk.max_attempts,
                    _scope_text(chunk),
                    f", resuming after {chunk.checkpoint.get('read', 0)} messages"
                    if chunk.checkpoint
                    else "",
                )
                if chunk.folder_id is not None:
                    finished = self._run_round(conn, held, context["email"])
                else:
                    job_window = Window(context["sync_from"], context["sync_to"])
                    finished = self._read_chunk(
                        conn, held, context["email"], job_window, prefetcher
                    )
            except LeaseLost:
                metrics.LEASE_LOSSES.inc()
                chunk_log.warning("the chunk was taken away (reaped, cancelled or reset); dropped")
                return
            except MailSourceError as exc:
                if self._stop.is_set() and not exc.permanent:
                    # Cut short by the stop (or failing while stopping): the attempt
                    # was not the mailbox's fault, so it is handed back, not used up.
                    chunk_log.info("stopping: %s", self._one_line(exc))
                    self._finish(conn, held, "released")
                    return
                outcome: Outcome = "permanent" if exc.permanent else "error"
                self._finish(conn, held, outcome, error=self._one_line(exc))
                if exc.whole_mailbox:
                    # Every other chunk would fail alike: fail the job now, once.
                    fail_job(conn, chunk.parent_sync_job_id, self._one_line(exc))
                    chunk_log.error("failed the whole job: %s", self._one_line(exc))
                return
            except Exception as exc:
                if _connection_lost(exc, conn):
                    chunk_log.warning(
                        "lost the database connection; the chunk is left for the reaper"
                    )
                    raise
                self._finish(
                    conn, held, "error", error=f"{type(exc).__name__}: {self._one_line(exc)}"
                )
                return
            self._finish(conn, held, "completed" if finished else "released")
        finally:
            _current_chunk.set(None)
            self._unhold(chunk)

    def _read_chunk(
        self,
        conn: Connection,
        held: _HeldChunk,
        mailbox: str,
        job_window: Window,
        prefetcher: ThreadPoolExecutor,
    ) -> bool:
        """Read the chunk's pages from its checkpoint on, writing each; True when
        the chunk is read to its end, False when stopped in between.

        While a page is written the next one is fetched on the slot's helper
        thread; it is written only after the page before it, and dropped
        (once its fetch has ended) if the chunk is lost, stopped or fails."""
        chunk = held.chunk
        reader = reader_for(chunk, job_window)
        request = reader.next_request()
        prefetched: Future[Page] | None = None
        try:
            while request is not None:
                if held.lost:
                    raise LeaseLost(f"{chunk}: the heartbeat found the lease gone")
                if self._stop.is_set():
                    return False
                if prefetched is not None:
                    # Its error, if any, is raised here, where the fetch would have been.
                    page, prefetched = prefetched.result(), None
                else:
                    page = fetch(self.source, mailbox, request)
                messages = reader.advance(page)
                if held.lost:
                    raise LeaseLost(f"{chunk}: the heartbeat found the lease gone")
                request = reader.next_request()
                if request is not None and not self._stop.is_set():
                    # The copied context keeps the chunk's fields on lines the fetch logs.
                    prefetched = prefetcher.submit(
                        copy_context().run, partial(fetch, self.source, mailbox, request)
                    )
                write_page(
                    conn, chunk, messages, checkpoint=reader.checkpoint(), lease=self.options.lease
                )
                metrics.MESSAGES_SYNCED.inc(len(messages))
            return True
        finally:
            if prefetched is not None:
                # Dropped unwritten; waited for so no request outlives the chunk.
                prefetched.cancel()
                wait([prefetched])

    def _run_round(self, conn: Connection, held: _HeldChunk, mailbox: str) -> bool:
        """An incremental chunk: one delta round of its folder (see deltasync)."""
        if not isinstance(self.source, DeltaSource):
            raise MailSourceError(
                f"{held.chunk} is an incremental chunk, and this mail source has no delta queries",
                permanent=True,
            )
        return run_round(
            conn,
            self.source,
            held.chunk,
            mailbox,
            lease=self.options.lease,
            should_stop=self._stop.is_set,
            lost=lambda: held.lost,
        )

    def _finish(
        self, conn: Connection, held: _HeldChunk, outcome: Outcome, *, error: str | None = None
    ) -> None:
        chunk, chunk_log = held.chunk, held.log
        held.finishing = True
        status = finish_chunk(conn, chunk, outcome, error=error, retry_base=self.options.retry_base)
        if status is None:
            metrics.LEASE_LOSSES.inc()
            chunk_log.warning("the chunk was taken away before it could be marked %s", outcome)
        elif status == "failed":
            metrics.CHUNKS_FAILED.inc()
            with self._held_lock:
                self._failed_chunks += 1
            chunk_log.error("failed after attempt %d: %s", chunk.attempts, error)
        elif outcome == "error":
            metrics.CHUNKS_RETRIED.inc()
            chunk_log.warning(
                "attempt %d of %d failed, will retry after a backoff: %s",
                chunk.attempts,
                chunk.max_attempts,
                error,
            )
        elif outcome == "released":
            metrics.CHUNKS_RELEASED.inc()
            chunk_log.info("handed back to the queue on shutdown")
        else:
            metrics.CHUNKS_COMPLETED.inc()
            chunk_log.info("completed")

    def _chunk_log(self, chunk: Chunk, *, store: str) -> _ChunkLog:
        return _ChunkLog(
            log,
            {
                "job_id": str(chunk.parent_sync_job_id),
                "chunk_index": chunk.chunk_index,
                "total_chunks": chunk.total_chunks,
                "store": store,
                "worker_id": self.worker_id,
            },
        )

    def _hold(self, chunk: Chunk, chunk_log: _ChunkLog) -> _HeldChunk:
        held = _HeldChunk(chunk, chunk_log)
        with self._held_lock:
            self._held[chunk.claim_seq] = held
        metrics.CHUNKS_IN_PROGRESS.inc()
        return held

    def _unhold(self, chunk: Chunk) -> None:
        with self._held_lock:
            held = self._held.pop(chunk.claim_seq, None)
        if held is not None:
            metrics.CHUNKS_IN_PROGRESS.dec()

    def _holds_any(self) -> bool:
        with self._held_lock:
            return bool(self._held)

    # -- heartbeats and reaping -------------------------------------------

    def _every(
        self,
        role: str,
        interval: float,
        task: Callable[[Connection], None],
        conn: Connection | None,
    ) -> None:
        """Run task now and then every interval seconds until the worker is done,
        reconnecting when the database goes away."""
        due = time.monotonic()
        try:
            while not self._done.is_set():
                if conn is None:
                    conn = self._reconnect(role, until=self._done)
                    if conn is None:
                        break
                try:
                    task(conn)
                except psycopg.Error as exc:
                    log.warning("worker %s %s: %s", self.worker_id, role, self._one_line(exc))
                    if _connection_lost(exc, conn):
                        conn.close()
                        conn = None
                        continue
                due += interval
                self._done.wait(max(0.0, due - time.monotonic()))
                due = max(due, time.monotonic())
        finally:
            if conn is not None:
                conn.close()

    def _heartbeat_held(self, conn: Connection) -> None:
        with self._held_lock:
            held = [h for h in self._held.values() if not (h.lost or h.finishing)]
        for h in held:
            if heartbeat(conn, h.chunk, lease=self.options.lease) is None and not h.finishing:
                h.lost = True
                h.log.warning("the lease was taken away; abandoning the chunk at the next page")

    def _reap(self, conn: Connection) -> None:
        reaped = reap(conn)
        if not reaped:
            return
        metrics.CHUNKS_REAPED.inc(len(reaped))
        rows = conn.execute(
            query("stores_of_chunks"), {"chunk_ids": [r.chunk_id for r in reaped]}
        ).fetchall()
        stores = {row["id"]: row["email"] for row in rows}
        for r in reaped:
            store = stores.get(r.chunk_id, "?")
            log.warning(
                "job %s chunk %d store %s worker %s: reaped, lease expired at %s; now %s",
                r.job_id,
                r.chunk_index,
                store,
                r.worker_id,
                r.lease_expires_at,
                r.new_status,
                # The worker is the one whose lease expired, as in the text.
                extra={
                    "job_id": str(r.job_id),
                    "chunk_index": r.chunk_index,
                    "store": store,
                    "worker_id": r.worker_id,
                },
            )

    # -- wake-ups ----------------------------------------------------------

    def _listen(self, conn: Connection | None) -> None:
        """LISTEN for claimable chunks and wake idle slots on each notification."""
        try:
            while not self._halt.is_set():
                if conn is None:
                    conn = self._reconnect("listener", until=self._halt)
                    if conn is None:
                        break
                try:
                    if not self._listening.is_set():
                        conn.execute(query("listen_chunks"))
                        self._listening.set()
                        # Notifications sent while not listening are lost: look once now.
                        self._wake_all()
                    for _ in conn.notifies(timeout=LISTEN_TIMEOUT):
                        self._wake_all()
                except psycopg.Error as exc:
                    self._listening.clear()
                    log.warning("worker %s listener: %s", self.worker_id, self._one_line(exc))
                    if _connection_lost(exc, conn):
                        conn.close()
                        conn = None
                    else:
                        self._halt.wait(RECONNECT_BASE)
        finally:
            self._listening.clear()
            if conn is not None:
                conn.close()

    # -- connections -------------------------------------------------------

    def _open(self, role: str) -> Connection:
        """A connection named after this worker and role in pg_stat_activity."""
        conn = connect(self.target)
        try:
            conn.execute(query("name_session"), {"name": f"syncctl {self.worker_id} {role}"})
        except BaseException:
            conn.close()
            raise
        return conn

    def _reconnect(self, role: str, *, until: threading.Event) -> Connection | None:
        """Connect again, backing off (capped, jittered); None once `until` is set."""
        failures = 0
        # Jittered from the first try, so workers cut off together do not return together.
        while not until.wait(
            min(RECONNECT_CAP, RECONNECT_BASE * 2**failures) * random.uniform(0.5, 1.0)
        ):
            try:
                conn = self._open(role)
            except (DatabaseUnavailable, psycopg.OperationalError) as exc:
                failures += 1
                log.warning(
                    "worker %s %s: cannot reach the database (attempt %d): %s",
                    self.worker_id,
                    role,
                    failures,
                    self._one_line(exc),
                )
                continue
            log.info("worker %s %s: reconnected to the database", self.worker_id, role)
            return conn
        return None

    def _one_line(self, exc: BaseException) -> str:
        """An error's first line, without secrets, for last_error and logs."""
        text = scrub_secrets(str(exc), self.target.url).strip()
        line = text.splitlines()[0] if text else type(exc).__name__
        return line[:MAX_ERROR_LENGTH]


def _scope_text(chunk: Chunk) -> str:
    """What the chunk reads, for its "claimed" line."""
    if chunk.folder_id is not None:
        return f", delta round of folder {chunk.folder_name or chunk.folder_id}"
    if chunk.window_end is not None:
        return f", received {_window_text(chunk)}"
    return ""


def _window_text(chunk: Chunk) -> str:
    """A chunk's window as a log line gives it: [start, end), times in UTC."""
    start = format_time(chunk.window_start) if chunk.window_start else "the first message"
    end = format_time(chunk.window_end) if chunk.window_end else "the end"
    return f"[{start}, {end})"


def _connection_lost(exc: BaseException, conn: Connection | None) -> bool:
    """Whether exc means the database connection is gone (not just this statement)."""
    if isinstance(exc, DatabaseUnavailable):
        return True
    return isinstance(exc, psycopg.OperationalError) and (conn is None or conn.closed)
