"""Per-mailbox request slots in PostgreSQL: Graph's limit of four requests in
flight per mailbox, kept by every worker on every host together."""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import psycopg

from syncctl.config import DatabaseTarget
from syncctl.db import Connection, connect, query
from syncctl.errors import DatabaseUnavailable
from syncctl.mailsource import MAILBOX_CONCURRENCY, Interrupted, MailSourceError

log = logging.getLogger(__name__)

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
