"""Log lines of the installed command, as a log shipper or a person reads them:
a worker syncing from the local Graph-compatible server into real PostgreSQL,
through a retried request and a refused one."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import pytest

from helpers import unconfigured_env
from syncctl.db import Connection
from syncctl.fakegraph import FakeGraphServer
from syncctl.graph import GraphMailSource, GraphSettings
from syncctl.jobs import add_store, create_job

# Made-up secrets: the tests check they never show.
TOKEN = "graph-token-logs-3e8f0b"  # noqa: S105
PASSWORD = "db-pw-91c4d2"  # noqa: S105
MAILBOX = "adele@contoso.test"
WORKER_ID = "logging-test-worker"
CHUNK_KEYS = ("job_id", "chunk_index", "store", "worker_id")


@dataclass
class WorkerRun:
    """One `syncctl run --drain` over a job of two chunks whose first is refused by Graph."""

    job_id: UUID
    exit_code: int
    stdout: str
    stderr: str


@pytest.fixture
def server() -> Iterator[FakeGraphServer]:
    with FakeGraphServer({MAILBOX: 1500}, seed=5, token=TOKEN) as running:
        yield running


def run_worker(
    conn: Connection, database_url: str, server: FakeGraphServer, *log_flags: str
) -> WorkerRun:
    with GraphMailSource(GraphSettings(url=server.url, token=TOKEN)) as graph:
        add_store(conn, name="adele", email=MAILBOX)
        job_id = create_job(conn, graph, store_ref=MAILBOX, chunk_size=1000).job_id
    # Chunk 1: a 503 it waits out, then a 400 that fails it for good; chunk 2 syncs.
    server.fail_next(503, retry_after=0.05, code="ServiceUnavailable")
    server.fail_next(400, code="ErrorInvalidRequest")
    env = unconfigured_env(
        # The local server trusts every connection, so the password is carried but unused.
        SYNCCTL_DATABASE_URL=database_url.replace("postgres@", f"postgres:{PASSWORD}@", 1),
        SYNCCTL_GRAPH_URL=server.url,
        SYNCCTL_GRAPH_TOKEN=TOKEN,
    )
    argv = ["-v", *log_flags, "run", "--drain", "--worker-id", WORKER_ID]
    result = subprocess.run(
        [sys.executable, "-m", "syncctl", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return WorkerRun(job_id, result.returncode, result.stdout, result.stderr)


def assert_no_secret(run: WorkerRun) -> None:
    for secret in (TOKEN, PASSWORD):
        assert secret not in run.stdout
        assert secret not in run.stderr


def test_json_logs_are_one_object_a_line_with_chunk_keys_and_no_secrets(
    conn: Connection, database_url: str, server: FakeGraphServer
) -> None:
    run = run_worker(conn, database_url, server, "--log-format", "json")

    assert run.exit_code == 1, run.stderr  # a chunk it ran ended failed
    assert run.stdout == ""
    lines: list[dict[str, Any]] = [json.loads(line) for line in run.stderr.splitlines()]
    for line in lines:
        assert {"time", "level", "logger", "message"} <= line.keys()
    about_chunks = [line for line in lines if "job_id" in line]
    for line in about_chunks:
        assert {key: line[key] for key in CHUNK_KEYS} == {
            "job_id": str(run.job_id),
            "chunk_index": line["chunk_index"],
            "store": MAILBOX,
            "worker_id": WORKER_ID,
        }
        assert isinstance(line["chunk_index"], int)
    said = {
        (line["chunk_index"], line["level"], line["message"].split(": ", 1)[1].split(",")[0])
        for line in about_chunks
    }
    assert (1, "info", "claimed") in said
    assert (2, "info", "claimed") in said
    assert (2, "info", "completed") in said
    [failed] = [line for line in about_chunks if line["level"] == "error"]
    assert failed["chunk_index"] == 1
    assert "400" in failed["message"]
    # -v shows which database is used, with its password masked.
    assert any("postgres:***@" in line["message"] for line in lines if line["level"] == "debug")
    # The Graph client's retry line, logged below the worker, names the chunk too.
    [retry] = [
        line
        for line in lines
        if line["logger"].startswith("syncctl.graph") and "503" in line["message"]
    ]
    assert retry["chunk_index"] == 1
    assert retry["job_id"] == about_chunks[0]["job_id"]
    assert_no_secret(run)


def test_text_logs_name_the_job_chunk_store_and_worker_and_no_secrets(
    conn: Connection, database_url: str, server: FakeGraphServer
) -> None:
    run = run_worker(conn, database_url, server)

    assert run.exit_code == 1, run.stderr
    lines = run.stderr.splitlines()
    with pytest.raises(json.JSONDecodeError):
        json.loads(lines[0])
    for index, event in ((1, "claimed"), (1, "failed after attempt 1"), (2, "completed")):
        prefix = f"job {run.job_id} chunk {index}/2 store {MAILBOX} worker {WORKER_ID}: {event}"
        assert any(prefix in line for line in lines), f"no line says {prefix!r}"
    assert any(" DEBUG syncctl.cli: database postgresql://postgres:***@" in line for line in lines)
    assert_no_secret(run)
