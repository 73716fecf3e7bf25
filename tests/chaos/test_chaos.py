"""Chaos: seeded runs of real worker processes against real PostgreSQL (through
a proxy that cuts and blackholes connections) and the local Graph server
(throttling, errors, hangs, expiring links and tokens, a malformed page, mail
deleted and arriving), with workers SIGKILLed and replaced as they go. CI runs
one seed on the shared server and one on an embedded PostgreSQL the test
crashes mid-run; `nox -s soak -- --minutes N --seed S` runs seeds back to back
for N minutes, each crashing the soak's own embedded PostgreSQL once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from chaos_harness import ChaosPlan, ChaosReport, run_chaos
from psycopg import sql
from psycopg.rows import dict_row

from commandline import environment, syncctl
from conftest import PgServer
from helpers import wait_for
from syncctl.config import DatabaseTarget
from syncctl.db import connection
from syncctl.fakegraph import FakeGraphServer
from syncctl.migrate import migrate

SOAK_SEED = os.environ.get("SYNCCTL_SOAK_SEED")
SOAK_MINUTES = os.environ.get("SYNCCTL_SOAK_MINUTES")


@pytest.mark.slow
def test_chaos_run_loses_and_repeats_nothing(database_url: str, pg_server: PgServer) -> None:
    report = run_chaos(
        ChaosPlan(seed=20261202, deadline=240),
        database_url=database_url,
        pg_host=pg_server.host,
        pg_port=pg_server.port,
    )
    print(report.line())
    assert report.problems == [], "\n".join(report.problems)
    assert report.kills >= 3
    assert report.connections_cut > 0
    assert report.throttled > 0
    assert report.server_errors > 0
    assert report.tokens_expired > 0
    assert report.malformed_pages > 0


@pytest.mark.skipif(not SOAK_MINUTES, reason="a soak runs from `nox -s soak`")
def test_soak(tmp_path: Path) -> None:
    """Seeds from SYNCCTL_SOAK_SEED on, one after another, each on a fresh
    database of an embedded PostgreSQL the soak owns and crashes once in every
    run, until SYNCCTL_SOAK_MINUTES have passed; every run must hold."""
    seed = int(SOAK_SEED or "1")
    until = time.monotonic() + 60 * float(SOAK_MINUTES or "0")
    reports = []
    with owned_postgres(tmp_path) as (owned, crash):
        while time.monotonic() < until:
            url = _fresh_migrated_database(owned, f"soak_{seed}")
            report = run_chaos(
                ChaosPlan(seed=seed, deadline=600, incremental_rounds=2),
                database_url=url,
                pg_host=owned.host,
                pg_port=owned.port,
                crash_database=crash,
            )
            print(report.line(), flush=True)
            reports.append(report)
            assert report.problems == [], "\n".join([report.line(), *report.problems])
            seed += 1
    print(soak_summary(reports), flush=True)


def soak_summary(reports: list[ChaosReport]) -> str:
    def total(field: str) -> int:
        return sum(int(getattr(r, field)) for r in reports)

    return (
        f"soak: {len(reports)} runs, {sum(r.seconds for r in reports) / 60:.1f} minutes, "
        f"{total('kills')} workers killed, {total('connections_cut')} connections cut, "
        f"{total('blackholes')} blackholes, {total('throttled')} 429s, "
        f"{total('server_errors')} 5xx, {total('hung')} hung requests, "
        f"{total('tokens_expired')} tokens expired, {total('malformed_pages')} malformed pages, "
        f"{total('database_crashes')} database crashes, "
        f"{total('links_expired')} link expiries, {total('deleted')} deleted and "
        f"{total('arrived')} arrived mid-run, {total('messages_checked')} messages checked, "
        f"most overdue lease {max((r.most_overdue for r in reports), default=0):.1f}s, "
        "0 problems"
    )


@pytest.mark.slow
def test_sigterm_while_graph_throttles_exits_within_seconds_and_keeps_the_attempt(
    database_url: str,
) -> None:
    email = "throttled@contoso.test"
    with FakeGraphServer({email: 3000}, retry_after=5) as server:
        env = environment(database_url, server)
        syncctl("store", "add", "--name", "t", "--email", email, env=env)
        syncctl("create", email, env=env)
        server.throttle_rate = 1.0
        worker = subprocess.Popen(
            [sys.executable, "-m", "syncctl", "run", "--lease", "30s"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            wait_for(
                lambda: sum(r.status == 429 for r in server.requests) >= 2,
                what="the worker waiting out Retry-After",
            )
            sent = time.monotonic()
            worker.send_signal(signal.SIGTERM)
            code = worker.wait(30)
            took = time.monotonic() - sent
        finally:
            if worker.poll() is None:
                worker.kill()
            worker.communicate()

    assert code == 0
    assert took < 10, f"exited {took:.1f}s after SIGTERM"
    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        chunks = conn.execute("SELECT status, attempts FROM chunked_sync_jobs").fetchall()
        outcomes = conn.execute("SELECT outcome FROM chunk_attempts").fetchall()
    assert {(c["status"], c["attempts"]) for c in chunks} == {("pending", 0)}
    assert {o["outcome"] for o in outcomes} <= {"released"}


@pytest.mark.slow
def test_chaos_run_survives_a_database_crash(tmp_path: Path) -> None:
    """The same chaos, against an embedded PostgreSQL this test owns, which is
    also crashed mid-run (an immediate shutdown, as `pg_ctl stop -m immediate`:
    no checkpoint, crash recovery at the next start) and started again.
    Asynchronous commits of claims and finishes may be lost; nothing else may."""
    with owned_postgres(tmp_path) as (owned, crash):
        report = run_chaos(
            ChaosPlan(seed=20261203, deadline=240),
            database_url=_fresh_migrated_database(owned, "chaos"),
            pg_host=owned.host,
            pg_port=owned.port,
            crash_database=crash,
        )
    print(report.line())
    assert report.problems == [], "\n".join(report.problems)
    assert report.database_crashes == 1


@contextmanager
def owned_postgres(path: Path) -> Iterator[tuple[PgServer, Callable[[], None]]]:
    """An embedded PostgreSQL in path, never the shared server, and a function
    that crashes it (the postmaster's immediate shutdown) and starts it again."""
    import pgserver

    (path / "pg").mkdir()
    server = pgserver.get_server(path / "pg" / "data", cleanup_mode="stop")

    def crash() -> None:
        pid = server.get_pid()
        assert pid is not None
        os.kill(pid, signal.SIGQUIT)
        wait_for(lambda: not _running(pid), what="PostgreSQL to stop")
        server.ensure_postgres_running()

    try:
        host = str(psycopg.conninfo.conninfo_to_dict(server.get_uri())["host"])
        yield PgServer(host, 5432, "postgres"), crash
    finally:
        server.cleanup()


def _fresh_migrated_database(server: PgServer, name: str) -> str:
    with psycopg.connect(server.url("postgres"), autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    with connection(DatabaseTarget(server.url(name), "test")) as conn:
        migrate(conn)
    return server.url(name)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
