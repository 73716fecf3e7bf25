"""The original system's database functions, called by name as its frontend and
background processor call them, on syncctl's schema: same names, same keys,
same rules as syncctl's own workers."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any, LiteralString
from uuid import UUID

import pytest
from psycopg import sql

from syncctl.db import Connection
from syncctl.queue import claim_chunk, finish_chunk, reap

BUSINESS = UUID("b0000000-0000-0000-0000-000000000001")
CLAIM_KEYS = {
    "success",
    "chunk_id",
    "chunk_index",
    "total_chunks",
    "start_offset",
    "end_offset",
    "store_id",
}

LEASE = timedelta(minutes=5)

_mailboxes = itertools.count(1)


def insert_parent(conn: Connection, **columns: Any) -> UUID:
    """A parent job inserted as the original frontend inserts it, for a store of its own."""
    n = next(_mailboxes)
    store = conn.execute(
        "INSERT INTO stores (name, email, business_id) VALUES (%s, %s, %s) RETURNING id",
        [f"store {n}", f"box{n}@example.com", BUSINESS],
    ).fetchone()
    assert store is not None
    values = {
        "business_id": BUSINESS,
        "store_id": store["id"],
        "sync_type": "manual",
        "status": "pending",
        "priority": 1,
        **columns,
    }
    job = conn.execute(
        sql.SQL("INSERT INTO sync_queue ({}) VALUES ({}) RETURNING id").format(
            sql.SQL(", ").join(map(sql.Identifier, values)),
            sql.SQL(", ").join(map(sql.Placeholder, values)),
        ),
        values,
    ).fetchone()
    assert job is not None
    return UUID(str(job["id"]))


def call_by_name(conn: Connection, function: LiteralString, **arguments: Any) -> dict[str, Any]:
    """Call a seed function with named arguments, as supabase.rpc() does through PostgREST."""
    row = conn.execute(
        sql.SQL("SELECT {}({}) AS r").format(
            sql.Identifier(function),
            sql.SQL(", ").join(
                sql.SQL("{} => {}").format(sql.Identifier(name), sql.Placeholder(name))
                for name in arguments
            ),
        ),
        arguments,
    ).fetchone()
    assert row is not None
    result: dict[str, Any] = row["r"]
    return result


def create_sync_chunks(conn: Connection, job_id: UUID, **arguments: Any) -> dict[str, Any]:
    return call_by_name(conn, "create_sync_chunks", p_parent_sync_job_id=job_id, **arguments)


def claim_next_chunk_job(conn: Connection, worker_id: str) -> dict[str, Any]:
    return call_by_name(conn, "claim_next_chunk_job", p_worker_id=worker_id)


def complete_chunk_job(conn: Connection, chunk_id: Any, **arguments: Any) -> dict[str, Any]:
    return call_by_name(conn, "complete_chunk_job", p_chunk_job_id=chunk_id, **arguments)


def chunks_of(conn: Connection, job_id: UUID) -> list[dict[str, Any]]:
    return conn.execute(
        "SELECT chunk_index, total_chunks, start_offset, end_offset, estimated_emails, status,"
        "       processing_time_ms"
        "  FROM chunked_sync_jobs WHERE parent_sync_job_id = %s ORDER BY chunk_index",
        [job_id],
    ).fetchall()


def job_status(conn: Connection, job_id: UUID) -> str:
    row = conn.execute("SELECT status FROM sync_queue WHERE id = %s", [job_id]).fetchone()
    assert row is not None
    status: str = row["status"]
    return status


def test_each_seed_function_exists_once_with_its_documented_arguments(conn: Connection) -> None:
    rows = conn.execute(
        "SELECT proname, proargnames, pronargdefaults, pg_get_function_result(oid) AS result"
        "  FROM pg_proc"
        " WHERE proname IN ('create_sync_chunks', 'claim_next_chunk_job', 'complete_chunk_job')"
        " ORDER BY proname"
    ).fetchall()

    assert rows == [
        {
            "proname": "claim_next_chunk_job",
            "proargnames": ["p_worker_id"],
            "pronargdefaults": 0,
            "result": "jsonb",
        },
        {
            "proname": "complete_chunk_job",
            "proargnames": ["p_chunk_job_id", "p_status", "p_processing_time_ms"],
            "pronargdefaults": 2,
            "result": "jsonb",
        },
        {
            "proname": "create_sync_chunks",
            "proargnames": [
                "p_parent_sync_job_id",
                "p_sync_type",
                "p_estimated_email_count",
                "p_sync_from",
                "p_sync_to",
            ],
            "pronargdefaults": 4,
            "result": "jsonb",
        },
    ]


def test_create_sync_chunks_by_name_plans_contiguous_chunks_and_freezes_the_window(
    conn: Connection,
) -> None:
    job = insert_parent(conn, sync_type="initial")

    result = create_sync_chunks(
        conn,
        job,
        p_sync_type="initial",
        p_estimated_email_count=2500,
        p_sync_from="2025-01-01T00:00:00Z",
        p_sync_to="2025-06-01T00:00:00Z",
    )

    assert result["success"] is True
    assert (result["total_chunks"], result["chunk_size"], result["estimated_email_count"]) == (
        3,
        1000,
        2500,
    )
    assert [
        (c["chunk_index"], c["total_chunks"], c["start_offset"], c["end_offset"], c["status"])
        for c in chunks_of(conn, job)
    ] == [
        (1, 3, 0, 999, "pending"),
        (2, 3, 1000, 1999, "pending"),
        (3, 3, 2000, 2499, "pending"),
    ]
    window = conn.execute(
        "SELECT sync_from, sync_to, claimable_at IS NOT NULL AS claimable FROM sync_queue"
        " WHERE id = %s",
        [job],
    ).fetchone()
    assert window == {
        "sync_from": datetime(2025, 1, 1, tzinfo=UTC),
        "sync_to": datetime(2025, 6, 1, tzinfo=UTC),
        "claimable": True,
    }


def test_create_sync_chunks_with_only_the_job_id_uses_the_original_defaults(
    conn: Connection,
) -> None:
    job = insert_parent(conn)

    result = create_sync_chunks(conn, job)

    # The original frontend's fallback count is 100 messages: one chunk.
    assert (result["success"], result["total_chunks"], result["estimated_email_count"]) == (
        True,
        1,
        100,
    )
    window = conn.execute(
        "SELECT sync_to = created_at AS frozen_at_creation FROM sync_queue WHERE id = %s", [job]
    ).fetchone()
    assert window == {"frozen_at_creation": True}


def test_create_sync_chunks_takes_empty_dates_as_unset(conn: Connection) -> None:
    job = insert_parent(conn)

    result = create_sync_chunks(conn, job, p_estimated_email_count=10, p_sync_from="", p_sync_to="")

    assert result["success"] is True


def test_create_sync_chunks_with_no_messages_completes_the_job_at_once(conn: Connection) -> None:
    job = insert_parent(conn)

    result = create_sync_chunks(conn, job, p_estimated_email_count=0)

    assert (result["success"], result["total_chunks"]) == (True, 0)
    assert chunks_of(conn, job) == []
    assert job_status(conn, job) == "completed"


def test_create_sync_chunks_refuses_unknown_or_already_chunked_jobs(conn: Connection) -> None:
    job = insert_parent(conn)
    create_sync_chunks(conn, job, p_estimated_email_count=10)

    again = create_sync_chunks(conn, job, p_estimated_email_count=10)
    unknown = create_sync_chunks(conn, UUID(int=7))

    assert again["success"] is False
    assert "already exist" in again["error"]
    assert unknown["success"] is False
    assert "not found" in unknown["error"]
    assert len(chunks_of(conn, job)) == 1


def test_create_sync_chunks_ignores_a_chunk_size_that_is_not_a_whole_number(
    conn: Connection,
) -> None:
    job = insert_parent(conn, metadata='{"chunk_size": "large"}')

    result = create_sync_chunks(conn, job, p_estimated_email_count=2500)

    assert (result["success"], result["chunk_size"]) == (True, 1000)


def test_claim_next_chunk_job_returns_the_documented_keys(conn: Connection) -> None:
    job = insert_parent(conn, metadata='{"chunk_size": 40}')
    create_sync_chunks(conn, job, p_estimated_email_count=100)

    claim = claim_next_chunk_job(conn, "edge-1")

    assert set(claim) >= CLAIM_KEYS
    row = conn.execute(
        "SELECT id, parent_sync_job_id, store_id, worker_id, status FROM chunked_sync_jobs"
        " WHERE chunk_index = 1"
    ).fetchone()
    assert row is not None
    assert claim["success"] is True
    assert {k: claim[k] for k in CLAIM_KEYS - {"success"}} == {
        "chunk_id": str(row["id"]),
        "chunk_index": 1,
        "total_chunks": 3,
        "start_offset": 0,
        "end_offset": 39,
        "store_id": str(row["store_id"]),
    }
    assert (row["worker_id"], row["status"]) == ("edge-1", "processing")


def test_claim_next_chunk_job_reports_no_work_with_success_false(conn: Connection) -> None:
    assert claim_next_chunk_job(conn, "edge-1")["success"] is False


def test_seed_claim_follows_the_sequential_rule(conn: Connection) -> None:
    job = insert_parent(conn, metadata='{"chunk_size": 1}')
    create_sync_chunks(conn, job, p_estimated_email_count=3)

    first = claim_next_chunk_job(conn, "edge-1")
    blocked = claim_next_chunk_job(conn, "edge-2")

    assert first["chunk_index"] == 1
    assert blocked["success"] is False  # chunk 2 waits while chunk 1 is processing
    assert claim_chunk(conn, worker_id="syncctl-1", lease=LEASE) is None

    assert complete_chunk_job(conn, first["chunk_id"], p_status="completed")["success"] is True
    assert claim_next_chunk_job(conn, "edge-2")["chunk_index"] == 2


def test_create_sync_chunks_makes_a_sequential_job(conn: Connection) -> None:
    job = insert_parent(conn, metadata='{"chunk_size": 1}')
    create_sync_chunks(conn, job, p_estimated_email_count=3)

    row = conn.execute("SELECT parallel FROM sync_queue WHERE id = %s", [job]).fetchone()
    assert row == {"parallel": 1}  # the original system's rule: one chunk at a time


def test_seed_claim_honours_the_parallel_setting_of_a_job(conn: Connection) -> None:
    job = insert_parent(conn, metadata='{"chunk_size": 1}')
    create_sync_chunks(conn, job, p_estimated_email_count=4)
    # A job syncctl created runs up to `parallel` chunks at once, whoever claims them.
    conn.execute("UPDATE sync_queue SET parallel = 3 WHERE id = %s", [job])
    conn.execute("SELECT syncctl_refresh_job(%s)", [job])

    claimed = [claim_next_chunk_job(conn, f"edge-{n}") for n in range(4)]

    assert [c["success"] for c in claimed] == [True, True, True, False]
    assert [c["chunk_index"] for c in claimed[:3]] == [1, 2, 3]
    complete_chunk_job(conn, claimed[1]["chunk_id"], p_status="completed")
    assert claim_next_chunk_job(conn, "edge-5")["chunk_index"] == 4


def test_seed_and_syncctl_workers_share_one_queue(conn: Connection) -> None:
    older = insert_parent(conn, metadata='{"chunk_size": 1}')
    create_sync_chunks(conn, older, p_estimated_email_count=2)
    newer = insert_parent(conn, metadata='{"chunk_size": 1}')
    create_sync_chunks(conn, newer, p_estimated_email_count=2)

    edge = claim_next_chunk_job(conn, "edge-1")
    ours = claim_chunk(conn, worker_id="syncctl-1", lease=LEASE)

    assert (edge["parent_sync_job_id"], edge["chunk_index"]) == (str(older), 1)
    assert ours is not None
    assert (ours.parent_sync_job_id, ours.chunk_index) == (newer, 1)
    finish_chunk(conn, ours, "completed")
    complete_chunk_job(conn, edge["chunk_id"], p_status="completed")
    # The older job comes first again, whoever asks.
    nxt = claim_chunk(conn, worker_id="syncctl-1", lease=LEASE)
    assert nxt is not None
    assert (nxt.parent_sync_job_id, nxt.chunk_index) == (older, 2)


def test_complete_chunk_job_cannot_change_a_chunk_a_syncctl_worker_holds(
    conn: Connection,
) -> None:
    job = insert_parent(conn, metadata='{"chunk_size": 1}')
    create_sync_chunks(conn, job, p_estimated_email_count=1)
    edge = claim_next_chunk_job(conn, "edge-1")
    # The original caller stalls past its lease; it is reaped and a syncctl worker takes over.
    conn.execute(
        "UPDATE chunked_sync_jobs SET lease_expires_at = now() - interval '1 second' WHERE id = %s",
        [edge["chunk_id"]],
    )
    reap(conn)
    ours = claim_chunk(conn, worker_id="syncctl-1", lease=LEASE)
    assert ours is not None
    assert str(ours.id) == edge["chunk_id"]

    late = complete_chunk_job(conn, edge["chunk_id"], p_status="failed")

    assert late == {"success": False, "error": "chunk is held by a syncctl worker now"}
    row = conn.execute(
        "SELECT status, worker_id, attempts FROM chunked_sync_jobs WHERE id = %s", [ours.id]
    ).fetchone()
    assert row == {"status": "processing", "worker_id": "syncctl-1", "attempts": 2}
    assert finish_chunk(conn, ours, "completed") == "completed"


def test_complete_chunk_job_records_processing_time_and_rolls_the_parent_up(
    conn: Connection,
) -> None:
    job = insert_parent(conn, metadata='{"chunk_size": 1}')
    create_sync_chunks(conn, job, p_estimated_email_count=2)

    first = claim_next_chunk_job(conn, "edge-1")
    done = complete_chunk_job(
        conn, first["chunk_id"], p_status="completed", p_processing_time_ms=1234
    )
    assert done == {"success": True, "chunk_id": first["chunk_id"], "status": "completed"}
    assert job_status(conn, job) == "processing"

    # The background processor passes no time: it is measured.
    second = claim_next_chunk_job(conn, "edge-1")
    complete_chunk_job(conn, second["chunk_id"], p_status="completed")

    chunks = chunks_of(conn, job)
    assert (chunks[0]["status"], chunks[0]["processing_time_ms"]) == ("completed", 1234)
    assert chunks[1]["status"] == "completed"
    assert chunks[1]["processing_time_ms"] >= 0
    assert job_status(conn, job) == "completed"


def test_complete_chunk_job_failed_retries_until_attempts_run_out(conn: Connection) -> None:
    job = insert_parent(conn, metadata='{"chunk_size": 1}', max_attempts=2)
    create_sync_chunks(conn, job, p_estimated_email_count=1)

    first = claim_next_chunk_job(conn, "edge-1")
    assert complete_chunk_job(conn, first["chunk_id"], p_status="failed")["status"] == "pending"
    # Skip the backoff: this test is about attempts, not time.
    conn.execute("UPDATE chunked_sync_jobs SET not_before = NULL")
    conn.execute("UPDATE sync_queue SET claimable_at = now()")
    second = claim_next_chunk_job(conn, "edge-1")
    assert (second["chunk_id"], second["attempt"]) == (first["chunk_id"], 2)

    assert complete_chunk_job(conn, second["chunk_id"], p_status="failed")["status"] == "failed"
    assert job_status(conn, job) == "failed"


@pytest.mark.parametrize("status", ["processing", "done", None])
def test_complete_chunk_job_refuses_other_statuses(conn: Connection, status: str | None) -> None:
    job = insert_parent(conn)
    create_sync_chunks(conn, job, p_estimated_email_count=1)
    claim = claim_next_chunk_job(conn, "edge-1")

    result = complete_chunk_job(conn, claim["chunk_id"], p_status=status)

    assert result["success"] is False
    assert [c["status"] for c in chunks_of(conn, job)] == ["processing"]


def test_complete_chunk_job_on_a_chunk_not_processing_changes_nothing(conn: Connection) -> None:
    job = insert_parent(conn)
    create_sync_chunks(conn, job, p_estimated_email_count=1)
    row = conn.execute("SELECT id FROM chunked_sync_jobs").fetchone()
    assert row is not None

    result = complete_chunk_job(conn, row["id"], p_status="completed")

    assert result["success"] is False
    assert [c["status"] for c in chunks_of(conn, job)] == ["pending"]
