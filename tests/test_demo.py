"""`syncctl demo`: its database choice and reset against real PostgreSQL, the sample
server's per-mailbox faults over real HTTP, and the whole demo run as a new user runs it."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, LiteralString
from uuid import UUID

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row

import syncctl.embedded
from fakes import CountOnly
from helpers import stop_embedded_server, unconfigured_env
from syncctl import demo, jobs, queue
from syncctl.config import EMBEDDED
from syncctl.db import Connection
from syncctl.errors import BadInput
from syncctl.fakegraph import FakeGraphServer
from syncctl.ingest import write_page
from syncctl.mailsource import Message

LEASE = timedelta(seconds=60)
DEMO_EMAIL = f"archive{demo.DEMO_SUFFIX}"
OTHER_EMAIL = "ann@example.com"


def store_with_mail(conn: Connection, email: str) -> UUID:
    """A store with a job whose first chunk wrote two messages; returns the job id."""
    jobs.add_store(conn, name=email.split("@", maxsplit=1)[0], email=email)
    job_id = jobs.create_job(conn, CountOnly(1000), store_ref=email, chunk_size=1000).job_id
    chunk = queue.claim_chunk(conn, worker_id="w1", lease=LEASE)
    assert chunk is not None
    assert chunk.parent_sync_job_id == job_id
    received = datetime(2024, 1, 1, tzinfo=UTC)
    write_page(
        conn,
        chunk,
        [Message(f"{email}-{i}", received) for i in range(2)],
        checkpoint={"read": 2},
        lease=LEASE,
    )
    queue.finish_chunk(conn, chunk, "completed")
    return job_id


TABLES: dict[str, LiteralString] = {
    "stores": "SELECT id, email FROM stores ORDER BY id",
    "jobs": "SELECT id, store_id, status FROM sync_queue ORDER BY id",
    "chunks": "SELECT id, parent_sync_job_id, status FROM chunked_sync_jobs ORDER BY id",
    "attempts": "SELECT id, chunk_id, outcome FROM chunk_attempts ORDER BY id",
    "emails": "SELECT id, store_id, provider_message_id FROM emails ORDER BY id",
}


def rows(conn: Connection) -> dict[str, list[dict[str, Any]]]:
    return {name: conn.execute(sql).fetchall() for name, sql in TABLES.items()}


# the database


def test_reset_deletes_the_demo_stores_with_their_jobs_and_mail_and_nothing_else(
    conn: Connection,
) -> None:
    store_with_mail(conn, OTHER_EMAIL)
    before = rows(conn)
    store_with_mail(conn, DEMO_EMAIL.upper())  # matched whatever its case

    removed = demo.reset_demo(conn)

    assert removed == demo.DemoReset(stores=1, jobs=1, emails=2)
    assert rows(conn) == before


def test_demo_refuses_a_database_where_other_jobs_are_active(conn: Connection) -> None:
    jobs.add_store(conn, name="ann", email=OTHER_EMAIL)
    jobs.create_job(conn, CountOnly(1000), store_ref=OTHER_EMAIL)

    with pytest.raises(BadInput, match=f"not the demo's .*{OTHER_EMAIL}.*--database-url"):
        demo.check_no_other_work(conn)


def test_demo_accepts_a_database_where_only_its_own_jobs_are_active(conn: Connection) -> None:
    jobs.add_store(conn, name="archive", email=DEMO_EMAIL)
    jobs.create_job(conn, CountOnly(1000), store_ref=DEMO_EMAIL)

    demo.check_no_other_work(conn)


def test_demo_uses_the_embedded_database_even_when_one_is_configured(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SYNCCTL_DATABASE_URL", "postgresql://app:secret@db.example.com/prod")
    monkeypatch.setenv("SYNCCTL_HOME", str(tmp_path))
    started: list[Path] = []

    def embedded(home: Path) -> str:
        started.append(home)
        return "postgresql://postgres:@/postgres?host=/tmp/embedded"

    monkeypatch.setattr(syncctl.embedded, "embedded_database_url", embedded)

    target = demo.demo_database(None)

    assert (target.source, target.url) == (EMBEDDED, embedded(tmp_path))
    assert started[0] == tmp_path
    described = demo.describe_database(target)
    assert str(tmp_path / "pgdata") in described
    assert "SYNCCTL_DATABASE_URL is set" in described
    assert "secret" not in described


def test_demo_uses_the_database_given_with_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNCCTL_DATABASE_URL", "postgresql://app@db.example.com/prod")

    target = demo.demo_database("postgresql://demo:pw@localhost/demo")

    assert (target.source, target.url) == ("--database-url", "postgresql://demo:pw@localhost/demo")
    assert "pw" not in demo.describe_database(target)


# the sample server


def get(server: FakeGraphServer, mailbox: str) -> httpx.Response:
    return httpx.get(
        f"{server.url}/users/{mailbox}/messages/$count",
        headers={"Authorization": f"Bearer {server.token}"},
    )


def test_one_mailbox_can_throttle_while_the_others_do_not() -> None:
    with FakeGraphServer({"calm@example.com": 10}) as server:
        server.add_mailbox("busy@example.com", 10, throttle_rate=1.0, retry_after=0.25)

        throttled = [get(server, "busy@example.com") for _ in range(5)]
        calm = [get(server, "calm@example.com") for _ in range(5)]

    assert {(r.status_code, r.headers["Retry-After"]) for r in throttled} == {(429, "0.25")}
    assert {(r.status_code, r.text) for r in calm} == {(200, "10")}


def test_one_mailbox_can_be_slow_while_the_others_are_not() -> None:
    with FakeGraphServer({"quick@example.com": 10}) as server:
        server.add_mailbox("slow@example.com", 10, latency=0.3)
        get(server, "slow@example.com")
        get(server, "quick@example.com")

    by_mailbox = {r.mailbox: r.answered_at - r.received_at for r in server.requests}
    assert by_mailbox["slow@example.com"] >= 0.3 > by_mailbox["quick@example.com"]


def test_a_removed_mailbox_answers_404_as_a_deleted_user_does() -> None:
    with FakeGraphServer({"gone@example.com": 10}) as server:
        assert get(server, "gone@example.com").status_code == 200
        server.remove_mailbox("gone@example.com")

        answer = get(server, "gone@example.com")

    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "ErrorInvalidUser"


# the whole demo, as a new user runs it


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """An empty SYNCCTL_HOME; the embedded PostgreSQL the demo starts there is stopped after."""
    home = tmp_path / "home"
    home.mkdir()
    yield home
    stop_embedded_server(home / "pgdata")


def run_demo(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m syncctl demo` with nothing configured but SYNCCTL_HOME."""
    env = unconfigured_env(SYNCCTL_HOME=str(home))
    return subprocess.run(
        [sys.executable, "-m", "syncctl", "demo", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def embedded_db(home: Path) -> psycopg.Connection[dict[str, Any]]:
    url = syncctl.embedded.embedded_database_url(home)
    return psycopg.connect(url, autocommit=True, row_factory=dict_row)


def demo_jobs(db: psycopg.Connection[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """{email: its jobs, oldest first} of every sample store."""
    found: dict[str, list[dict[str, Any]]] = {}
    for row in db.execute(
        "SELECT s.email, q.id, q.status, q.sync_type FROM sync_queue q"
        " JOIN stores s ON s.id = q.store_id ORDER BY q.created_at, q.id"
    ).fetchall():
        found.setdefault(row["email"], []).append(row)
    return found


def stored(db: psycopg.Connection[dict[str, Any]], email: str) -> tuple[int, int]:
    """(rows, distinct message ids) stored for the store."""
    row = db.execute(
        "SELECT count(*) AS n, count(DISTINCT e.provider_message_id) AS ids FROM emails e"
        " JOIN stores s ON s.id = e.store_id WHERE s.email = %s",
        [email],
    ).fetchone()
    assert row is not None
    return row["n"], row["ids"]


def outcomes_of_recovered_chunks(db: psycopg.Connection[dict[str, Any]], job_id: UUID) -> Any:
    """For each chunk of the job that was reaped: its attempts' outcomes, in order."""
    return [
        row["outcomes"]
        for row in db.execute(
            "SELECT array_agg(a.outcome ORDER BY a.id) AS outcomes FROM chunk_attempts a"
            " JOIN chunked_sync_jobs c ON c.id = a.chunk_id"
            " WHERE c.parent_sync_job_id = %s GROUP BY c.id"
            " HAVING bool_or(a.outcome = 'reaped')",
            [job_id],
        ).fetchall()
    ]


def check_demo_result(result: subprocess.CompletedProcess[str], home: Path, run: int) -> None:
    """Exit 0, the story and the reports printed, and the database as planned."""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    err = result.stderr
    assert "Database: the embedded PostgreSQL in" in err
    assert "Killed worker demo-" in err
    assert "lease expired, reaped; worker demo-" in err
    assert f"of {demo.VICTIM.email}: completed by worker demo-" in err
    for command in ("syncctl status", "syncctl success-rate", "syncctl problem-stores"):
        # Named as this shell can run it: `syncctl`, or the path it was started by.
        assert re.search(
            rf"^\$ (syncctl|\S+ -m syncctl){command.removeprefix('syncctl')}\b", err, re.M
        )
    assert "The demo went as planned." in err
    assert str(home) in err.split("The demo went as planned.")[1]
    # The reports themselves, on stdout, as the commands print them.
    out = result.stdout
    assert f"{demo.VICTIM.email} job " in out  # the progress lines
    # The killed worker's chunk: its attempts.
    assert "reaped" in out
    assert "lease expired" in out
    assert "status     count    %" in out  # success-rate
    assert "Mailbox former@demo.syncctl.invalid was not found in Graph (404" in out

    assert f"Keeping {demo.KEPT_CURRENT.email} current" in err
    assert "Round 2: 5 requests (one per folder)" in err

    with embedded_db(home) as db:
        by_store = demo_jobs(db)
        for mailbox in demo.SAMPLE_MAILBOXES:
            full = [job for job in by_store[mailbox.email] if job["sync_type"] == "demo"]
            assert len(full) == run, mailbox.email
            latest = full[-1]
            if mailbox.deleted:
                assert latest["status"] == "failed"
                assert stored(db, mailbox.email) == (0, 0)
            elif mailbox != demo.KEPT_CURRENT:
                assert latest["status"] == "completed", mailbox.email
                assert stored(db, mailbox.email) == (mailbox.messages, mailbox.messages)
        # Kept current: two incremental rounds a run; the second mirrors 5 new and 2 deleted.
        rounds = [j for j in by_store[demo.KEPT_CURRENT.email] if j["sync_type"] == "incremental"]
        assert [j["status"] for j in rounds] == ["completed"] * 2 * run
        rows, ids = stored(db, demo.KEPT_CURRENT.email)
        # The seeded server makes the same changes every run: the same 5 messages.
        assert rows == ids == demo.KEPT_CURRENT.messages + 5
        marked = db.execute(
            "SELECT count(*) AS n FROM emails e JOIN stores s ON s.id = e.store_id"
            " WHERE s.email = %s AND e.deleted_at IS NOT NULL",
            [demo.KEPT_CURRENT.email],
        ).fetchone()
        assert marked is not None
        assert marked["n"] == 2
        victim_job = by_store[demo.VICTIM.email][-1]["id"]
        recovered = outcomes_of_recovered_chunks(db, victim_job)
        assert ["reaped", "completed"] in recovered


@pytest.mark.slow
def test_demo_runs_end_to_end_on_a_fresh_machine_and_again_without_reset(home: Path) -> None:
    first = run_demo(home, "--reset")
    check_demo_result(first, home, run=1)

    again = run_demo(home)
    check_demo_result(again, home, run=2)
