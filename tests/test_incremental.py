"""Incremental jobs, run as an operator runs them: the installed command,
worker processes, the local Graph server's folders and delta queries over
real HTTP, real PostgreSQL. After a full sync, rounds mirror new, edited,
moved and deleted mail; a killed worker resumes its round; an expired delta
token costs a full round of that folder and nothing else; a quiet round
writes nothing."""

from __future__ import annotations

import json
import os
import signal
import threading
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from commandline import drain, environment, start_worker, syncctl
from helpers import wait_for
from syncctl.fakegraph import FakeGraphServer

Db = psycopg.Connection[dict[str, Any]]


def add_store(email: str, env: dict[str, str]) -> None:
    syncctl("store", "add", "--name", email.partition("@")[0], "--email", email, env=env)


def incremental_round(email: str, env: dict[str, str], *args: str) -> dict[str, Any]:
    """Create an incremental job for the store and drain it; the job as created (JSON)."""
    created = syncctl("create", email, "--type", "incremental", "--json", *args, env=env)
    drain(env=env)
    document: dict[str, Any] = json.loads(created.stdout)
    return document


def rows(db: Db, email: str) -> dict[str, dict[str, Any]]:
    found = db.execute(
        "SELECT e.provider_message_id, e.folder_id, e.change_key, e.deleted_at, e.is_read,"
        " e.subject FROM emails e JOIN stores s ON s.id = e.store_id WHERE s.email = %s",
        (email,),
    ).fetchall()
    return {row["provider_message_id"]: row for row in found}


def assert_mirrored(db: Db, server: FakeGraphServer, email: str) -> None:
    """Every message in the mailbox is stored in its folder, at its version, not
    marked deleted; every stored message no longer in the mailbox is marked."""
    stored = rows(db, email)
    held: dict[str, str] = {}
    for folder in server.folders(email):
        for message_id in server.message_ids(email, folder=folder["id"]):
            held[message_id] = folder["id"]
    missing = set(held) - set(stored)
    assert not missing, f"{len(missing)} messages in the mailbox were never stored"
    wrong_folder = [m for m, f in held.items() if stored[m]["folder_id"] != f]
    assert not wrong_folder, f"{len(wrong_folder)} messages stored in the wrong folder"
    marked = [m for m in held if stored[m]["deleted_at"] is not None]
    assert not marked, f"{len(marked)} messages in the mailbox are marked deleted"
    unmarked = [m for m, row in stored.items() if m not in held and row["deleted_at"] is None]
    assert not unmarked, f"{len(unmarked)} messages gone from the mailbox are not marked deleted"


def row_versions(db: Db) -> dict[str, tuple[int, int]]:
    """Each row's (xmin, xmax): a write changes xmin, a row lock sets xmax."""
    return {
        row["provider_message_id"]: (row["xmin"], row["xmax"])
        for row in db.execute(
            "SELECT provider_message_id, xmin::text::bigint AS xmin, xmax::text::bigint AS xmax"
            " FROM emails"
        ).fetchall()
    }


def delta_requests(server: FakeGraphServer) -> list[Any]:
    return [r for r in server.requests if r.path.endswith("/messages/delta")]


def test_changes_between_rounds_are_mirrored_whatever_order_folders_run(
    database_url: str, db: Db
) -> None:
    email = "churn@contoso.test"
    with FakeGraphServer({email: 3000}, seed=21) as server:
        env = environment(database_url, server)
        add_store(email, env)
        syncctl("create", email, env=env)
        drain(env=env)
        first = incremental_round(email, env)
        assert {c["round"] for c in first["chunks"]} == {"full"}
        assert_mirrored(db, server, email)

        folders = {f["name"]: f["id"] for f in server.folders(email)}
        inbox, archive = folders["Inbox"], folders["Archive"]
        in_inbox = server.message_ids(email, folder=inbox)
        in_archive = server.message_ids(email, folder=archive)
        # Moves both ways between Inbox and Archive: whichever folder's chunk
        # runs first, one move meets its removal first and the other its addition.
        server.move_messages(email, [server.index_of(email, m) for m in in_inbox[:20]], archive)
        server.move_messages(email, [server.index_of(email, m) for m in in_archive[:10]], inbox)
        server.edit_messages(email, [server.index_of(email, m) for m in in_inbox[20:35]])
        gone = in_inbox[35:60]
        server.delete_messages(email, [server.index_of(email, m) for m in gone])
        added = server.add_messages(email, [datetime.now(UTC)] * 12, folder=archive)
        edited_before = {m: rows(db, email)[m]["change_key"] for m in in_inbox[20:35]}

        second = incremental_round(email, env, "--parallel", "1")
        assert {c["round"] for c in second["chunks"]} == {"delta"}
        assert_mirrored(db, server, email)
        stored = rows(db, email)
        assert all(stored[m]["deleted_at"] is not None for m in gone)
        assert all(stored[m]["folder_id"] == archive for m in in_inbox[:20] + added)
        assert all(stored[m]["change_key"] != edited_before[m] for m in edited_before)

        # And with the folders' rounds at once, moved back.
        server.move_messages(email, [server.index_of(email, m) for m in in_inbox[:20]], inbox)
        incremental_round(email, env, "--parallel", "4")
        assert_mirrored(db, server, email)


def test_a_round_with_no_changes_writes_nothing_and_asks_once_per_folder(
    database_url: str, db: Db
) -> None:
    email = "quiet@contoso.test"
    with FakeGraphServer({email: 2000}, seed=22) as server:
        env = environment(database_url, server)
        add_store(email, env)
        incremental_round(email, env)
        versions = {
            row["provider_message_id"]: (row["xmin"], row["synced_at"])
            for row in db.execute(
                "SELECT provider_message_id, xmin::text::bigint AS xmin, synced_at FROM emails"
            ).fetchall()
        }
        server.reset_record()
        incremental_round(email, env)
        after = {
            row["provider_message_id"]: (row["xmin"], row["synced_at"])
            for row in db.execute(
                "SELECT provider_message_id, xmin::text::bigint AS xmin, synced_at FROM emails"
            ).fetchall()
        }
        assert after == versions
        assert len(delta_requests(server)) == len(server.folders(email))
        synced = db.execute(
            "SELECT sum(emails_synced) AS n FROM chunked_sync_jobs c"
            " JOIN sync_queue q ON q.id = c.parent_sync_job_id"
            " WHERE q.created_at = (SELECT max(created_at) FROM sync_queue)"
        ).fetchone()
        assert synced is not None
        assert synced["n"] == 0


def test_first_round_after_a_full_sync_marks_what_was_deleted_meanwhile(
    database_url: str, db: Db
) -> None:
    email = "after-full@contoso.test"
    with FakeGraphServer({email: 2500}, seed=23) as server:
        env = environment(database_url, server)
        add_store(email, env)
        syncctl("create", email, env=env)
        drain(env=env)
        full_rows = rows(db, email)
        assert all(row["folder_id"] for row in full_rows.values())
        versions = row_versions(db)
        gone = server.delete_oldest(email, 40)
        incremental_round(email, env)
        # Rows the round read and found stored as they are were not written,
        # nor even locked (a lock leaves its transaction in xmax).
        after = row_versions(db)
        untouched = set(versions) - set(gone)
        assert {m: after[m] for m in untouched} == {m: versions[m] for m in untouched}
        assert_mirrored(db, server, email)
        stored = rows(db, email)
        assert all(stored[m]["deleted_at"] is not None for m in gone)
        assert len(stored) == len(full_rows)  # rows are marked, never removed


def test_an_expired_delta_token_costs_a_full_round_of_that_folder_and_finds_deletions(
    database_url: str, db: Db
) -> None:
    email = "expired@contoso.test"
    with FakeGraphServer({email: 2000}, seed=24) as server:
        env = environment(database_url, server)
        add_store(email, env)
        incremental_round(email, env)
        inbox = next(f["id"] for f in server.folders(email) if f["name"] == "Inbox")
        gone = server.message_ids(email, folder=inbox)[:30]
        server.delete_messages(email, [server.index_of(email, m) for m in gone])
        server.expire_delta_tokens(email)
        server.reset_record()
        incremental_round(email, env)
        assert_mirrored(db, server, email)
        assert all(rows(db, email)[m]["deleted_at"] is not None for m in gone)
        assert any(r.status == 410 for r in delta_requests(server))
        reasons = db.execute(
            "SELECT c.folder_name, c.checkpoint ->> 'full_reason' AS reason"
            " FROM chunked_sync_jobs c JOIN sync_queue q ON q.id = c.parent_sync_job_id"
            " WHERE q.created_at = (SELECT max(created_at) FROM sync_queue)"
        ).fetchall()
        assert all(r["reason"] and "full round" in r["reason"] for r in reasons)


def test_a_worker_killed_mid_round_is_resumed_from_its_link(database_url: str, db: Db) -> None:
    email = "killed@contoso.test"
    with FakeGraphServer({email: 6000}, seed=25, folders=["Inbox"]) as server:
        env = environment(database_url, server)
        add_store(email, env)
        syncctl("create", email, "--type", "incremental", env=env)
        pages = 0
        release = threading.Event()

        def hold_third_page(mailbox: str, query: dict[str, str]) -> None:
            # The worker's only requests are the round's pages.
            nonlocal pages
            pages += 1
            if pages == 3:
                release.wait(30)

        server.before_answer = hold_third_page
        worker = start_worker("--lease", "5s", env=env)
        try:
            wait_for(lambda: pages >= 3, what="the third page of the round")
            worker.send_signal(signal.SIGKILL)
            worker.wait(10)
        finally:
            release.set()
            if worker.poll() is None:
                worker.kill()
            worker.communicate()
        server.before_answer = None
        checkpoint = db.execute("SELECT checkpoint FROM chunked_sync_jobs").fetchone()
        assert checkpoint is not None
        assert checkpoint["checkpoint"]["link"]
        server.reset_record()

        def reaped() -> bool:
            syncctl("reap", env=env)
            row = db.execute("SELECT status FROM chunked_sync_jobs").fetchone()
            return row is not None and row["status"] == "pending"

        wait_for(reaped, what="the lease to lapse and the chunk to be reaped", timeout=30)
        drain(env=env)
        assert_mirrored(db, server, email)
        fresh_starts = [r for r in delta_requests(server) if "$skiptoken" not in r.query]
        assert fresh_starts == [], "the resumed round started again from the first page"


def test_a_new_folder_gets_a_full_round_and_a_deleted_one_is_marked(
    database_url: str, db: Db
) -> None:
    email = "folders@contoso.test"
    with FakeGraphServer({email: 1500}, seed=26) as server:
        env = environment(database_url, server)
        add_store(email, env)
        incremental_round(email, env)
        archive = next(f["id"] for f in server.folders(email) if f["name"] == "Archive")
        in_archive = server.message_ids(email, folder=archive)
        assert in_archive
        server.delete_folder(email, archive)
        projects = server.add_folder(email, "Projects")
        added = server.add_messages(email, [datetime.now(UTC)] * 5, folder=projects)
        created = incremental_round(email, env)
        rounds = {c["folder"]: c["round"] for c in created["chunks"]}
        assert rounds["Projects"] == "full"
        assert "Archive" not in rounds
        assert created["folders_gone"] == 1
        assert created["rows_marked_deleted"] == len(in_archive)
        assert_mirrored(db, server, email)
        assert all(rows(db, email)[m]["folder_id"] == projects for m in added)
        states = {
            row["folder_id"]
            for row in db.execute("SELECT folder_id FROM folder_sync_state").fetchall()
        }
        assert archive not in states
        assert projects in states


def test_create_all_incremental_enqueues_due_stores_once(database_url: str, db: Db) -> None:
    emails = ["a@contoso.test", "b@contoso.test", "c@contoso.test"]
    with FakeGraphServer(dict.fromkeys(emails, 300), seed=27) as server:
        env = environment(database_url, server)
        for email in emails:
            add_store(email, env)
        syncctl("create", emails[2], env=env)  # c is busy with a full job
        first = json.loads(
            syncctl(
                "create", "--all", "--type", "incremental", "--older-than", "15m", "--json", env=env
            ).stdout
        )
        assert sorted(e["store"]["email"] for e in first["enqueued"]) == emails[:2]
        second = json.loads(
            syncctl(
                "create", "--all", "--type", "incremental", "--older-than", "15m", "--json", env=env
            ).stdout
        )
        assert second["enqueued"] == []
        drain(env=env)
        # Done within 15 minutes: a and b are not due; c (its full job done) is.
        third = json.loads(
            syncctl(
                "create", "--all", "--type", "incremental", "--older-than", "15m", "--json", env=env
            ).stdout
        )
        assert [e["store"]["email"] for e in third["enqueued"]] == [emails[2]]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--type", "incremental", "--from", "2024-01-01"], "--from is for full jobs"),
        (["--type", "incremental", "--chunk-size", "5"], "--chunk-size is for full jobs"),
        (["--all", "--older-than", "soon"], "--older-than"),
        (["--older-than", "15m"], "--older-than goes with --all"),
    ],
)
def test_incremental_bad_input_is_refused_with_one_sentence(
    database_url: str, db: Db, args: list[str], expected: str
) -> None:
    env = {**os.environ, "SYNCCTL_DATABASE_URL": database_url, "SYNCCTL_GRAPH_TOKEN": "x"}
    store = [] if "--all" in args else ["someone@contoso.test"]
    result = syncctl("create", *store, *args, env=env, check=False)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    jobs = db.execute("SELECT count(*) AS n FROM sync_queue").fetchone()
    assert jobs is not None
    assert jobs["n"] == 0


def test_hidden_folders_are_kept_current_too(database_url: str, db: Db) -> None:
    # A full job's listing reaches hidden folders' mail; a round that skipped
    # them would mark that mail deleted while it is still in the mailbox.
    email = "hidden@contoso.test"
    with FakeGraphServer({email: 500}, seed=28) as server:
        hidden = server.add_folder(email, "App data", hidden=True)
        kept = server.add_messages(email, [datetime(2020, 5, 1, tzinfo=UTC)] * 4, folder=hidden)
        env = environment(database_url, server)
        add_store(email, env)
        syncctl("create", email, env=env)
        drain(env=env)
        created = incremental_round(email, env)
        assert "App data" in {c["folder"] for c in created["chunks"]}
        assert_mirrored(db, server, email)
        stored = rows(db, email)
        assert all(stored[m]["folder_id"] == hidden for m in kept)
        assert all(stored[m]["deleted_at"] is None for m in kept)


def test_status_and_problem_stores_show_how_current_stores_are(database_url: str, db: Db) -> None:
    emails = ["fresh@contoso.test", "behind@contoso.test"]
    with FakeGraphServer(dict.fromkeys(emails, 200), seed=29) as server:
        env = environment(database_url, server)
        for email in emails:
            add_store(email, env)
            incremental_round(email, env)
        # behind@'s Inbox last completed a round two hours ago.
        db.execute(
            "UPDATE folder_sync_state f SET last_round_at = now() - interval '2 hours'"
            " FROM stores s WHERE s.id = f.store_id AND s.email = %s AND f.folder_name = 'Inbox'",
            (emails[1],),
        )
        status = json.loads(syncctl("status", "--json", env=env).stdout)
        assert {job["sync_type"] for job in status["jobs"]} == {"incremental"}
        current = {s["email"]: s for s in status["stores_kept_current"]}
        assert current[emails[0]]["folders"] == len(server.folders(emails[0]))
        assert 7200 <= current[emails[1]]["behind"] < 7300  # seconds
        assert current[emails[0]]["behind"] < 300
        table = syncctl("status", env=env).stdout
        assert "incremental" in table
        assert "Stores kept current" in table

        flagged = syncctl(
            "problem-stores", "--stale-after", "1h", "--check", "--json", env=env, check=False
        )
        assert flagged.returncode == 1
        assert [s["email"] for s in json.loads(flagged.stdout)["stores"]] == [emails[1]]
        fine = syncctl("problem-stores", "--stale-after", "3h", "--check", env=env, check=False)
        assert fine.returncode == 0, fine.stdout


def test_delta_links_of_another_graph_endpoint_start_a_full_round(
    database_url: str, db: Db
) -> None:
    # SYNCCTL_GRAPH_URL changed since the last round: the saved links point at
    # a host the token must not go to; each folder starts over instead of failing.
    email = "moved-endpoint@contoso.test"
    with FakeGraphServer({email: 400}, seed=30) as before:
        env = environment(database_url, before)
        add_store(email, env)
        incremental_round(email, env)
    with FakeGraphServer({email: 400}, seed=30) as after:
        env = environment(database_url, after)
        incremental_round(email, env)
        assert_mirrored(db, after, email)
    chunks = db.execute(
        "SELECT c.status, c.checkpoint ->> 'full_reason' AS reason FROM chunked_sync_jobs c"
        " JOIN sync_queue q ON q.id = c.parent_sync_job_id"
        " WHERE q.created_at = (SELECT max(created_at) FROM sync_queue)"
    ).fetchall()
    assert {c["status"] for c in chunks} == {"completed"}
    assert all("not the configured Graph" in c["reason"] for c in chunks)


def test_folders_exchanging_many_messages_at_once_write_without_deadlocks(
    database_url: str, db: Db
) -> None:
    # Two folders' rounds run at once, each page touching rows the other's
    # pages touch too (every move is a removal in one and an addition in the
    # other): their transactions must not deadlock and cost attempts.
    email = "exchange@contoso.test"
    with FakeGraphServer({email: 4000}, seed=31, folders=["Inbox", "Archive"]) as server:
        env = environment(database_url, server)
        add_store(email, env)
        incremental_round(email, env)
        folders = {f["name"]: f["id"] for f in server.folders(email)}
        in_inbox = server.message_ids(email, folder=folders["Inbox"])[:600]
        in_archive = server.message_ids(email, folder=folders["Archive"])[:600]
        server.move_messages(email, [server.index_of(email, m) for m in in_inbox], "Archive")
        server.move_messages(email, [server.index_of(email, m) for m in in_archive], "Inbox")
        syncctl("create", email, "--type", "incremental", "--parallel", "2", env=env)
        drain("--concurrency", "2", env=env)  # both folders' rounds at once
        assert_mirrored(db, server, email)
        retried = db.execute(
            "SELECT count(*) AS n FROM chunk_attempts WHERE outcome <> 'completed'"
        ).fetchone()
        assert retried is not None
        assert retried["n"] == 0
