"""Small helpers shared by the tests."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from syncctl.config import DatabaseTarget
from syncctl.graph import GraphSettings
from syncctl.mailsource import MailSource
from syncctl.worker import Worker, WorkerOptions

# Generous: a condition that holds is seen well before this.
WAIT = 30.0


def unconfigured_env(**settings: str) -> dict[str, str]:
    """This process's environment without syncctl's configuration (SYNCCTL_*,
    DATABASE_URL, NO_COLOR), plus settings: for a `syncctl` child process."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("SYNCCTL_") and name not in ("DATABASE_URL", "NO_COLOR")
    }
    env.update(settings)
    return env


def wait_for(
    condition: Callable[[], object], what: str = "a condition", timeout: float = WAIT
) -> None:
    """Poll until condition() is true; fail the test after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.01)


def stop_embedded_server(pgdata: Path) -> None:
    """Stop an embedded PostgreSQL that syncctl left running (as it does for reuse)."""
    postmaster = pgdata / "postmaster.pid"
    if not postmaster.exists():
        return
    os.kill(int(postmaster.read_text().split()[0]), signal.SIGINT)  # fast shutdown
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and postmaster.exists():
        time.sleep(0.1)


class WorkerThread:
    """A Worker run in a thread, as one process among several would be; `stop`
    stands for SIGTERM."""

    def __init__(self, target: DatabaseTarget, source: MailSource, options: WorkerOptions):
        self.stop = threading.Event()
        self.worker = Worker(target, source, options, stop=self.stop)
        self.result: int | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = self.worker.run()
        except BaseException as exc:
            self.error = exc

    def join(self, timeout: float = WAIT) -> int:
        """Wait for the worker to exit by itself (drained); its exit code."""
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the worker did not exit"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result

    def finish(self) -> int:
        """Stop the worker as SIGTERM would; its exit code."""
        self.stop.set()
        return self.join()


def quick_graph_settings(url: str, token: str, **changes: Any) -> GraphSettings:
    """Graph client settings for tests: tiny backoffs, few tries, short but safe timeouts."""
    settings = GraphSettings(
        url=url,
        token=token,
        connect_timeout=5.0,
        read_timeout=10.0,
        request_deadline=30.0,
        max_tries=3,
        backoff_base=0.01,
        backoff_cap=0.05,
        retry_after_cap=5.0,
    )
    return replace(settings, **changes)
