"""An operator with thousands of mailboxes at an 80-column terminal: ids stay on one line
(whole, or cut short as git shows commits), a job id's unique prefix names the job,
`status` and `store list` summarise and page instead of printing every row, a failed
job says why, and a job with no start says it starts at the first message.

The rows are inserted by SQL (fast); every command runs as the installed `syncctl`."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from typing import Any
from uuid import UUID

import psycopg
import pytest

from commandline import syncctl
from helpers import unconfigured_env

Db = psycopg.Connection[dict[str, Any]]

STORES = 3000
# Store i (1..3000) was added, and its one job created, 3000 - i minutes and 30 seconds ago;
# the job is failed when i ends in 0 (with a failed chunk saying why, the job itself saying
# nothing), processing in 1 (stuck when i ends in 01: 30 jobs), pending in 2, cancelled in
# 3, completed otherwise.
SEED = f"""
INSERT INTO stores (name, email, created_at)
SELECT 'Store ' || i, 'store-' || lpad(i::text, 5, '0') || '@scale.test',
       now() - make_interval(mins => {STORES} - i) - interval '30 seconds'
  FROM generate_series(1, {STORES}) AS i;

INSERT INTO sync_queue (store_id, status, sync_type, created_at, estimated_emails)
SELECT s.id,
       CASE mod(n.i, 10) WHEN 0 THEN 'failed' WHEN 1 THEN 'processing' WHEN 2 THEN 'pending'
                         WHEN 3 THEN 'cancelled' ELSE 'completed' END,
       'full', s.created_at, 100
  FROM stores s
 CROSS JOIN LATERAL (SELECT substring(s.email FROM 7 FOR 5)::integer AS i) n;

INSERT INTO chunked_sync_jobs (parent_sync_job_id, store_id, chunk_index, total_chunks,
                               start_offset, end_offset, estimated_emails, status, attempts,
                               worker_id, started_at, completed_at, lease_expires_at, last_error)
SELECT q.id, q.store_id, 1, 1, 0, 100, 100,
       CASE WHEN q.status = 'failed' THEN 'failed' ELSE 'processing' END, 1, 'worker-1',
       CASE WHEN q.status = 'failed' THEN q.created_at
            WHEN n.stuck THEN now() - interval '1 hour' ELSE now() END,
       CASE WHEN q.status = 'failed' THEN q.created_at + interval '1 minute' END,
       CASE WHEN q.status = 'failed' THEN NULL
            WHEN n.stuck THEN now() - interval '50 minutes' ELSE now() + interval '1 hour' END,
       CASE WHEN q.status = 'failed' THEN 'Graph answered 404: ' || s.email || ' not found' END
  FROM sync_queue q
  JOIN stores s ON s.id = q.store_id
 CROSS JOIN LATERAL (
       SELECT mod(substring(s.email FROM 7 FOR 5)::integer, 100) = 1 AS stuck) n
 WHERE q.status IN ('failed', 'processing');
"""
BY_STATE = {"pending": 300, "processing": 300, "completed": 1800, "failed": 300, "cancelled": 300}
STUCK_JOBS = 30


@pytest.fixture
def env(database_url: str) -> dict[str, str]:
    return unconfigured_env(SYNCCTL_DATABASE_URL=database_url, TERM="xterm-256color")


@pytest.fixture
def seeded(db: Db) -> None:
    db.execute(SEED)


def newest_jobs(db: Db, count: int, where: str = "true") -> list[str]:
    rows = db.execute(
        f"SELECT id FROM sync_queue WHERE {where} ORDER BY created_at DESC, id DESC LIMIT {count}"
    ).fetchall()
    return [str(row["id"]) for row in rows]


def job_of(db: Db, email: str) -> UUID:
    row = db.execute(
        "SELECT q.id FROM sync_queue q JOIN stores s ON s.id = q.store_id WHERE s.email = %s",
        (email,),
    ).fetchone()
    assert row is not None
    job_id: UUID = row["id"]
    return job_id


def document(*args: str, env: dict[str, str]) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(syncctl(*args, "--json", env=env).stdout)
    return parsed


def refused(*args: str, env: dict[str, str]) -> str:
    """The one line a command refused as bad input (exit 2, nothing on stdout) printed."""
    result = syncctl(*args, env=env, check=False)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("syncctl: ")
    return lines[0]


def on_a_terminal(args: list[str], env: dict[str, str], *, columns: int) -> list[str]:
    """The lines `syncctl ARGS` draws on a terminal `columns` wide (a pseudo-terminal),
    without colours and styles."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "syncctl", *args],
        stdout=follower,
        stderr=subprocess.DEVNULL,
        env={**env, "COLUMNS": str(columns)},
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # the terminal closed: the command has exited
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    assert process.wait(timeout=120) == 0
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode())
    return text.replace("\r", "").splitlines()


def on_one_line(job_id: str, lines: list[str]) -> str:
    """The token (a whole id, or its first hex digits) showing job_id on one line."""
    hex_digits = UUID(job_id).hex
    for line in lines:
        tokens: list[str] = re.findall(r"[0-9a-f][0-9a-f-]{7,35}", line)
        for token in tokens:
            if token == job_id or (len(token) >= 8 and hex_digits.startswith(token)):
                return token
    raise AssertionError(f"{job_id} is not on one line, whole or as its first 8 hex digits")


# 1. Ids at 80 columns


@pytest.mark.usefixtures("seeded")
def test_at_80_columns_every_id_stays_on_one_line_and_a_short_one_names_its_job(
    db: Db, env: dict[str, str]
) -> None:
    lines = on_a_terminal(["status"], env, columns=80)

    assert max(len(line) for line in lines) <= 80
    newest = newest_jobs(db, 50)
    stuck = newest_jobs(
        db,
        10,
        "id IN (SELECT parent_sync_job_id FROM chunked_sync_jobs WHERE worker_id IS NOT"
        " NULL AND lease_expires_at < now())",
    )
    shown = {job_id: on_one_line(job_id, lines) for job_id in newest + stuck}
    assert all(len(token) < 36 for token in shown.values())  # cut short: 80 columns are few
    assert any("(short)" in line for line in lines)  # the headers say so
    assert any("Ids cut short" in line for line in lines)

    # What the operator copies from the table names the job.
    copied = shown[newest[0]]
    assert document("status", copied, env=env)["job"]["job_id"] == newest[0]

    stores = on_a_terminal(["store", "list"], env, columns=80)
    assert max(len(line) for line in stores) <= 80
    rows = db.execute(
        "SELECT s.id, q.id AS active FROM stores s LEFT JOIN sync_queue q ON q.store_id = s.id"
        " AND q.status IN ('pending', 'processing') ORDER BY s.created_at DESC LIMIT 50"
    ).fetchall()
    for row in rows:
        on_one_line(str(row["id"]), stores)
        if row["active"]:
            on_one_line(str(row["active"]), stores)


@pytest.mark.usefixtures("seeded")
def test_a_terminal_wide_enough_shows_ids_whole(db: Db, env: dict[str, str]) -> None:
    lines = on_a_terminal(["status", "--limit", "5"], env, columns=200)

    for job_id in newest_jobs(db, 5):
        assert on_one_line(job_id, lines) == job_id
    assert not any("(short)" in line for line in lines)


# 2. A unique prefix of a job id


A = UUID("abcd1234-0000-4000-8000-00000000000a")
B = UUID("abcd5678-0000-4000-8000-00000000000b")
C = UUID("12345678-9abc-4def-8000-00000000000c")


@pytest.fixture
def three_jobs(db: Db) -> None:
    """A: failed (its chunk failed), B: completed, C: pending, of a@, b@ and c@."""
    for job_id, letter, status in ((A, "a", "failed"), (B, "b", "completed"), (C, "c", "pending")):
        db.execute(
            "WITH s AS (INSERT INTO stores (name, email) VALUES (%(l)s, %(l)s || '@ids.test')"
            " RETURNING id)"
            " INSERT INTO sync_queue (id, store_id, status, created_at)"
            " SELECT %(job)s, id, %(status)s, now() - interval '1 hour' FROM s",
            {"l": letter, "job": job_id, "status": status},
        )
        db.execute(
            "INSERT INTO chunked_sync_jobs (parent_sync_job_id, store_id, chunk_index,"
            " total_chunks, start_offset, end_offset, estimated_emails, status, attempts)"
            " SELECT id, store_id, 1, 1, 0, 10, 10, %(status)s, 1"
            " FROM sync_queue WHERE id = %(job)s",
            {"job": job_id, "status": status},
        )


def job_status(db: Db, job_id: UUID) -> str:
    row = db.execute("SELECT status FROM sync_queue WHERE id = %s", (job_id,)).fetchone()
    assert row is not None
    status: str = row["status"]
    return status


@pytest.mark.usefixtures("three_jobs")
def test_a_unique_prefix_names_the_job_in_status_retry_and_cancel(
    db: Db, env: dict[str, str]
) -> None:
    for typed, job_id in [
        ("abcd1", A),
        ("ABCD1234-0", A),  # any case; dashes where the id has them
        ("abcd5678", B),
        ("123456789abc", C),  # or none
        ("12345678-9abc-4", C),
        (str(C), C),
    ]:
        assert document("status", typed, env=env)["job"]["job_id"] == str(job_id), typed

    watched = syncctl("status", "abcd5", "--watch", env=env)  # B is finished: one frame
    assert "b@ids.test" in watched.stdout

    cancelled = syncctl("cancel", "1234", env=env)
    assert str(C) in cancelled.stderr
    assert job_status(db, C) == "cancelled"

    retried = syncctl("retry", "abcd12", env=env)
    assert str(A) in retried.stderr
    assert job_status(db, A) == "pending"


@pytest.mark.usefixtures("three_jobs")
def test_an_ambiguous_or_unknown_prefix_is_bad_input_that_changes_nothing(
    db: Db, env: dict[str, str]
) -> None:
    for command in ("status", "retry", "cancel"):
        line = refused(command, "abcd", env=env)
        assert "ambiguous" in line
        for job_id, email, status in ((A, "a@ids.test", "failed"), (B, "b@ids.test", "completed")):
            assert f"{job_id} ({email}, {status}, created " in line
        assert str(C) not in line
    assert (job_status(db, A), job_status(db, B)) == ("failed", "completed")

    assert "No job id starts with ffff" in refused("cancel", "ffff", env=env)
    assert "too short" in refused("retry", "abc", env=env)
    assert "is not a job id" in refused("status", "abcd-1234", env=env)  # a dash out of place
    assert "is not a job id" in refused("status", "abcdefgh", env=env)
    assert job_status(db, C) == "pending"


def test_an_ambiguous_prefix_lists_ten_candidates_and_counts_the_rest(
    db: Db, env: dict[str, str]
) -> None:
    for i in range(12):
        db.execute(
            "WITH s AS (INSERT INTO stores (name, email) VALUES ('e', %(email)s) RETURNING id)"
            " INSERT INTO sync_queue (id, store_id, status) SELECT %(job)s, id, 'completed' FROM s",
            {"email": f"e{i}@ids.test", "job": UUID(f"eeee0000-0000-4000-8000-{i:012d}")},
        )

    line = refused("status", "eeee", env=env)

    assert "12 jobs start with it" in line
    assert len(re.findall(r"eeee0000-0000-4000-8000-\d{12} \(", line)) == 10
    assert "and 2 more" in line


# 3. Thousands of mailboxes


@pytest.mark.usefixtures("seeded")
def test_status_summarises_thousands_of_jobs_then_shows_the_newest_fifty(
    db: Db, env: dict[str, str]
) -> None:
    result = syncctl("status", env=env)

    lines = result.stdout.splitlines()
    counts = ", ".join(f"{n} {state}" for state, n in BY_STATE.items())
    assert lines[0] == f"Jobs: {counts} ({STORES} in all)."
    assert any(
        line.startswith(f"Needs attention: 300 failed, {STUCK_JOBS} with stuck chunks")
        for line in lines
    )
    # 10 jobs that need attention, then the 50 newest: not 3,000 lines.
    assert sum("@scale.test" in line for line in lines) == 60
    assert len(lines) < 80
    assert "showing 50 of 3000; --limit to see more" in result.stderr
    assert f"showing 10 of {300 + STUCK_JOBS} that need attention" in result.stderr

    status = document("status", env=env)
    assert {"jobs", "stores_kept_current", "summary", "total", "limit"} <= set(status)
    assert status["summary"]["by_state"] == BY_STATE
    assert status["summary"]["total"] == STORES
    assert status["summary"]["needs_attention_total"] == 300 + STUCK_JOBS
    assert status["summary"]["jobs_with_stuck_chunks"] == STUCK_JOBS
    attention = status["summary"]["needs_attention"]
    assert len(attention) == 10
    assert all((job["status"], job["stuck_chunks"]) == ("processing", 1) for job in attention)
    assert (status["total"], status["limit"]) == (STORES, 50)
    assert [job["job_id"] for job in status["jobs"]] == newest_jobs(db, 50)
    assert status["stores_kept_current"] == []
    newest = status["jobs"][0]  # store 3000's: failed
    assert {"chunks_done", "chunks_failed", "total_chunks", "stuck_chunks", "status"} <= set(newest)
    assert newest["last_error"] == "Graph answered 404: store-03000@scale.test not found"


@pytest.mark.usefixtures("seeded")
def test_status_filters_by_state_store_and_age(db: Db, env: dict[str, str]) -> None:
    failed = document("status", "--state", "failed", "--limit", "20", env=env)
    assert (failed["total"], failed["limit"]) == (300, 20)
    assert [job["job_id"] for job in failed["jobs"]] == newest_jobs(db, 20, "status = 'failed'")
    assert failed["summary"]["by_state"] == BY_STATE  # the summary counts every state

    for states in (["--state", "failed,cancelled"], ["--state", "failed", "--state", "CANCELLED"]):
        both = document("status", *states, env=env)
        assert both["total"] == 600
        assert {job["status"] for job in both["jobs"]} == {"failed", "cancelled"}

    one = document("status", "--store", "store-00010@scale.test", env=env)
    assert [job["job_id"] for job in one["jobs"]] == [str(job_of(db, "store-00010@scale.test"))]
    assert one["total"] == 1
    assert one["summary"]["by_state"] == {**dict.fromkeys(BY_STATE, 0), "failed": 1}
    assert [job["store_email"] for job in one["summary"]["needs_attention"]] == [
        "store-00010@scale.test"
    ]
    store_id = db.execute("SELECT id FROM stores WHERE email = 'store-00011@scale.test'").fetchone()
    assert store_id is not None
    by_id = document("status", "--store", str(store_id["id"]), env=env)
    assert [job["status"] for job in by_id["jobs"]] == ["processing"]

    recent = syncctl("status", "--since", "30m", env=env)
    assert recent.stdout.splitlines()[0].startswith("Jobs created within 30m: ")
    assert recent.stdout.splitlines()[0].endswith("(30 in all).")
    assert "showing" not in recent.stderr.replace("that need attention", "")
    assert document("status", "--since", "30m", env=env)["total"] == 30

    assert "--limit must be at least 1" in refused("status", "--limit", "0", env=env)
    assert "--state takes pending" in refused("status", "--state", "stuck", env=env)
    assert "No store nobody@scale.test" in refused(
        "status", "--store", "nobody@scale.test", env=env
    )
    assert "--state" in refused("status", str(C), "--state", "failed", env=env)


@pytest.mark.usefixtures("seeded")
def test_store_list_shows_the_newest_fifty_and_searches(db: Db, env: dict[str, str]) -> None:
    result = syncctl("store", "list", env=env)
    assert sum("@scale.test" in line for line in result.stdout.splitlines()) == 50
    assert "showing 50 of 3000; --limit to see more" in result.stderr

    listed = document("store", "list", env=env)
    assert {"stores", "total", "limit"} == set(listed)
    assert (len(listed["stores"]), listed["total"], listed["limit"]) == (50, STORES, 50)
    first = listed["stores"][0]
    assert set(first) == {
        "id", "name", "email", "business_id", "provider", "created_at", "active_job_id",
    }  # fmt: skip
    assert first["email"] == "store-03000@scale.test"  # newest first
    pending = next(s for s in listed["stores"] if s["email"] == "store-02992@scale.test")
    assert pending["active_job_id"] == str(job_of(db, "store-02992@scale.test"))

    found = document("store", "list", "--search", "0001", env=env)
    assert found["total"] == 11  # store-00001 and store-00010 to store-00019
    assert all("0001" in s["email"] for s in found["stores"])
    assert document("store", "list", "--search", "STORE 2999", env=env)["total"] == 1  # a name
    assert document("store", "list", "--since", "10m", "--limit", "5", env=env)["total"] == 10

    none = syncctl("store", "list", "--search", "nobody", env=env)
    assert none.stdout == ""
    assert "No store matches --search 'nobody'" in none.stderr


# 4. A failed job's reason; 5. a job with no start


def test_a_failed_job_shows_why_its_last_chunk_failed(db: Db, env: dict[str, str]) -> None:
    db.execute("INSERT INTO stores (name, email) VALUES ('F', 'f@ids.test'), ('K', 'k@ids.test')")
    db.execute(
        "INSERT INTO sync_queue (id, store_id, status, last_error)"
        " SELECT %(a)s, id, 'failed', NULL FROM stores WHERE email = 'f@ids.test'"
        " UNION ALL SELECT %(b)s, id, 'cancelled', 'cancelled by operator' FROM stores"
        "  WHERE email = 'k@ids.test'",
        {"a": A, "b": B},
    )
    # Both jobs: chunk 1 completed, 2 failed a minute ago, 3 failed ten minutes ago.
    db.execute(
        "INSERT INTO chunked_sync_jobs (parent_sync_job_id, store_id, chunk_index, total_chunks,"
        "  start_offset, end_offset, estimated_emails, status, attempts, completed_at, last_error)"
        " SELECT q.id, q.store_id, c.i, 3, 0, 10, 10, c.status, 1, now() - c.ago, c.error"
        "   FROM sync_queue q, (VALUES (1, 'completed', interval '20 minutes', NULL),"
        "     (2, 'failed', interval '1 minute', 'Graph answered 403: access denied'),"
        "     (3, 'failed', interval '10 minutes', 'an older failure'))"
        "     AS c(i, status, ago, error)"
    )
    reason = "Graph answered 403: access denied"

    assert document("status", str(A), env=env)["job"]["last_error"] == reason
    details = syncctl("status", "abcd1", env=env).stdout.splitlines()
    assert [
        line.split(":", 1)[1].strip() for line in details if line.startswith("last_error:")
    ] == [reason]
    overview = document("status", env=env)
    assert {job["job_id"]: job["last_error"] for job in overview["jobs"]} == {
        str(A): reason,
        str(B): "cancelled by operator",  # its own reason comes first
    }
    assert [job["last_error"] for job in overview["summary"]["needs_attention"]] == [reason]
    table = syncctl("status", env=env).stdout.splitlines()
    assert any(str(A) in line and reason in line for line in table)


def test_a_job_with_no_start_starts_at_the_first_message(db: Db, env: dict[str, str]) -> None:
    db.execute("INSERT INTO stores (name, email) VALUES ('O', 'o@ids.test'), ('W', 'w@ids.test')")
    db.execute(
        "INSERT INTO sync_queue (id, store_id, status, sync_from)"
        " SELECT %(a)s, id, 'completed', NULL::timestamptz FROM stores WHERE email = 'o@ids.test'"
        " UNION ALL SELECT %(b)s, id, 'completed', '2024-01-31T00:00:00Z' FROM stores"
        "  WHERE email = 'w@ids.test'",
        {"a": A, "b": B},
    )

    def sync_from(job: UUID) -> str:
        lines = syncctl("status", str(job), env=env).stdout.splitlines()
        [value] = [line.split(":", 1)[1].strip() for line in lines if line.startswith("sync_from:")]
        return value

    assert sync_from(A) == "the first message"
    assert sync_from(B) == "2024-01-31 00:00:00Z"
    assert document("status", str(A), env=env)["job"]["sync_from"] is None  # JSON: as stored
