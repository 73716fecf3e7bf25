"""Saying so when a Graph request has had no answer for a while.

A request that hangs ends only when the read timeout (or the deadline) ends
it, a minute or more later; meanwhile nothing moves and nothing is logged.
SlowRequests calls a request's notice once when it has been in flight for
`after` seconds, from one thread shared by every request of a client, in the
context (contextvars) of the code that sent it, so the line carries the
chunk's fields as the worker's own lines do.
"""

from __future__ import annotations

import contextvars
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Watched:
    started: float
    notice: Callable[[float], object]
    context: contextvars.Context


class SlowRequests:
    """Watches requests in flight; close() when done. Thread-safe."""

    def __init__(self, after: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.after = after
        self._clock = clock
        self._changed = threading.Condition()
        self._watched: dict[int, _Watched] = {}
        self._keys = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False

    @contextmanager
    def watch(self, notice: Callable[[float], object]) -> Iterator[None]:
        """While the block runs: once it has run `after` seconds, notice(seconds so far)."""
        if self.after <= 0:
            yield
            return
        key = next(self._keys)
        with self._changed:
            if not self._closed:
                self._watched[key] = _Watched(self._clock(), notice, contextvars.copy_context())
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="syncctl-graph-slow-requests", daemon=True
                    )
                    self._thread.start()
                self._changed.notify()
        try:
            yield
        finally:
            with self._changed:
                self._watched.pop(key, None)

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._watched.clear()
            self._changed.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)

    def _run(self) -> None:
        with self._changed:
            while not self._closed:
                now = self._clock()
                due = {k: w for k, w in self._watched.items() if now - w.started >= self.after}
                for key in due:
                    del self._watched[key]  # once per request
                if due:
                    self._changed.release()
                    try:
                        for watched in due.values():
                            self._tell(watched, now)
                    finally:
                        self._changed.acquire()
                    continue
                first = min((w.started for w in self._watched.values()), default=None)
                self._changed.wait(None if first is None else first + self.after - now)

    @staticmethod
    def _tell(watched: _Watched, now: float) -> None:
        try:
            watched.context.run(watched.notice, now - watched.started)
        except Exception:
            # A notice that fails must not end the watching of the others.
            log.exception("could not log a slow Graph request")
