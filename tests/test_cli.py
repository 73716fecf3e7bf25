"""The command line, in process, against real PostgreSQL: flags, output, exit codes."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, LiteralString
from uuid import UUID, uuid4

import pytest
import typer
from typer.testing import CliRunner, Result

import syncctl.worker
from fakes import CountOnly
from syncctl import cli, jobs, queue, reports
from syncctl.config import DatabaseTarget
from syncctl.db import Connection
from syncctl.mailsource import MailSourceError, Window
from syncctl.migrate import migration_files
from syncctl.queue import Chunk

LEASE = timedelta(seconds=60)
UNKNOWN_JOB = str(uuid4())

Invoke = Callable[..., Result]


@dataclass
class CountingSource(CountOnly):
    """A mail source that counts (what `create` needs) and remembers what it was asked."""

    error: MailSourceError | None = None
    windows: list[Window] = field(default_factory=list)

    def count(self, mailbox: str, window: Window) -> int:
        if self.error:
            raise self.error
        self.windows.append(window)
        return super().count(mailbox, window)


@pytest.fixture
def source(monkeypatch: pytest.MonkeyPatch) -> CountingSource:
    fake = CountingSource()
    monkeypatch.setattr(cli, "_mail_source", lambda target, **_: fake)
    return fake


@pytest.fixture
def invoke(database_url: str, source: CountingSource) -> Invoke:
    """Run syncctl with the test database unless the arguments name one."""
    runner = CliRunner()

    def run(*args: str, input: str | None = None) -> Result:
        argv = list(args)
        if "--database-url" not in argv:
            argv += ["--database-url", database_url]
        return runner.invoke(cli.app, argv, input=input)

    return run


def data(result: Result) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def one_line_error(result: Result) -> str:
    """The single line a failed command printed on stderr."""
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("syncctl: ")
    return lines[0]


SNAPSHOT: dict[str, LiteralString] = {
    "stores": "SELECT * FROM stores ORDER BY id",
    "jobs": "SELECT * FROM sync_queue ORDER BY id",
    "chunks": "SELECT * FROM chunked_sync_jobs ORDER BY id",
    "attempts": "SELECT * FROM chunk_attempts ORDER BY id",
    "emails": "SELECT * FROM emails ORDER BY id",
}


def snapshot(conn: Connection) -> dict[str, list[dict[str, Any]]]:
    """Every row syncctl could change, to show that a command changed nothing."""
    return {name: conn.execute(sql).fetchall() for name, sql in SNAPSHOT.items()}


def claim(conn: Connection, worker: str = "w1") -> Chunk:
    chunk = queue.claim_chunk(conn, worker_id=worker, lease=LEASE)
    assert chunk is not None
    return chunk


def finish(conn: Connection, chunk: Chunk, outcome: queue.Outcome) -> None:
    error = None if outcome == "completed" else "mailbox said no"
    queue.finish_chunk(conn, chunk, outcome, error=error, retry_base=timedelta(0))


def new_job(conn: Connection, email: str, messages: int = 2500, max_attempts: int = 3) -> UUID:
    jobs.add_store(conn, name=email.split("@", maxsplit=1)[0], email=email)
    return jobs.create_job(
        conn,
        CountOnly(counts={email: messages}),
        store_ref=email,
        chunk_size=1000,
        max_attempts=max_attempts,
    ).job_id


def status_of(conn: Connection, job_id: UUID) -> str:
    row = conn.execute("SELECT status FROM sync_queue WHERE id = %s", [job_id]).fetchone()
    assert row is not None
    status: str = row["status"]
    return status


@dataclass(frozen=True)
class Seeded:
    active: UUID  # a@example.com, 3 chunks, pending
    done: UUID  # b@example.com, 0 messages, completed


@pytest.fixture
def seeded(conn: Connection) -> Seeded:
    active = new_job(conn, "a@example.com")
    done = new_job(conn, "b@example.com", messages=0)
    jobs.add_store(conn, name="c", email="c@example.com")
    return Seeded(active, done)


# Bad input: exit 2, one sentence on stderr, nothing changed.

BAD_INPUT = [
    (["store", "add", "--name", "X", "--email", "not-an-address"], "not a mailbox address"),
    (["store", "add", "--name", " ", "--email", "x@example.com"], "name is empty"),
    (["store", "add", "--name", "X", "--email", "x@example.com", "--business", "7"], "UUID"),
    (["store", "add", "--name", "A", "--email", "a@example.com"], "exists already"),
    (["create", "nobody@example.com"], "No store nobody@example.com"),
    (["create", "not-a-store"], "neither a store id"),
    (["create", str(uuid4())], "No store"),
    (["create", "c@example.com", "--from", "2024-02-30"], "--from takes a date"),
    (["create", "c@example.com", "--to", "yesterday"], "--to takes a date"),
    (["create", "c@example.com", "--from", "2024-02-01", "--to", "2024-01-01"], "swap them"),
    (["create", "c@example.com", "--chunk-size", "0"], "--chunk-size must be at least 1"),
    (["create", "c@example.com", "--max-attempts", "0"], "--max-attempts must be at least 1"),
    (["create", "c@example.com", "--type", " "], "--type is empty"),
    (["create", "c@example.com", "--parallel", "0"], "--parallel must be from 1 to 4"),
    (["create", "c@example.com", "--parallel", "5"], "--parallel must be from 1 to 4"),
    (["create", "a@example.com"], "--force"),
    (["run", "--concurrency", "0"], "--concurrency must be at least 1"),
    (["run", "--lease", "2s"], "--lease must be at least 5s"),
    (["run", "--lease", "soon"], "--lease takes a duration"),
    (["run", "--worker-id", " "], "--worker-id is empty"),
    (["run-worker", "--concurrency", "0"], "--concurrency must be at least 1"),
    (["status", "not-a-uuid"], "is not a job id"),
    (["status", UNKNOWN_JOB], f"No job {UNKNOWN_JOB}"),
    (["status", "--watch", "--json"], "--watch"),
    (["list-stuck", "--older-than", "5"], "--older-than takes a duration"),
    (["reset-stuck", "--older-than", "5 minutes"], "--older-than takes a duration"),
    (["reset-stuck", "--older-than", "1000000d", "--yes"], "too long"),
    (["retry", "nope"], "is not a job id"),
    (["retry", UNKNOWN_JOB], "No job"),
    (["retry", "{active}"], "no failed or cancelled chunk"),
    (["retry", "{active}", "--chunk", "9"], "has no chunk 9"),
    (["retry", "{active}", "--chunk", "1"], "only failed or cancelled chunks"),
    (["cancel", "nope"], "is not a job id"),
    (["cancel", UNKNOWN_JOB], "No job"),
    (["cancel", "{done}"], "already completed"),
    (["success-rate", "--since", "yesterday"], "--since takes a duration"),
    (["success-rate", "--check"], "--check needs --min-rate"),
    (["success-rate", "--min-rate", "90"], "only with --check"),
    (["success-rate", "--check", "--min-rate", "150"], "from 0 to 100"),
    (["problem-stores", "--since", "1w"], "--since takes a duration"),
    (["cleanup", "--older-than", "7"], "--older-than takes a duration"),
    (["db", "migrate", "--database-url", "not a url"], "database URL from --database-url"),
    (["db", "status", "--database-url", "postgresql://u@h/db?sslmode"], "is not valid"),
    (["reap", "--database-url", "host=h port"], "is not valid"),
]


@pytest.mark.parametrize(("args", "complaint"), BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_exits_2_with_one_sentence_and_changes_nothing(
    *,
    invoke: Invoke,
    conn: Connection,
    seeded: Seeded,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    complaint: str,
) -> None:
    def no_mail(target: DatabaseTarget, **_: object) -> None:
        raise AssertionError("bad input must be refused before the mail service is opened")

    monkeypatch.setattr(cli, "_mail_source", no_mail)
    before = snapshot(conn)
    argv = [a.format(active=seeded.active, done=seeded.done) for a in args]

    result = invoke(*argv)

    assert result.exit_code == 2, result.output
    assert complaint in one_line_error(result)
    assert result.stdout == ""
    assert snapshot(conn) == before


def test_usage_errors_stay_exit_2(invoke: Invoke) -> None:
    assert invoke("status", "--no-such-flag").exit_code == 2
    assert invoke("create").exit_code == 2  # STORE is required
    assert invoke("retry", "--chunk", "two", UNKNOWN_JOB).exit_code == 2


# --json: one document on stdout with the expected keys.

JSON_KEYS = [
    (
        ["db", "status"],
        {"source", "url", "database", "user", "server_version", "applied", "pending"},
    ),
    (["db", "migrate"], {"applied"}),
    (
        ["store", "add", "--name", "N", "--email", "n@example.com", "--no-check"],
        {"id", "name", "email"},
    ),
    (["store", "list"], {"stores"}),
    (
        ["create", "c@example.com"],
        {
            "job_id",
            "store",
            "window",
            "estimated_emails",
            "chunk_size",
            "chunks",
            "cancelled_job_id",
        },
    ),
    (["reap"], {"dry_run", "chunks"}),
    (["status"], {"jobs"}),
    (["status", "{active}"], {"job", "chunks"}),
    (["list-stuck"], {"older_than", "chunks"}),
    (["reset-stuck", "--dry-run"], {"dry_run", "changed", "chunks"}),
    (["cancel", "{active}"], {"job_id", "cancelled_chunks"}),
    (
        ["success-rate"],
        {"since", "statuses", "completed", "failed", "success_rate", "min_rate"},
    ),
    (["problem-stores"], {"since", "stores"}),
    (["cleanup", "--dry-run"], {"dry_run", "changed", "jobs"}),
]


@pytest.mark.parametrize(("args", "keys"), JSON_KEYS, ids=[" ".join(a) for a, _ in JSON_KEYS])
def test_json_output_is_one_document_with_the_expected_keys(
    invoke: Invoke, seeded: Seeded, args: list[str], keys: set[str]
) -> None:
    argv = [a.format(active=seeded.active) for a in args]
    document = data(invoke(*argv, "--json"))
    assert isinstance(document, dict)
    assert keys <= document.keys()


# create


def test_create_prints_the_job_id_window_and_chunk_plan(
    invoke: Invoke, conn: Connection, source: CountingSource
) -> None:
    jobs.add_store(conn, name="A", email="a@example.com")
    source.counts["a@example.com"] = 2500

    created = data(invoke("create", "a@example.com", "--chunk-size", "1000", "--json"))

    # Windows cut at the received times of messages 1000 and 2000, tiling the job's window.
    first, second = (
        source.received_at("a@example.com", Window(None, None), p) for p in (1000, 2000)
    )
    assert first is not None
    assert second is not None
    assert [
        (c["chunk_index"], c["window_start"], c["window_end"], c["estimated_emails"])
        for c in created["chunks"]
    ] == [
        (1, None, first.isoformat(), 1000),
        (2, first.isoformat(), second.isoformat(), 1000),
        (3, second.isoformat(), created["window"]["to"], 500),
    ]
    assert created["estimated_emails"] == 2500
    assert created["parallel"] == 4
    assert created["window"]["from"] is None
    assert created["window"]["to"] is not None
    assert status_of(conn, UUID(created["job_id"])) == "pending"

    text = invoke("create", "a@example.com", "--chunk-size", "1000", "--parallel", "2", "--force")
    assert text.exit_code == 0, text.output
    assert "the first message" in text.stdout
    assert f"{second:%Y-%m-%d %H:%M:%S}Z" in text.stdout
    assert "at once:    2" in text.stdout


def test_create_sizes_chunks_to_the_mailbox_when_no_chunk_size_is_given(
    invoke: Invoke, conn: Connection, source: CountingSource
) -> None:
    jobs.add_store(conn, name="big", email="big@example.com")
    jobs.add_store(conn, name="small", email="small@example.com")
    source.counts.update({"big@example.com": 120_000, "small@example.com": 2500})

    big = data(invoke("create", "big@example.com", "--json"))
    small = data(invoke("create", "small@example.com", "--json"))

    # Four chunks, one round of the four that may run at once; whole pages each.
    assert (big["chunk_size"], len(big["chunks"])) == (30_000, 4)
    assert (small["chunk_size"], len(small["chunks"])) == (1000, 3)

    jobs.add_store(conn, name="huge", email="huge@example.com")
    jobs.add_store(conn, name="one", email="one@example.com")
    source.counts.update({"huge@example.com": 1_000_000, "one@example.com": 120_000})
    huge = data(invoke("create", "huge@example.com", "--json"))
    one_at_a_time = data(invoke("create", "one@example.com", "--parallel", "1", "--json"))

    # No chunk holds more than 50,000 messages: five rounds of four.
    assert (huge["chunk_size"], len(huge["chunks"])) == (50_000, 20)
    assert (one_at_a_time["chunk_size"], len(one_at_a_time["chunks"])) == (40_000, 3)


def test_create_takes_the_store_id_and_a_window(invoke: Invoke, source: CountingSource) -> None:
    store = data(
        invoke("store", "add", "--name", "A", "--email", "a@example.com", "--no-check", "--json")
    )

    created = data(
        invoke(
            "create",
            store["id"],
            "--from",
            "2024-01-01",
            "--to",
            "2024-02-01T12:00:00Z",
            "--priority",
            "5",
            "--json",
        )
    )

    assert created["store"]["email"] == "a@example.com"
    assert created["window"] == {
        "from": "2024-01-01T00:00:00+00:00",
        "to": "2024-02-01T12:00:00+00:00",
    }
    [window] = source.windows
    assert window.received_from is not None
    assert window.received_from.isoformat().startswith("2024-01-01T00:00:00")


def test_create_replaces_an_active_job_only_with_force(
    invoke: Invoke, conn: Connection, seeded: Seeded
) -> None:
    refused = invoke("create", "a@example.com")
    assert refused.exit_code == 2
    assert str(seeded.active) in one_line_error(refused)

    forced = data(invoke("create", "a@example.com", "--force", "--json"))

    assert forced["cancelled_job_id"] == str(seeded.active)
    assert status_of(conn, seeded.active) == "cancelled"
    assert status_of(conn, UUID(forced["job_id"])) == "pending"


def test_create_exits_3_when_the_mail_service_fails(
    invoke: Invoke, conn: Connection, seeded: Seeded, source: CountingSource
) -> None:
    source.error = MailSourceError("403 Forbidden: access denied", permanent=True)
    before = snapshot(conn)

    result = invoke("create", "c@example.com")

    assert result.exit_code == 3
    assert "403 Forbidden" in one_line_error(result)
    assert snapshot(conn) == before


# status


def test_status_lists_jobs_and_one_jobs_chunks_with_their_attempts(
    invoke: Invoke, conn: Connection, seeded: Seeded
) -> None:
    finish(conn, claim(conn, "worker-7"), "error")

    listing = invoke("status")
    assert listing.exit_code == 0, listing.output
    assert str(seeded.active) in listing.stdout
    assert "a@example.com" in listing.stdout

    report = data(invoke("status", str(seeded.active), "--json"))
    assert report["job"]["status"] == "processing"
    first = report["chunks"][0]
    assert (first["status"], first["attempts"]) == ("pending", 1)
    [attempt] = first["history"]
    assert (attempt["worker_id"], attempt["outcome"], attempt["error"]) == (
        "worker-7",
        "retrying",
        "mailbox said no",
    )
    assert attempt["duration_ms"] is not None

    text = invoke("status", str(seeded.active))
    assert text.exit_code == 0, text.output
    assert "worker-7" in text.stdout
    assert "retrying" in text.stdout


def test_status_watch_returns_once_the_jobs_are_finished(invoke: Invoke, conn: Connection) -> None:
    done = new_job(conn, "done@example.com", messages=0)

    result = invoke("status", str(done), "--watch")

    assert result.exit_code == 0, result.output
    assert "done@example.com" in result.stdout


# stuck chunks


def stuck_chunk(conn: Connection, job_id: UUID, worker: str = "w1") -> Chunk:
    chunk = claim(conn, worker)
    assert chunk.parent_sync_job_id == job_id
    conn.execute(
        "UPDATE chunked_sync_jobs SET started_at = now() - interval '10 minutes' WHERE id = %s",
        [chunk.id],
    )
    return chunk


def test_list_stuck_check_exits_1_only_when_a_chunk_is_stuck(
    invoke: Invoke, conn: Connection, seeded: Seeded
) -> None:
    assert invoke("list-stuck", "--check").exit_code == 0

    chunk = stuck_chunk(conn, seeded.active)

    found = invoke("list-stuck", "--check")
    assert found.exit_code == 1
    assert str(seeded.active) in found.stdout
    assert "reset-stuck" in one_line_error(found)
    assert invoke("list-stuck", "--check", "--older-than", "15m").exit_code == 0
    listed = data(invoke("list-stuck", "--json"))
    assert [c["chunk_id"] for c in listed["chunks"]] == [str(chunk.id)]


@pytest.fixture
def two_stuck(conn: Connection) -> tuple[Chunk, Chunk]:
    """Two chunks processing for 10 minutes: one with tries left, one on its last try."""
    with_tries = new_job(conn, "a@example.com", max_attempts=3)
    last_try = new_job(conn, "b@example.com", messages=1000, max_attempts=1)
    return stuck_chunk(conn, with_tries, "w1"), stuck_chunk(conn, last_try, "w2")


def chunk_status(conn: Connection, chunk: Chunk) -> str:
    row = conn.execute("SELECT status FROM chunked_sync_jobs WHERE id = %s", [chunk.id]).fetchone()
    assert row is not None
    status: str = row["status"]
    return status


def test_reset_stuck_dry_run_lists_and_changes_nothing(
    invoke: Invoke, conn: Connection, two_stuck: tuple[Chunk, Chunk]
) -> None:
    before = snapshot(conn)

    result = invoke("reset-stuck", "--dry-run", "--json")

    listed = data(result)
    assert {c["chunk_id"]: c["new_status"] for c in listed["chunks"]} == {
        str(two_stuck[0].id): "pending",
        str(two_stuck[1].id): "failed",
    }
    assert listed["changed"] is False
    assert snapshot(conn) == before


def test_reset_stuck_answered_no_changes_nothing(
    invoke: Invoke, conn: Connection, two_stuck: tuple[Chunk, Chunk]
) -> None:
    before = snapshot(conn)

    result = invoke("reset-stuck", input="n\n")

    assert result.exit_code == 0, result.output
    assert "Reset these 2 chunks?" in result.stderr
    assert snapshot(conn) == before


def test_reset_stuck_with_nobody_to_answer_refuses(
    invoke: Invoke, conn: Connection, two_stuck: tuple[Chunk, Chunk]
) -> None:
    before = snapshot(conn)

    result = invoke("reset-stuck")

    assert result.exit_code == 2
    assert "--yes" in result.stderr.strip().splitlines()[-1]
    assert snapshot(conn) == before


@pytest.mark.parametrize("confirmation", [["--yes"], []], ids=["--yes", "answered y"])
def test_reset_stuck_puts_back_chunks_with_tries_left_and_fails_the_others(
    invoke: Invoke, conn: Connection, two_stuck: tuple[Chunk, Chunk], confirmation: list[str]
) -> None:
    with_tries, last_try = two_stuck

    result = invoke("reset-stuck", *confirmation, input="y\n")

    assert result.exit_code == 0, result.output
    assert "Reset 2 chunks." in result.stderr
    assert chunk_status(conn, with_tries) == "pending"
    assert chunk_status(conn, last_try) == "failed"
    assert queue.heartbeat(conn, with_tries, lease=LEASE) is None  # the old worker is fenced out
    assert claim(conn, "w3").id == with_tries.id


def test_reap_expires_lost_leases_and_dry_run_only_lists(
    invoke: Invoke, conn: Connection, seeded: Seeded
) -> None:
    chunk = claim(conn)
    conn.execute(
        "UPDATE chunked_sync_jobs SET lease_expires_at = now() - interval '1 second' WHERE id = %s",
        [chunk.id],
    )
    before = snapshot(conn)

    preview = data(invoke("reap", "--dry-run", "--json"))
    assert [c["chunk_id"] for c in preview["chunks"]] == [str(chunk.id)]
    assert snapshot(conn) == before

    reaped = invoke("reap")
    assert reaped.exit_code == 0, reaped.output
    assert "Reaped 1 chunk." in reaped.stderr
    assert chunk_status(conn, chunk) == "pending"


# retry and cancel


def test_retry_requeues_the_failed_chunk_and_the_job_runs_again(
    invoke: Invoke, conn: Connection
) -> None:
    job_id = new_job(conn, "a@example.com", messages=1000, max_attempts=1)
    finish(conn, claim(conn), "permanent")
    assert status_of(conn, job_id) == "failed"

    retried = data(invoke("retry", str(job_id), "--json"))

    assert retried == {"job_id": str(job_id), "chunk_indexes": [1], "status": "pending"}
    chunk = claim(conn, "w2")
    assert (chunk.parent_sync_job_id, chunk.attempts, chunk.max_attempts) == (job_id, 1, 1)


def test_retry_refuses_while_the_store_has_another_active_job(
    invoke: Invoke, conn: Connection, source: CountingSource
) -> None:
    job_id = new_job(conn, "a@example.com", messages=1000, max_attempts=1)
    finish(conn, claim(conn), "permanent")
    assert invoke("create", "a@example.com").exit_code == 0
    before = snapshot(conn)

    result = invoke("retry", str(job_id))

    assert result.exit_code == 2
    assert "already has a pending job" in one_line_error(result)
    assert snapshot(conn) == before


def test_cancel_cancels_the_job_and_fences_its_worker(
    invoke: Invoke, conn: Connection, seeded: Seeded
) -> None:
    held = claim(conn)

    result = invoke("cancel", str(seeded.active))

    assert result.exit_code == 0, result.output
    assert status_of(conn, seeded.active) == "cancelled"
    assert queue.heartbeat(conn, held, lease=LEASE) is None
    assert queue.finish_chunk(conn, held, "completed") is None


# maintenance reports


def test_problem_stores_check_exits_1_only_when_a_store_has_failed_chunks(
    invoke: Invoke, conn: Connection, seeded: Seeded
) -> None:
    assert invoke("problem-stores", "--check").exit_code == 0

    finish(conn, claim(conn), "permanent")

    found = invoke("problem-stores", "--check")
    assert found.exit_code == 1
    assert "a@example.com" in found.stdout
    assert "1 store(s) have failed chunks" in one_line_error(found)


def test_success_rate_check_compares_completed_share_with_min_rate(
    invoke: Invoke, conn: Connection, seeded: Seeded
) -> None:
    finish(conn, claim(conn), "completed")
    finish(conn, claim(conn), "permanent")

    below = invoke("success-rate", "--check", "--min-rate", "60")
    assert below.exit_code == 1
    assert "completed" in below.stdout
    assert "50.00" in below.stdout  # the % of finished chunks: the success rate
    assert "50.00% is below 60%" in below.stderr

    assert invoke("success-rate", "--check", "--min-rate", "40").exit_code == 0
    rate = data(invoke("success-rate", "--json"))
    assert (rate["completed"], rate["failed"], rate["success_rate"]) == (1, 1, 50.0)


def backdate(conn: Connection, job_id: UUID, days: int) -> None:
    conn.execute(
        "UPDATE sync_queue SET created_at = now() - make_interval(days => %s) WHERE id = %s",
        [days, job_id],
    )


@pytest.fixture
def old_finished(conn: Connection, seeded: Seeded) -> UUID:
    """seeded.done, created eight days ago."""
    backdate(conn, seeded.done, 8)
    backdate(conn, seeded.active, 8)
    return seeded.done


def test_cleanup_dry_run_and_answer_no_change_nothing(
    invoke: Invoke, conn: Connection, old_finished: UUID
) -> None:
    before = snapshot(conn)

    preview = data(invoke("cleanup", "--dry-run", "--json"))
    assert [j["job_id"] for j in preview["jobs"]] == [str(old_finished)]

    declined = invoke("cleanup", input="n\n")
    assert declined.exit_code == 0, declined.output
    assert "Delete these 1 job(s)?" in declined.stderr

    unanswered = invoke("cleanup")
    assert unanswered.exit_code == 2
    assert snapshot(conn) == before


def test_cleanup_yes_deletes_old_finished_jobs_only(
    invoke: Invoke, conn: Connection, seeded: Seeded, old_finished: UUID
) -> None:
    result = invoke("cleanup", "--yes", "--older-than", "7d")

    assert result.exit_code == 0, result.output
    assert str(old_finished) in result.stdout
    remaining = {r["id"] for r in conn.execute("SELECT id FROM sync_queue").fetchall()}
    assert remaining == {seeded.active}


# run


def test_run_starts_the_worker_with_the_flags_and_returns_its_exit_code(
    invoke: Invoke, monkeypatch: pytest.MonkeyPatch, source: CountingSource
) -> None:
    started: list[tuple[DatabaseTarget, Any, Any]] = []

    def fake_run_worker(target: DatabaseTarget, mail: Any, options: Any) -> int:
        started.append((target, mail, options))
        return 1 if options.drain else 0

    monkeypatch.setattr(syncctl.worker, "run_worker", fake_run_worker)

    result = invoke(
        "run", "--concurrency", "3", "--lease", "2m", "--worker-id", "host-a", "--poll-only"
    )
    assert result.exit_code == 0, result.output
    assert invoke("run-worker", "--drain").exit_code == 1

    (_, mail, options), (_, _, drained) = started
    assert mail is source
    assert (options.concurrency, options.lease, options.worker_id) == (
        3,
        timedelta(minutes=2),
        "host-a",
    )
    assert (options.drain, options.poll_only) == (False, True)
    assert (drained.drain, drained.concurrency, drained.lease) == (True, 1, LEASE)


# database


def test_db_migrate_applies_every_migration_once(invoke: Invoke, empty_database_url: str) -> None:
    first = invoke("db", "migrate", "--database-url", empty_database_url)
    assert first.exit_code == 0, first.output
    assert first.stdout.split() == [name for name, _ in migration_files()]

    again = invoke("db", "migrate", "--database-url", empty_database_url)
    assert again.exit_code == 0
    assert again.stdout == ""
    assert "up to date" in again.stderr


def test_db_status_masks_the_password_and_lists_pending_migrations(
    invoke: Invoke, empty_database_url: str
) -> None:
    url = empty_database_url.replace("postgres@", "postgres:s3cretPW@", 1)

    text = invoke("db", "status", "--database-url", url)
    status = data(invoke("db", "status", "--database-url", url, "--json"))

    assert text.exit_code == 0, text.output
    assert "s3cretPW" not in text.output
    assert "postgres:***@" in text.stdout
    assert "s3cretPW" not in json.dumps(status)
    assert status["source"] == "--database-url"
    assert status["applied"] == []
    assert status["pending"] == [name for name, _ in migration_files()]


@pytest.mark.parametrize("args", [["status"], ["db", "status"], ["list-stuck"], ["cleanup"]])
def test_an_unreachable_database_exits_3_with_one_sentence(invoke: Invoke, args: list[str]) -> None:
    result = invoke(*args, "--database-url", "postgresql://postgres:s3cretPW@127.0.0.1:1/x")

    assert result.exit_code == 3
    line = one_line_error(result)
    assert "Could not connect to the database" in line
    assert "s3cretPW" not in result.output


def test_a_database_without_the_schema_exits_3_and_says_to_migrate(
    invoke: Invoke, empty_database_url: str
) -> None:
    result = invoke("status", "--database-url", empty_database_url)

    assert result.exit_code == 3
    assert "syncctl db migrate" in one_line_error(result)


def test_an_unexpected_error_is_one_line_and_shows_the_traceback_only_with_verbose(
    invoke: Invoke, monkeypatch: pytest.MonkeyPatch, database_url: str
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"broken while reading {database_url}")

    monkeypatch.setattr(reports, "job_overview", broken)

    quiet = invoke("status")
    assert quiet.exit_code == 1
    assert "internal error: RuntimeError" in one_line_error(quiet)

    loud = invoke("-v", "status")
    assert loud.exit_code == 1
    assert "Traceback" in loud.stderr
    assert loud.stderr.strip().splitlines()[-1].startswith("syncctl: internal error")


def test_verbose_json_logs_name_the_database_with_its_password_masked(
    invoke: Invoke, database_url: str
) -> None:
    url = database_url.replace("postgres@", "postgres:s3cretPW@", 1)

    result = invoke("-v", "--log-format", "json", "status", "--database-url", url)

    assert result.exit_code == 0, result.output
    logs = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    [chosen] = [entry for entry in logs if entry["logger"] == "syncctl.cli"]
    assert chosen["level"] == "debug"
    assert "postgres:***@" in chosen["message"]
    assert "s3cretPW" not in result.output


# help and version


PUBLIC_COMMANDS = {
    "db migrate",
    "db status",
    "store add",
    "store list",
    "create",
    "run",
    "run-worker",
    "reap",
    "status",
    "list-stuck",
    "reset-stuck",
    "retry",
    "cancel",
    "success-rate",
    "problem-stores",
    "cleanup",
    "dev fake-graph",
    "demo",
}


def registered_commands() -> Iterator[tuple[str, Any]]:
    """(path, command) of every command, subcommands included."""
    root: Any = typer.main.get_command(cli.app)
    for name, command in root.commands.items():
        if hasattr(command, "commands"):
            for sub_name, sub in command.commands.items():
                yield f"{name} {sub_name}", sub
        else:
            yield name, command


def test_help_lists_every_command_and_each_has_help_text() -> None:
    runner = CliRunner()
    commands = dict(registered_commands())
    assert commands.keys() >= PUBLIC_COMMANDS

    top = runner.invoke(cli.app, ["--help"])
    assert top.exit_code == 0
    for path in commands:
        assert path.split()[0] in top.stdout

    for path, command in commands.items():
        assert (command.help or "").strip(), f"{path} has no help text"
        shown = runner.invoke(cli.app, [*path.split(), "--help"])
        assert shown.exit_code == 0, path
        assert "Usage" in shown.stdout


def test_version_prints_the_version() -> None:
    result = CliRunner().invoke(cli.app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.startswith("syncctl ")


# -- a database of another release --------------------------------------------------


@pytest.mark.parametrize("command", [["status"], ["store", "list"], ["reap"], ["run", "--drain"]])
def test_database_missing_a_migration_is_refused_until_migrated(
    invoke: Invoke, conn: Connection, database_url: str, command: list[str]
) -> None:
    last = migration_files()[-1][0]
    conn.execute("DELETE FROM schema_migrations WHERE name = %s", [last])

    result = invoke(*command)

    assert result.exit_code == 3, result.output
    assert result.stderr.strip() == (
        f"syncctl: The database at {DatabaseTarget(database_url, 'test').masked_url} lacks 1 "
        "migration(s) this syncctl needs "
        f"(first: {last}); run `syncctl db migrate`."
    )
    assert conn.execute("SELECT count(*) AS n FROM chunk_attempts").fetchone() == {"n": 0}


@pytest.mark.parametrize("command", [["status"], ["create", "a@example.com"], ["run", "--drain"]])
def test_database_migrated_by_a_newer_syncctl_is_refused(
    invoke: Invoke, conn: Connection, command: list[str]
) -> None:
    jobs.add_store(conn, name="a", email="a@example.com")
    conn.execute("INSERT INTO schema_migrations (name) VALUES ('0999_from_the_future.sql')")

    result = invoke(*command)

    assert result.exit_code == 3, result.output
    assert "has migration 0999_from_the_future.sql, which this syncctl" in result.stderr
    assert "a newer syncctl upgraded it" in result.stderr
    assert conn.execute("SELECT count(*) AS n FROM sync_queue").fetchone() == {"n": 0}
