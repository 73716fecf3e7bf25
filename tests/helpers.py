"""Small helpers shared by the tests."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

# Generous: a condition that holds is seen well before this.
WAIT = 30.0


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
