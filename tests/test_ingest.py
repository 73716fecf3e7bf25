"""Writing pages of messages into `emails`, against real PostgreSQL."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from fakes import CountOnly
from syncctl.db import Connection
from syncctl.ingest import LeaseLost, write_page
from syncctl.jobs import add_store, create_job
from syncctl.mailsource import Message
from syncctl.queue import Chunk, claim_chunk

LEASE = timedelta(minutes=5)
T0 = datetime(2024, 3, 1, 9, 30, tzinfo=UTC)


def claimed_chunk(conn: Connection, email: str = "ann@example.com") -> Chunk:
    add_store(conn, name="Ann", email=email)
    create_job(conn, CountOnly(1000), store_ref=email, chunk_size=1000)
    chunk = claim_chunk(conn, worker_id="worker-1", lease=LEASE)
    assert chunk is not None
    return chunk


def message(number: int, **fields: Any) -> Message:
    values: dict[str, Any] = {
        "provider_message_id": f"AAMkAG-{number}",
        "received_at": T0 + timedelta(minutes=number),
        "subject": f"Message {number}",
        "from_address": "megan@contoso.com",
        "body": f"<p>Body {number}</p>",
        "body_content_type": "html",
    }
    values.update(fields)
    return Message(**values)


def emails(conn: Connection) -> list[dict[str, Any]]:
    return conn.execute(
        "SELECT xmin::text AS version, * FROM emails ORDER BY provider_message_id"
    ).fetchall()


def chunk_row(conn: Connection, chunk: Chunk) -> dict[str, Any]:
    row = conn.execute(
        "SELECT checkpoint, emails_synced, processing_time_ms, lease_expires_at, heartbeat_at"
        " FROM chunked_sync_jobs WHERE id = %s",
        (chunk.id,),
    ).fetchone()
    assert row is not None
    return row


@pytest.fixture
def chunk(conn: Connection) -> Chunk:
    return claimed_chunk(conn)


def test_page_is_stored_with_every_field_and_checkpoint(conn: Connection, chunk: Chunk) -> None:
    full = Message(
        provider_message_id="AAMkAGVmMDEzK",
        received_at=T0,
        internet_message_id="<DM5PR1501MB2117@namprd15.prod.outlook.com>",
        conversation_id="AAQkAGVmMDEzE",
        subject="MyAnalytics | Your past week",
        from_address="no-reply@contoso.com",
        from_name="MyAnalytics",
        to_recipients=[{"name": "Megan Bowen", "address": "MeganB@contoso.com"}],
        cc_recipients=[{"name": "Adele Vance", "address": "AdeleV@contoso.com"}],
        bcc_recipients=[],
        sent_at=T0 - timedelta(seconds=5),
        is_read=False,
        is_draft=False,
        has_attachments=True,
        importance="high",
        flag_status="flagged",
        body_content_type="html",
        body="<html><body>Hi</body></html>",
    )
    synced = write_page(
        conn, chunk, [full, message(2)], checkpoint={"next_link": "L2", "read": 2}, lease=LEASE
    )

    assert synced == 2
    rows = emails(conn)
    assert [r["provider_message_id"] for r in rows] == ["AAMkAG-2", "AAMkAGVmMDEzK"]
    stored = rows[1]
    for name, value in full.__dict__.items():
        assert stored[name] == value, name
    assert stored["store_id"] == chunk.store_id
    assert stored["sync_job_id"] == chunk.parent_sync_job_id
    state = chunk_row(conn, chunk)
    assert state["checkpoint"] == {"next_link": "L2", "read": 2}
    assert state["emails_synced"] == 2
    assert state["processing_time_ms"] is not None
    assert state["lease_expires_at"] > datetime.now(UTC) + LEASE - timedelta(minutes=1)


def test_emails_synced_and_processing_time_grow_with_each_page(
    conn: Connection, chunk: Chunk
) -> None:
    write_page(conn, chunk, [message(1), message(2)], checkpoint={"read": 2}, lease=LEASE)
    first = chunk_row(conn, chunk)
    conn.execute("SELECT pg_sleep(0.05)")
    synced = write_page(
        conn, chunk, [message(3), message(4), message(5)], checkpoint={"read": 5}, lease=LEASE
    )

    second = chunk_row(conn, chunk)
    assert (first["emails_synced"], synced, second["emails_synced"]) == (2, 5, 5)
    assert second["processing_time_ms"] > first["processing_time_ms"]
    assert second["checkpoint"] == {"read": 5}


def test_text_postgresql_cannot_hold_is_cleaned(conn: Connection, chunk: Chunk) -> None:
    dirty = message(
        1,
        subject="Quarterly\x00 report \ud83d",
        from_name="Zo\x00ë",
        body="a\x00b" * 3,
        to_recipients=[{"name": "Ann\x00", "address": "ann@x\x00.com", "k\x00": ["\udc00"]}],
        cc_recipients=[{"name": "\ud800half", "address": None}],
    )
    write_page(conn, chunk, [dirty], checkpoint={"next_link": "x\x00y"}, lease=LEASE)

    stored = emails(conn)[0]
    assert stored["subject"] == "Quarterly report \ufffd"
    assert stored["from_name"] == "Zoë"
    assert stored["body"] == "ababab"
    assert stored["to_recipients"] == [{"name": "Ann", "address": "ann@x.com", "k": ["\ufffd"]}]
    assert stored["cc_recipients"] == [{"name": "\ufffdhalf", "address": None}]
    assert chunk_row(conn, chunk)["checkpoint"] == {"next_link": "xy"}


@pytest.mark.parametrize(
    ("subject", "stored_subject"),
    [
        ("a NUL\x00 alone", "a NUL alone"),  # refused by the server
        ("a lone \udfff alone", "a lone \ufffd alone"),  # refused by the client
    ],
)
def test_page_refused_for_its_text_is_stored_cleaned(
    conn: Connection, chunk: Chunk, subject: str, stored_subject: str
) -> None:
    page = [message(1), message(2, subject=subject), message(3)]
    synced = write_page(conn, chunk, page, checkpoint={"read": 3}, lease=LEASE)

    assert synced == 3
    assert [r["subject"] for r in emails(conn)] == ["Message 1", stored_subject, "Message 3"]


def test_odd_and_huge_messages_are_stored(conn: Connection, chunk: Chunk) -> None:
    huge = "<p>" + "x" * (5 * 1024 * 1024) + "</p>"
    odd = [
        Message(provider_message_id="no-fields", received_at=None),
        message(2, subject=None, from_address=None, body=""),
        message(3, body=huge, subject="", importance="weird"),
    ]
    write_page(conn, chunk, odd, checkpoint={"read": 3}, lease=LEASE)

    rows = {r["provider_message_id"]: r for r in emails(conn)}
    assert rows["no-fields"]["received_at"] is None
    assert rows["no-fields"]["to_recipients"] == []
    assert (rows["AAMkAG-2"]["subject"], rows["AAMkAG-2"]["body"]) == (None, "")
    assert rows["AAMkAG-3"]["body"] == huge


def test_page_with_every_time_missing_is_stored(conn: Connection, chunk: Chunk) -> None:
    write_page(
        conn,
        chunk,
        [Message(provider_message_id="a", received_at=None)],
        checkpoint={},
        lease=LEASE,
    )
    assert [r["provider_message_id"] for r in emails(conn)] == ["a"]


def test_time_without_a_zone_is_stored_as_utc(conn: Connection, chunk: Chunk) -> None:
    naive = datetime(2024, 3, 1, 9, 30)
    conn.execute("SET TIME ZONE 'America/New_York'")
    # New (COPY), then stored again with a change (upsert): both read the time as UTC.
    write_page(conn, chunk, [message(1, received_at=naive)], checkpoint={}, lease=LEASE)
    first = emails(conn)[0]["received_at"]
    write_page(
        conn, chunk, [message(1, received_at=naive, sent_at=naive)], checkpoint={}, lease=LEASE
    )
    row = emails(conn)[0]

    assert first == row["received_at"] == row["sent_at"] == naive.replace(tzinfo=UTC)


def test_same_page_twice_changes_nothing(conn: Connection, chunk: Chunk) -> None:
    page = [message(n, to_recipients=[{"name": "B", "address": "b@x.com"}]) for n in range(5)]
    write_page(conn, chunk, page, checkpoint={"read": 5}, lease=LEASE)
    before = emails(conn)

    write_page(conn, chunk, page, checkpoint={"read": 5}, lease=LEASE)

    # Same rows, same row versions (xmin): the retry wrote nothing.
    assert emails(conn) == before


def test_overlapping_pages_store_each_message_once(conn: Connection, chunk: Chunk) -> None:
    write_page(conn, chunk, [message(n) for n in range(10)], checkpoint={}, lease=LEASE)
    write_page(conn, chunk, [message(n) for n in range(5, 15)], checkpoint={}, lease=LEASE)

    assert [r["provider_message_id"] for r in emails(conn)] == sorted(
        f"AAMkAG-{n}" for n in range(15)
    )


def test_changed_message_is_updated_in_place(conn: Connection, chunk: Chunk) -> None:
    write_page(conn, chunk, [message(1, is_read=False)], checkpoint={}, lease=LEASE)
    write_page(conn, chunk, [message(1, is_read=True)], checkpoint={}, lease=LEASE)

    rows = emails(conn)
    assert len(rows) == 1
    assert rows[0]["is_read"] is True


def test_message_twice_in_one_page_is_stored_once(conn: Connection, chunk: Chunk) -> None:
    page = [message(1, subject="first"), message(2), message(1, subject="second")]
    synced = write_page(conn, chunk, page, checkpoint={}, lease=LEASE)

    rows = emails(conn)
    assert [r["subject"] for r in rows] == ["second", "Message 2"]
    assert synced == 3  # messages received, as the chunk counts them


def test_page_of_a_lost_lease_writes_nothing(conn: Connection, chunk: Chunk) -> None:
    stale = replace(chunk, claim_seq=chunk.claim_seq - 1)  # an earlier claim of the chunk

    with pytest.raises(LeaseLost):
        write_page(conn, stale, [message(1)], checkpoint={"read": 1}, lease=LEASE)

    assert emails(conn) == []
    assert chunk_row(conn, chunk)["checkpoint"] is None


def test_failing_page_leaves_checkpoint_and_mail_untouched(conn: Connection, chunk: Chunk) -> None:
    write_page(conn, chunk, [message(1)], checkpoint={"read": 1}, lease=LEASE)
    broken = [message(2), replace(message(3), provider_message_id=None)]  # type: ignore[arg-type]

    with pytest.raises(psycopg.errors.NotNullViolation):
        write_page(conn, chunk, broken, checkpoint={"read": 3}, lease=LEASE)

    assert [r["provider_message_id"] for r in emails(conn)] == ["AAMkAG-1"]
    state = chunk_row(conn, chunk)
    assert (state["checkpoint"], state["emails_synced"]) == ({"read": 1}, 1)


def test_empty_page_advances_the_checkpoint_only(conn: Connection, chunk: Chunk) -> None:
    synced = write_page(conn, chunk, [], checkpoint={"next_link": None, "read": 0}, lease=LEASE)

    assert synced == 0
    assert emails(conn) == []
    assert chunk_row(conn, chunk)["checkpoint"] == {"next_link": None, "read": 0}


def test_messages_of_two_stores_with_one_id_are_kept_apart(conn: Connection) -> None:
    first = claimed_chunk(conn, "ann@example.com")
    second = claimed_chunk(conn, "bob@example.com")
    write_page(conn, first, [message(1, subject="Ann's")], checkpoint={}, lease=LEASE)
    write_page(conn, second, [message(1, subject="Bob's")], checkpoint={}, lease=LEASE)

    assert sorted(r["subject"] for r in emails(conn)) == ["Ann's", "Bob's"]
