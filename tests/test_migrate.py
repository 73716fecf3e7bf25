"""`syncctl db migrate`: on an empty database, again, from two hosts at once, and
as the upgrade of the original system's database, after which the original
runbook SQL still runs unchanged."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

import syncctl.migrate
from helpers import wait_for
from syncctl.config import DatabaseTarget
from syncctl.db import Connection, connect, query
from syncctl.migrate import (
    MIGRATION_LOCK_KEY,
    MigrationFailed,
    applied_migrations,
    migrate,
    migration_files,
    pending_migrations,
)
from syncctl.queue import Chunk, claim_chunk, finish_chunk, reap

DATA = Path(__file__).parent / "data"
LEASE = timedelta(minutes=5)

SEED_TABLES = ("user_profiles", "stores", "sync_queue", "chunked_sync_jobs")
SEED_FUNCTIONS = ("create_sync_chunks", "claim_next_chunk_job", "complete_chunk_job")


def job_id(n: int) -> UUID:
    """Job n of reference_rows.sql."""
    return UUID(f"10000000-0000-0000-0000-{n:012d}")


def chunk_id(job: int, index: int) -> UUID:
    """Chunk index of job n of reference_rows.sql."""
    return UUID(f"c{job:07d}-0000-0000-0000-{index:012d}")


def run_sql_file(conn: Connection, path: Path) -> Any:
    """Run a file's SQL exactly as written; return the cursor."""
    # Fixture files of this repository, run as they are.
    return conn.execute(path.read_text(encoding="utf-8"))


def run_runbook(conn: Connection, name: str) -> tuple[list[dict[str, Any]], int]:
    """One of the reference's runbook queries, unchanged: (rows, rowcount)."""
    cursor = run_sql_file(conn, DATA / "runbook" / f"{name}.sql")
    rows = cursor.fetchall() if cursor.description else []
    return rows, cursor.rowcount


def schema_fingerprint(conn: Connection) -> list[Any]:
    """Every column, index, constraint and function of the public schema, and row counts."""
    return [
        conn.execute(
            "SELECT table_name, column_name, data_type, is_nullable, column_default"
            "  FROM information_schema.columns WHERE table_schema = 'public'"
            " ORDER BY 1, 2"
        ).fetchall(),
        conn.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1"
        ).fetchall(),
        conn.execute(
            "SELECT conrelid::regclass::text AS tbl, conname, pg_get_constraintdef(oid) AS def"
            "  FROM pg_constraint WHERE connamespace = 'public'::regnamespace ORDER BY 1, 2"
        ).fetchall(),
        conn.execute(
            "SELECT p.oid::regprocedure::text AS signature, md5(p.prosrc) AS body"
            "  FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace ORDER BY 1"
        ).fetchall(),
        conn.execute("SELECT name, applied_at FROM schema_migrations ORDER BY name").fetchall(),
        conn.execute(
            "SELECT (SELECT count(*) FROM stores) AS stores,"
            "       (SELECT count(*) FROM sync_queue) AS jobs,"
            "       (SELECT count(*) FROM chunked_sync_jobs) AS chunks"
        ).fetchall(),
    ]


def seed_overloads(conn: Connection) -> dict[str, list[str]]:
    rows = conn.execute(
        "SELECT p.proname, pg_get_function_identity_arguments(p.oid) AS args FROM pg_proc p"
        " WHERE p.proname = ANY(%s) ORDER BY 1, 2",
        [list(SEED_FUNCTIONS)],
    ).fetchall()
    found: dict[str, list[str]] = {name: [] for name in SEED_FUNCTIONS}
    for row in rows:
        found[row["proname"]].append(row["args"])
    return found


def row_ids(conn: Connection) -> dict[str, set[Any]]:
    return {
        table: {r["id"] for r in conn.execute(f"SELECT id FROM {table}")} for table in SEED_TABLES
    }


def job_statuses(conn: Connection) -> dict[UUID, str]:
    return {r["id"]: r["status"] for r in conn.execute("SELECT id, status FROM sync_queue")}


def heads(chunks: list[Chunk | None]) -> list[tuple[UUID, int] | None]:
    return [(c.parent_sync_job_id, c.chunk_index) if c else None for c in chunks]


@pytest.fixture
def empty_conn(empty_database_url: str) -> Iterator[Connection]:
    connection = connect(DatabaseTarget(empty_database_url, "test"))
    yield connection
    connection.close()


@pytest.fixture
def legacy_conn(empty_conn: Connection) -> Connection:
    """A database as the original system left it: its tables, functions and rows."""
    run_sql_file(empty_conn, DATA / "reference_schema.sql")
    run_sql_file(empty_conn, DATA / "reference_rows.sql")
    return empty_conn


# --- an empty database ------------------------------------------------------------------


def test_migrate_on_empty_database_creates_tables_functions_and_records_every_file(
    empty_conn: Connection,
) -> None:
    shipped = [name for name, _ in migration_files()]

    applied = migrate(empty_conn)

    assert applied == shipped
    assert [m.name for m in applied_migrations(empty_conn)] == shipped
    assert pending_migrations(empty_conn) == []
    tables = {
        r["table_name"]
        for r in empty_conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        )
    }
    assert {"stores", "sync_queue", "chunked_sync_jobs", "emails", "chunk_attempts"} <= tables
    assert "schema_migrations" in tables
    assert seed_overloads(empty_conn) == {
        "create_sync_chunks": [
            "p_parent_sync_job_id uuid, p_sync_type text, p_estimated_email_count integer, "
            "p_sync_from text, p_sync_to text"
        ],
        "claim_next_chunk_job": ["p_worker_id text"],
        "complete_chunk_job": ["p_chunk_job_id uuid, p_status text, p_processing_time_ms integer"],
    }
    chunk_columns = {
        r["column_name"]
        for r in empty_conn.execute(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_name = 'chunked_sync_jobs'"
        )
    }
    assert {
        "lease_expires_at",
        "heartbeat_at",
        "last_error",
        "processing_time_ms",
        "emails_synced",
        "checkpoint",
        "not_before",
    } <= chunk_columns


def test_migrate_again_applies_nothing_and_changes_nothing(empty_conn: Connection) -> None:
    migrate(empty_conn)
    before = schema_fingerprint(empty_conn)

    assert migrate(empty_conn) == []

    assert schema_fingerprint(empty_conn) == before


def test_two_hosts_migrating_at_once_apply_each_file_once(empty_database_url: str) -> None:
    target = DatabaseTarget(empty_database_url, "test")
    results: dict[int, list[str]] = {}
    failures: list[BaseException] = []

    def host(n: int) -> None:
        try:
            with connect(target) as conn:
                results[n] = migrate(conn)
        except BaseException as exc:  # reported by the assertion below
            failures.append(exc)

    with connect(target) as holder:
        # Hold the migration lock so both hosts are surely waiting on it together.
        holder.execute("SELECT pg_advisory_lock(%s)", [MIGRATION_LOCK_KEY])
        threads = [threading.Thread(target=host, args=(n,)) for n in range(2)]
        for thread in threads:
            thread.start()
        wait_for(
            lambda: (
                holder.execute(
                    "SELECT count(*) AS n FROM pg_locks l JOIN pg_database d ON d.oid = l.database"
                    " WHERE l.locktype = 'advisory' AND NOT l.granted"
                    "   AND d.datname = current_database()"
                ).fetchone()
                == {"n": 2}
            )
        )
        holder.execute("SELECT pg_advisory_unlock(%s)", [MIGRATION_LOCK_KEY])
        for thread in threads:
            thread.join(timeout=120)

        assert failures == []
        shipped = [name for name, _ in migration_files()]
        assert sorted(results[0] + results[1]) == shipped  # each file by exactly one host
        recorded = holder.execute("SELECT name FROM schema_migrations ORDER BY name").fetchall()
        assert [r["name"] for r in recorded] == shipped


def test_applied_and_pending_migrations_report_what_has_run(
    empty_conn: Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    shipped = migration_files()
    names = [name for name, _ in shipped]
    assert len(names) >= 2

    assert applied_migrations(empty_conn) == []
    assert pending_migrations(empty_conn) == names
    # Asking does not create the bookkeeping table.
    assert empty_conn.execute(
        "SELECT to_regclass('schema_migrations') IS NULL AS absent"
    ).fetchone() == {"absent": True}

    with monkeypatch.context() as patch:
        patch.setattr(syncctl.migrate, "migration_files", lambda: shipped[:1])
        assert migrate(empty_conn) == names[:1]
    assert [m.name for m in applied_migrations(empty_conn)] == names[:1]
    assert pending_migrations(empty_conn) == names[1:]

    assert migrate(empty_conn) == names[1:]
    applied = applied_migrations(empty_conn)
    assert [m.name for m in applied] == names
    assert applied[0].applied_at <= applied[-1].applied_at
    assert pending_migrations(empty_conn) == []


def test_failed_migration_is_rolled_back_named_and_releases_the_lock(
    empty_conn: Connection, empty_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = ("9999_broken.sql", "CREATE TABLE broken_probe (id int);\nSELECT no_such_function();")
    monkeypatch.setattr(syncctl.migrate, "migration_files", lambda: [*migration_files(), broken])

    with pytest.raises(MigrationFailed, match=r"9999_broken\.sql.*no_such_function"):
        migrate(empty_conn)

    assert empty_conn.execute(
        "SELECT to_regclass('broken_probe') IS NULL AS absent"
    ).fetchone() == {"absent": True}
    assert "9999_broken.sql" not in {m.name for m in applied_migrations(empty_conn)}
    with connect(DatabaseTarget(empty_database_url, "test")) as other:
        locked = other.execute("SELECT pg_try_advisory_lock(%s) AS ok", [MIGRATION_LOCK_KEY])
        assert locked.fetchone() == {"ok": True}


# --- the upgrade of the original system's database ---------------------------------------


def test_upgrade_keeps_every_row_and_brings_them_under_the_rules(legacy_conn: Connection) -> None:
    before = row_ids(legacy_conn)
    assert len(seed_overloads(legacy_conn)["create_sync_chunks"]) == 3

    migrate(legacy_conn)

    assert row_ids(legacy_conn) == before
    assert pending_migrations(legacy_conn) == []
    # Only one of each seed function remains, the one with the documented shape.
    assert all(len(overloads) == 1 for overloads in seed_overloads(legacy_conn).values())

    assert job_statuses(legacy_conn) == {
        job_id(1): "processing",  # chunk 3 still holds it, until the reaper takes it
        job_id(2): "completed",  # every chunk completed: rolled up at last
        job_id(3): "failed",  # one chunk failed
        job_id(4): "cancelled",  # the older of two active jobs of one store
        job_id(5): "pending",
        job_id(6): "failed",  # never got chunks
        job_id(7): "pending",
    }
    jobs = {
        r["id"]: r
        for r in legacy_conn.execute("SELECT id, claimable_at, last_error FROM sync_queue")
    }
    assert jobs[job_id(1)]["claimable_at"] is None
    assert jobs[job_id(5)]["claimable_at"] is not None
    assert jobs[job_id(7)]["claimable_at"] is not None
    assert "newer job" in jobs[job_id(4)]["last_error"]
    assert "without chunks" in jobs[job_id(6)]["last_error"]

    stuck = legacy_conn.execute(
        "SELECT status, lease_expires_at - started_at AS lease, lease_expires_at < now() AS expired"
        "  FROM chunked_sync_jobs WHERE id = %s",
        [chunk_id(1, 3)],
    ).fetchone()
    assert stuck == {"status": "processing", "lease": timedelta(minutes=5), "expired": True}
    attempt = legacy_conn.execute(
        "SELECT attempt, worker_id, outcome FROM chunk_attempts WHERE chunk_id = %s",
        [chunk_id(1, 3)],
    ).fetchall()
    assert attempt == [{"attempt": 1, "worker_id": "bg-2", "outcome": "running"}]

    exhausted = legacy_conn.execute(
        "SELECT status, last_error FROM chunked_sync_jobs WHERE id = %s", [chunk_id(7, 2)]
    ).fetchone()
    assert exhausted is not None
    assert exhausted["status"] == "failed"
    assert "no attempts left" in exhausted["last_error"]
    cancelled = legacy_conn.execute(
        "SELECT DISTINCT status FROM chunked_sync_jobs WHERE parent_sync_job_id = %s",
        [job_id(4)],
    ).fetchall()
    assert cancelled == [{"status": "cancelled"}]
    # The original allowed NULL attempts; counting needs a number.
    nulls = legacy_conn.execute(
        "SELECT attempts, max_attempts FROM chunked_sync_jobs WHERE id = %s", [chunk_id(5, 2)]
    ).fetchone()
    assert nulls == {"attempts": 0, "max_attempts": 3}
    # Jobs planned before time windows keep their offsets, one chunk at a time.
    shapes = legacy_conn.execute(
        "SELECT DISTINCT q.parallel, c.window_end FROM sync_queue q"
        "  JOIN chunked_sync_jobs c ON c.parent_sync_job_id = q.id"
    ).fetchall()
    assert shapes == [{"parallel": 1, "window_end": None}]
    # A store registered without a business can sync: the original demanded one.
    new = legacy_conn.execute(
        "INSERT INTO sync_queue (store_id, business_id) VALUES (%s, NULL) RETURNING parallel",
        ["50000000-0000-0000-0000-000000000003"],
    ).fetchone()
    # Jobs made from now on run up to four chunks at once unless told otherwise.
    assert new == {"parallel": 4}


def test_upgraded_queue_reaps_the_stuck_chunk_and_claims_heads_in_order(
    legacy_conn: Connection,
) -> None:
    migrate(legacy_conn)

    # Job 7 (4 hours old) first, then job 5 (priority NULL sorts last); job 1 is held.
    first = [claim_chunk(legacy_conn, worker_id="w", lease=LEASE) for _ in range(3)]
    assert heads(first) == [(job_id(7), 3), (job_id(5), 1), None]

    reaped = reap(legacy_conn)
    assert [(r.chunk_id, r.new_status) for r in reaped] == [(chunk_id(1, 3), "pending")]
    attempt = legacy_conn.execute(
        "SELECT outcome FROM chunk_attempts WHERE chunk_id = %s", [chunk_id(1, 3)]
    ).fetchone()
    assert attempt == {"outcome": "reaped"}

    resumed = claim_chunk(legacy_conn, worker_id="w", lease=LEASE)
    assert resumed is not None
    assert (resumed.id, resumed.chunk_index, resumed.attempts) == (chunk_id(1, 3), 3, 2)
    for chunk in [*first[:2], resumed]:
        assert chunk is not None
        assert finish_chunk(legacy_conn, chunk, "completed") == "completed"
    assert heads([claim_chunk(legacy_conn, worker_id="w", lease=LEASE)]) == [(job_id(1), 4)]


def test_runbook_runs_unchanged_on_the_upgraded_database(legacy_conn: Connection) -> None:
    migrate(legacy_conn)

    stuck, _ = run_runbook(legacy_conn, "troubleshooting_1_check_stuck_chunks")
    assert [(r["chunk_index"], r["status"], r["attempts"], r["worker_id"]) for r in stuck] == [
        (3, "processing", 1, "bg-2")
    ]

    rates, _ = run_runbook(legacy_conn, "maintenance_2_chunk_success_rate")
    # Chunks of the last 24 hours: jobs 1, 3, 5 and 7 (13 chunks).
    assert {r["status"]: (r["count"], r["percentage"]) for r in rates} == {
        "completed": (5, Decimal("38.46")),
        "pending": (5, Decimal("38.46")),
        "failed": (2, Decimal("15.38")),
        "processing": (1, Decimal("7.69")),
    }

    problems, _ = run_runbook(legacy_conn, "maintenance_3_problem_stores")
    assert sorted((r["name"], r["failed_chunks"], r["total_chunks"]) for r in problems) == [
        ("Billing", 1, 3),
        ("Legal", 1, 3),
    ]

    _, reset = run_runbook(legacy_conn, "troubleshooting_2_reset_stuck_chunks")
    assert reset == 1
    _, deleted = run_runbook(legacy_conn, "maintenance_1_cleanup_old_jobs")
    assert deleted == 1  # job 2: completed, ten days old
    assert job_id(2) not in job_statuses(legacy_conn)
    assert legacy_conn.execute(
        "SELECT count(*) AS n FROM chunked_sync_jobs WHERE parent_sync_job_id = %s", [job_id(2)]
    ).fetchone() == {"n": 0}

    # The hand-run reset left job 1 unclaimable; the reaper repairs it.
    reap(legacy_conn)
    claimed = [claim_chunk(legacy_conn, worker_id="w", lease=LEASE) for _ in range(4)]
    assert heads(claimed) == [(job_id(7), 3), (job_id(1), 3), (job_id(5), 1), None]
    assert claimed[1] is not None
    assert claimed[1].attempts == 2


def test_original_callers_work_on_the_upgraded_database(legacy_conn: Connection) -> None:
    migrate(legacy_conn)
    reap(legacy_conn)

    claim = legacy_conn.execute(
        "SELECT claim_next_chunk_job(p_worker_id => 'bg-3') AS r"
    ).fetchone()
    assert claim is not None
    assert claim["r"]["success"] is True
    # Job 7 is the oldest claimable job: its chunk 2 failed on upgrade, chunk 3 is next.
    assert (claim["r"]["chunk_id"], claim["r"]["chunk_index"]) == (str(chunk_id(7, 3)), 3)

    done = legacy_conn.execute(
        "SELECT complete_chunk_job(p_chunk_job_id => %s, p_status => 'completed',"
        "                          p_processing_time_ms => 4321) AS r",
        [chunk_id(7, 3)],
    ).fetchone()
    assert done is not None
    assert done["r"]["success"] is True
    row = legacy_conn.execute(
        "SELECT status, processing_time_ms FROM chunked_sync_jobs WHERE id = %s", [chunk_id(7, 3)]
    ).fetchone()
    assert row == {"status": "completed", "processing_time_ms": 4321}
    assert job_statuses(legacy_conn)[job_id(7)] == "failed"  # rolled up: chunk 2 failed


# --- a fresh database -------------------------------------------------------------------


def test_runbook_runs_unchanged_on_a_fresh_database(conn: Connection) -> None:
    def new_job(store: str, emails: int) -> UUID:
        job = conn.execute(
            "WITH store AS (INSERT INTO stores (name, email) VALUES (%s, %s) RETURNING id)"
            " INSERT INTO sync_queue (store_id, metadata)"
            " SELECT id, '{\"chunk_size\": 1}' FROM store RETURNING id",
            [store, f"{store}@example.com"],
        ).fetchone()
        assert job is not None
        conn.execute(
            "SELECT create_sync_chunks(p_parent_sync_job_id => %s,"
            "                          p_estimated_email_count => %s)",
            [job["id"], emails],
        )
        return UUID(str(job["id"]))

    stuck_job, failed_job, done_job = new_job("alpha", 3), new_job("beta", 2), new_job("gamma", 1)
    stuck = claim_chunk(conn, worker_id="w1", lease=LEASE)
    assert stuck is not None
    assert stuck.parent_sync_job_id == stuck_job
    # beta's chunk 1 fails for good, its chunk 2 and gamma's only chunk complete.
    for permanent in (True, False, False):
        chunk = claim_chunk(conn, worker_id="w2", lease=LEASE)
        assert chunk is not None
        if permanent:
            finish_chunk(conn, chunk, "permanent", error="mailbox not found")
        else:
            finish_chunk(conn, chunk, "completed")
    assert job_statuses(conn)[failed_job] == "failed"
    assert job_statuses(conn)[done_job] == "completed"
    # The runbook's notion of stuck: processing for more than five minutes.
    conn.execute(
        "UPDATE chunked_sync_jobs SET started_at = now() - interval '10 minutes' WHERE id = %s",
        [stuck.id],
    )
    conn.execute(
        "UPDATE sync_queue SET created_at = now() - interval '8 days' WHERE id = %s", [done_job]
    )

    rows, _ = run_runbook(conn, "troubleshooting_1_check_stuck_chunks")
    assert [(r["chunk_index"], r["status"], r["attempts"], r["worker_id"]) for r in rows] == [
        (1, "processing", 1, "w1")
    ]
    rates, _ = run_runbook(conn, "maintenance_2_chunk_success_rate")
    assert {r["status"]: (r["count"], r["percentage"]) for r in rates} == {
        "completed": (2, Decimal("33.33")),
        "pending": (2, Decimal("33.33")),
        "failed": (1, Decimal("16.67")),
        "processing": (1, Decimal("16.67")),
    }
    problems, _ = run_runbook(conn, "maintenance_3_problem_stores")
    assert [(r["name"], r["email"], r["failed_chunks"], r["total_chunks"]) for r in problems] == [
        ("beta", "beta@example.com", 1, 2)
    ]

    _, reset = run_runbook(conn, "troubleshooting_2_reset_stuck_chunks")
    assert reset == 1
    assert finish_chunk(conn, stuck, "completed") is None  # w1 lost it to the reset
    reap(conn)
    again = claim_chunk(conn, worker_id="w3", lease=LEASE)
    assert again is not None
    assert (again.id, again.attempts) == (stuck.id, 2)

    _, deleted = run_runbook(conn, "maintenance_1_cleanup_old_jobs")
    assert deleted == 1
    assert set(job_statuses(conn)) == {stuck_job, failed_job}


# --- upgrading while workers run ----------------------------------------------------------


def apply_migrations_up_to(conn: Connection, last: str) -> None:
    """Apply the shipped migrations up to and including `last`, as a release that ended there."""
    conn.execute(query("create_schema_migrations"))
    for name, text in migration_files():
        with conn.transaction():
            conn.execute(text)
            conn.execute(query("record_migration"), {"name": name})
        if name == last:
            return
    raise AssertionError(f"no migration {last}")


def test_a_chunk_claimed_before_the_claim_number_fence_is_finished_by_its_old_worker(
    empty_conn: Connection,
) -> None:
    conn = empty_conn
    apply_migrations_up_to(conn, "0007_windows_parallel_fair_claims.sql")
    store = conn.execute(
        "INSERT INTO stores (name, email) VALUES ('old', 'old@example.com') RETURNING id"
    ).fetchone()
    assert store is not None
    job = conn.execute(
        "INSERT INTO sync_queue (store_id, metadata) VALUES (%s, '{\"chunk_size\": 1}')"
        " RETURNING id",
        [store["id"]],
    ).fetchone()
    assert job is not None
    conn.execute("SELECT create_sync_chunks(%s, 'manual', 2)", [job["id"]])
    held = conn.execute("SELECT * FROM syncctl_claim_chunk('old-worker', '1 minute')").fetchone()
    assert held is not None

    assert migrate(conn)[0] == "0008_fence_by_claim_number.sql"

    # The previous release's worker heartbeats and finishes as it always did.
    beat = conn.execute(
        "UPDATE chunked_sync_jobs SET lease_expires_at = now() + interval '1 minute'"
        " WHERE id = %s AND status = 'processing' AND worker_id = 'old-worker' AND attempts = 1"
        " RETURNING id",
        [held["id"]],
    ).fetchone()
    assert beat is not None
    finished = conn.execute(
        "SELECT syncctl_finish_chunk(%s, 'old-worker', 1, 'completed') AS status", [held["id"]]
    ).fetchone()
    assert finished == {"status": "completed"}
    attempts = conn.execute(
        "SELECT attempt, outcome FROM chunk_attempts WHERE chunk_id = %s", [held["id"]]
    ).fetchall()
    assert attempts == [{"attempt": 1, "outcome": "completed"}]
    # The next claim is made by the new rules: a claim number, attempt rows numbered on.
    nxt = claim_chunk(conn, worker_id="new-worker", lease=LEASE)
    assert nxt is not None
    assert nxt.chunk_index == 2
    assert nxt.claim_seq > 0
