"""Running syncctl as an operator does, for tests: the installed command in
its own process, pointed at a test database and the local Graph server."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import psycopg

from helpers import unconfigured_env
from syncctl.fakegraph import FakeGraphServer


def syncctl(
    *args: str, env: dict[str, str], check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "syncctl", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"syncctl {' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
        )
    return result


def start_worker(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "syncctl", "run", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def drain(*args: str, env: dict[str, str], timeout: float = 600) -> None:
    """One worker that runs until nothing is left to claim; it must exit 0."""
    worker = start_worker("--drain", *args, env=env)
    _, err = worker.communicate(timeout=timeout)
    assert worker.returncode == 0, err


def environment(database_url: str, server: FakeGraphServer) -> dict[str, str]:
    return unconfigured_env(
        SYNCCTL_DATABASE_URL=database_url,
        SYNCCTL_GRAPH_URL=server.url,
        SYNCCTL_GRAPH_TOKEN=server.token,
    )


def stored_ids(db: psycopg.Connection[dict[str, Any]], email: str) -> list[str]:
    rows = db.execute(
        "SELECT e.provider_message_id FROM emails e JOIN stores s ON s.id = e.store_id"
        " WHERE s.email = %s",
        (email,),
    ).fetchall()
    return [row["provider_message_id"] for row in rows]
