"""An operator's first hour, run as the operator runs it: the installed
`syncctl` in its own process. Flags where people type them, plain help, the
embedded database stopped on request, an operator's reset recorded as one,
hints that name the right command, and wording a person would write."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from commandline import syncctl
from fakes import CountOnly
from helpers import unconfigured_env
from syncctl import jobs, queue
from syncctl.argv import normalize
from syncctl.config import DatabaseTarget
from syncctl.db import connect
from syncctl.embedded import process_running

Db = psycopg.Connection[dict[str, Any]]
GROUPS = {"db", "store", "dev"}


@pytest.mark.parametrize(
    ("typed", "parsed"),
    [
        (["run", "-v"], ["-v", "run"]),
        (
            ["status", "--verbose", "--log-format", "json"],
            ["--verbose", "--log-format", "json", "status"],
        ),
        (["status", "--log-format=json", "JOB"], ["--log-format=json", "status", "JOB"]),
        (["--json", "status"], ["status", "--json"]),
        (["--json", "db", "status", "-v"], ["-v", "db", "status", "--json"]),
        (["-v", "store", "list", "--json"], ["-v", "store", "list", "--json"]),
        (["create", "x@y", "--", "-v"], ["create", "x@y", "--", "-v"]),
        (["--version"], ["--version"]),
    ],
)
def test_root_options_and_json_are_moved_where_the_parser_wants_them(
    typed: list[str], parsed: list[str]
) -> None:
    assert normalize(typed, GROUPS) == parsed


def test_flags_work_before_or_after_the_command(database_url: str) -> None:
    env = unconfigured_env(SYNCCTL_DATABASE_URL=database_url)
    after = syncctl("db", "status", "-v", "--log-format", "json", env=env)
    assert json.loads(after.stderr.splitlines()[0])["level"] == "debug"
    before = syncctl("--json", "db", "status", env=env)
    assert json.loads(before.stdout)["pending"] == []
    assert syncctl("store", "list", "--json", "-v", env=env).returncode == 0


def test_help_lists_flags_without_a_value_type() -> None:
    text = syncctl("--help", env=dict(os.environ)).stdout
    assert re.search(r"-v, --verbose\s+Debug logging", text)
    assert "<bool>" not in text
    run_help = syncctl("run", "--help", env=dict(os.environ)).stdout
    assert "--drain" in run_help
    assert "<bool>" not in run_help


@pytest.mark.slow
def test_db_stop_stops_the_embedded_postgresql_and_the_next_command_starts_it(
    tmp_path: Path,
) -> None:
    env = unconfigured_env(SYNCCTL_HOME=str(tmp_path))
    syncctl("db", "status", env=env)
    pid = int((tmp_path / "pgdata" / "postmaster.pid").read_text().split()[0])

    stopped = syncctl("db", "stop", env=env)

    assert f"pid {pid}" in stopped.stderr
    assert not process_running(pid)
    again = syncctl("db", "stop", env=env)
    assert "not running; nothing to stop" in again.stderr
    assert syncctl("db", "status", env=env).returncode == 0  # started again on demand
    syncctl("db", "stop", env=env)


def stuck_job(database_url: str, *, lease_expired: bool) -> tuple[Any, Any]:
    """A job whose first chunk is held by a worker that went quiet 10 minutes ago."""
    with connect(DatabaseTarget(database_url, "test")) as conn:
        jobs.add_store(conn, name="ann", email="ann@example.com")
        job = jobs.create_job(
            conn, CountOnly(counts={"ann@example.com": 2500}), store_ref="ann@example.com"
        )
        chunk = queue.claim_chunk(conn, worker_id="w1", lease=timedelta(minutes=1))
        assert chunk is not None
        conn.execute(
            "UPDATE chunked_sync_jobs SET started_at = now() - interval '10 minutes',"
            " lease_expires_at = now() + CASE WHEN %s THEN interval '-1 minute'"
            " ELSE interval '1 minute' END WHERE id = %s",
            [lease_expired, chunk.id],
        )
    return job.job_id, chunk.id


def test_an_operators_reset_is_recorded_as_one_not_as_reaped(database_url: str, db: Db) -> None:
    _, chunk_id = stuck_job(database_url, lease_expired=False)
    env = unconfigured_env(SYNCCTL_DATABASE_URL=database_url)

    result = syncctl("reset-stuck", "--yes", env=env)

    assert "Reset 1 chunk." in result.stderr
    attempt = db.execute(
        "SELECT outcome, error FROM chunk_attempts WHERE chunk_id = %s", [chunk_id]
    ).fetchone()
    assert attempt is not None
    assert attempt["outcome"] == "reset"
    assert attempt["error"].startswith("reset by operator")


def test_a_reaped_chunk_says_when_its_lease_expired_as_syncctl_writes_times(
    database_url: str, db: Db
) -> None:
    _, chunk_id = stuck_job(database_url, lease_expired=True)
    syncctl("reap", env=unconfigured_env(SYNCCTL_DATABASE_URL=database_url))
    row = db.execute(
        "SELECT c.last_error, a.outcome FROM chunked_sync_jobs c"
        " JOIN chunk_attempts a ON a.chunk_id = c.id WHERE c.id = %s",
        [chunk_id],
    ).fetchone()
    assert row is not None
    assert row["outcome"] == "reaped"
    assert re.fullmatch(
        r"lease expired at \d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ: worker w1 stopped heartbeating",
        row["last_error"],
    ), row["last_error"]


@pytest.mark.parametrize(
    ("lease_expired", "hint"),
    [(True, "reap` puts them back"), (False, "reset-stuck --older-than 5m` puts them back")],
)
def test_list_stuck_check_suggests_reap_for_chunks_past_their_lease(
    database_url: str, lease_expired: bool, hint: str
) -> None:
    stuck_job(database_url, lease_expired=lease_expired)
    env = unconfigured_env(SYNCCTL_DATABASE_URL=database_url)

    result = syncctl("list-stuck", "--check", env=env, check=False)

    assert result.returncode == 1
    assert "1 chunk stuck;" in result.stderr
    assert hint in result.stderr


def test_reset_stuck_asks_about_one_chunk_as_a_person_would(database_url: str) -> None:
    stuck_job(database_url, lease_expired=False)
    env = unconfigured_env(SYNCCTL_DATABASE_URL=database_url)
    # No terminal to ask on: it refuses, after showing the question it would ask.
    asked = subprocess.run(
        [sys.executable, "-m", "syncctl", "reset-stuck"],
        env=env,
        input="n\n",
        capture_output=True,
        text=True,
        check=False,
    )
    assert "chunk(s)" not in asked.stderr
    reset = syncctl("reset-stuck", "--yes", env=env)
    assert "Reset 1 chunk." in reset.stderr


def test_a_retried_chunk_numbers_its_attempts_on(database_url: str, db: Db) -> None:
    with connect(DatabaseTarget(database_url, "test")) as conn:
        jobs.add_store(conn, name="ann", email="ann@example.com")
        job = jobs.create_job(
            conn,
            CountOnly(counts={"ann@example.com": 500}),
            store_ref="ann@example.com",
            max_attempts=1,
        )
        chunk = queue.claim_chunk(conn, worker_id="w1", lease=timedelta(minutes=1))
        assert chunk is not None
        queue.finish_chunk(conn, chunk, "error", error="boom", retry_base=timedelta(0))
    env = unconfigured_env(SYNCCTL_DATABASE_URL=database_url)
    syncctl("retry", str(job.job_id), env=env)
    with connect(DatabaseTarget(database_url, "test")) as conn:
        again = queue.claim_chunk(conn, worker_id="w2", lease=timedelta(minutes=1))
        assert again is not None
        queue.finish_chunk(conn, again, "completed", retry_base=timedelta(0))
    report = json.loads(syncctl("status", str(job.job_id), "--json", env=env).stdout)
    attempts = [(a["attempt"], a["outcome"]) for a in report["chunks"][0]["history"]]
    assert attempts == [(1, "failed"), (2, "completed")]


def test_a_lease_below_the_recommended_one_warns(database_url: str) -> None:
    env = unconfigured_env(SYNCCTL_DATABASE_URL=database_url, SYNCCTL_GRAPH_TOKEN="t")  # noqa: S106
    short = syncctl("run", "--drain", "--lease", "10s", env=env)
    assert "--lease 10s is below the 15s" in short.stderr
    usual = syncctl("run", "--drain", "--lease", "60s", env=env)
    assert "is below the" not in usual.stderr


def test_hints_name_syncctl_as_this_shell_can_run_it(tmp_path: Path) -> None:
    # Not on PATH: the hint names the path it was started by.
    script = Path(sys.executable).with_name("syncctl")
    if not script.exists():
        pytest.skip("no syncctl script beside this interpreter")
    probe = "from syncctl.invocation import command_name; print(command_name())"
    env = {"PATH": "/usr/bin:/bin"}
    by_path = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.argv = ['{script}']; {probe}"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert by_path.stdout.strip() == str(script)
    on_path = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.argv = ['{script}']; {probe}"],
        env={"PATH": f"{script.parent}:/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert on_path.stdout.strip() == "syncctl"


def test_success_rate_has_one_definition_in_its_table_and_its_summary(
    database_url: str,
) -> None:
    with connect(DatabaseTarget(database_url, "test")) as conn:
        jobs.add_store(conn, name="ann", email="ann@example.com")
        job = jobs.create_job(
            conn,
            CountOnly(counts={"ann@example.com": 5000}),
            store_ref="ann@example.com",
            chunk_size=1000,
            max_attempts=1,
        )
        for outcome in ("completed", "completed", "completed", "permanent"):
            chunk = queue.claim_chunk(conn, worker_id="w", lease=timedelta(minutes=1))
            assert chunk is not None
            queue.finish_chunk(conn, chunk, outcome, error="no", retry_base=timedelta(0))
    env = unconfigured_env(SYNCCTL_DATABASE_URL=database_url)
    syncctl("cancel", str(job.job_id), env=env)  # the fifth chunk: cancelled

    result = syncctl("success-rate", env=env)

    completed_row = next(
        line for line in result.stdout.splitlines() if line.startswith("completed")
    )
    assert completed_row.split()[-1] == "75.00"
    assert "Success rate: 75.00% of the 4 finished chunks" in result.stderr
    assert "1 other chunk (pending, processing or cancelled) is not counted" in result.stderr
