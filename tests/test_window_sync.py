"""Full jobs in time-window chunks, run as an operator runs them: the installed
command, worker processes, the local Graph server over real HTTP, real
PostgreSQL. A mailbox that changes while it is read, ties at the boundaries,
a chunk killed mid-window, four chunks of a job at once and no more, the
sequential rule, fair turns between stores, and the ordered watermark."""

from __future__ import annotations

import signal
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from commandline import drain, environment, start_worker, stored_ids, syncctl
from helpers import wait_for
from syncctl.fakegraph import FakeGraphServer

Db = psycopg.Connection[dict[str, Any]]


def add_store(email: str, env: dict[str, str]) -> None:
    syncctl("store", "add", "--name", email.partition("@")[0], "--email", email, env=env)


def chunks(db: Db, email: str) -> list[dict[str, Any]]:
    return db.execute(
        "SELECT c.chunk_index, c.window_start, c.window_end, c.status, c.attempts,"
        " c.emails_synced, c.checkpoint"
        " FROM chunked_sync_jobs c JOIN stores s ON s.id = c.store_id"
        " WHERE s.email = %s ORDER BY c.chunk_index",
        (email,),
    ).fetchall()


def job(db: Db, email: str) -> dict[str, Any]:
    row = db.execute(
        "SELECT q.* FROM sync_queue q JOIN stores s ON s.id = q.store_id WHERE s.email = %s",
        (email,),
    ).fetchone()
    assert row is not None
    return row


def odata_time(moment: datetime) -> str:
    """A window boundary as it appears in the $filter syncctl sends."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def is_listing(query: dict[str, str]) -> bool:
    """A page of a chunk, not the count or a boundary look-up ($top=1)."""
    return "$filter" in query and "$select" in query and query.get("$top") != "1"


def assert_mirrored(db: Db, server: FakeGraphServer, email: str) -> None:
    """Every message the mailbox holds is stored, and each once."""
    ids = stored_ids(db, email)
    assert len(ids) == len(set(ids))
    missing = set(server.message_ids(email)) - set(ids)
    assert not missing, f"{len(missing)} messages still in the mailbox were never synced"


@pytest.mark.slow
@pytest.mark.parametrize("parallel", [1, 4])
def test_oldest_mail_deleted_while_a_job_runs_misses_nothing(
    database_url: str, db: Db, parallel: int
) -> None:
    # Retention deletes the 100 oldest while chunk 1 reads its first page:
    # with offsets every later chunk would start 100 messages too far.
    email = "retention@contoso.test"
    with FakeGraphServer({email: 3000}, seed=11) as server:
        env = environment(database_url, server)
        add_store(email, env)
        syncctl("create", email, "--chunk-size", "1000", "--parallel", str(parallel), env=env)
        assert len(chunks(db, email)) == 3
        deleted: list[str] = []
        lock = threading.Lock()

        def retention(mailbox: str, query: dict[str, str]) -> None:
            with lock:
                if is_listing(query) and not deleted:
                    deleted.extend(server.delete_oldest(email, 100))

        server.before_answer = retention
        drain(env=env)

        assert len(deleted) == 100
        assert server.mailbox_size(email) == 2900
        assert_mirrored(db, server, email)
        assert job(db, email)["status"] == "completed"


@pytest.mark.slow
def test_mail_arriving_inside_the_window_after_create_is_synced(database_url: str, db: Db) -> None:
    email = "arrivals@contoso.test"
    with FakeGraphServer({email: 3000}, seed=12) as server:
        env = environment(database_url, server)
        add_store(email, env)
        syncctl("create", email, "--chunk-size", "1000", env=env)
        planned = chunks(db, email)
        assert len(planned) == 3
        second, third = planned[1]["window_start"], planned[2]["window_start"]
        newest = server.received_at(email, 2999)
        # New mail at both boundaries exactly, just before one, inside a
        # chunk, and after the newest message but before the job's end.
        arrived = server.add_messages(
            email,
            [
                second,
                third,
                second - timedelta(seconds=1),
                third + timedelta(seconds=1),
                newest + timedelta(seconds=1),
            ],
        )
        drain(env=env)

        assert set(arrived) <= set(stored_ids(db, email))
        assert_mirrored(db, server, email)
        assert job(db, email)["status"] == "completed"


@pytest.mark.slow
def test_messages_tied_at_a_boundary_are_synced_by_one_chunk_only(
    database_url: str, db: Db
) -> None:
    email = "ties@contoso.test"
    with FakeGraphServer(seed=13) as server:
        # Seven messages per received time: 1000 and 2000 fall inside ties.
        server.add_mailbox(email, 3000, same_time=7)
        env = environment(database_url, server)
        add_store(email, env)
        syncctl("create", email, "--chunk-size", "1000", env=env)
        planned = chunks(db, email)
        assert [c["window_start"] for c in planned[1:]] == [
            server.received_at(email, 994),  # the first of the tie holding 1000
            server.received_at(email, 1995),  # and 2000
        ]
        drain(env=env)

        assert_mirrored(db, server, email)
        # Each chunk counted only the messages of its own window.
        assert [c["emails_synced"] for c in chunks(db, email)] == [994, 1001, 1005]


@pytest.mark.slow
@pytest.mark.parametrize("link_expires", [False, True], ids=["link-kept", "link-expired"])
def test_chunk_killed_mid_window_resumes_inside_it(
    database_url: str, db: Db, link_expires: bool
) -> None:
    email = "resume@contoso.test"
    size, chunk_size = 6000, 3000
    # Slow pages keep the first worker mid-chunk long enough to be killed there.
    with FakeGraphServer({email: size}, seed=14, latency=0.3) as server:
        env = environment(database_url, server)
        add_store(email, env)
        syncctl("create", email, "--chunk-size", str(chunk_size), "--parallel", "1", env=env)
        first_end = chunks(db, email)[0]["window_end"]

        victim = start_worker("--lease", "5s", env=env)

        def read_by_first() -> int:
            checkpoint = chunks(db, email)[0]["checkpoint"]
            return int(checkpoint["read"]) if checkpoint else 0

        wait_for(lambda: read_by_first() >= 2000, timeout=120, what="two pages of chunk 1")
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
        killed_at = time.monotonic()
        read_before_kill = read_by_first()
        reached = datetime.fromisoformat(chunks(db, email)[0]["checkpoint"]["received_through"])
        if link_expires:
            server.expire_links()

        drain("--lease", "5s", env=env, timeout=300)

        assert_mirrored(db, server, email)
        assert len(stored_ids(db, email)) == size
        first = chunks(db, email)[0]
        assert (first["status"], first["attempts"]) == ("completed", 2)
        resumed = [
            r
            for r in server.requests
            if r.received_at > killed_at
            and is_listing(r.query)
            and f"lt {odata_time(first_end)}" in r.query["$filter"]
        ]
        # Paged by received time, not by Graph's links: an expired link is never
        # asked for, and the chunk is listed again from the last time it reached.
        assert [r for r in resumed if r.status != 200] == []
        assert f"ge {odata_time(reached)}" in resumed[0].query["$filter"]
        # Inside the window: only what was left of it (plus the message of the
        # second reached, read again and dropped), never the chunk from its start.
        served_again = sum(r.message_count for r in resumed)
        assert chunk_size - read_before_kill <= served_again <= chunk_size - read_before_kill + 1


@pytest.mark.slow
def test_four_chunks_of_a_job_run_at_once_and_graph_never_sees_five(
    database_url: str, db: Db
) -> None:
    email = "parallel@contoso.test"
    # No 429 for a fifth request: the server only records how many were in flight.
    with FakeGraphServer({email: 8000}, seed=15, latency=0.3, enforce_concurrency=None) as server:
        env = environment(database_url, server)
        add_store(email, env)
        syncctl("create", email, "--chunk-size", "1000", "--parallel", "4", env=env)
        # Six worker slots on two processes: more than the job may use.
        workers = [start_worker("--drain", "--concurrency", "3", env=env) for _ in range(2)]
        for worker in workers:
            _, err = worker.communicate(timeout=300)
            assert worker.returncode == 0, err

        assert server.max_in_flight(email) == 4
        assert most_at_once(attempts_of(db, email)) == 4
        assert_mirrored(db, server, email)
        assert job(db, email)["synced_through"] == job(db, email)["sync_to"]


@pytest.mark.slow
def test_parallel_1_runs_the_chunks_of_a_job_one_at_a_time_in_order(
    database_url: str, db: Db
) -> None:
    email = "sequential@contoso.test"
    with FakeGraphServer({email: 4000}, seed=16, latency=0.05) as server:
        env = environment(database_url, server)
        add_store(email, env)
        syncctl("create", email, "--chunk-size", "1000", "--parallel", "1", env=env)
        server.reset_record()  # create's boundary look-ups run at once
        workers = [start_worker("--drain", "--concurrency", "2", env=env) for _ in range(2)]
        for worker in workers:
            _, err = worker.communicate(timeout=300)
            assert worker.returncode == 0, err

        attempts = attempts_of(db, email)
        assert [a["chunk_index"] for a in attempts] == [1, 2, 3, 4]
        assert most_at_once(attempts) == 1
        assert server.max_in_flight(email) == 1
        assert_mirrored(db, server, email)


@pytest.mark.slow
def test_one_worker_slot_serves_stores_in_turn(database_url: str, db: Db) -> None:
    sizes = {"a@contoso.test": 3000, "b@contoso.test": 2000, "c@contoso.test": 1000}
    with FakeGraphServer(sizes, seed=17) as server:
        env = environment(database_url, server)
        for email in sizes:  # A's job is the oldest, C's the newest
            add_store(email, env)
            syncctl("create", email, "--chunk-size", "1000", env=env)
        drain("--concurrency", "1", env=env)

        turns = db.execute(
            "SELECT upper(left(s.email, 1)) || c.chunk_index AS turn"
            " FROM chunk_attempts a JOIN chunked_sync_jobs c ON c.id = a.chunk_id"
            " JOIN stores s ON s.id = c.store_id ORDER BY a.id"
        ).fetchall()
        assert [t["turn"] for t in turns] == ["A1", "B1", "C1", "A2", "B2", "A3"]
        for email in sizes:
            assert_mirrored(db, server, email)


@pytest.mark.slow
def test_synced_through_moves_in_order_while_chunks_finish_out_of_order(
    database_url: str, db: Db
) -> None:
    email = "watermark@contoso.test"
    with FakeGraphServer({email: 4000}, seed=18) as server:
        env = environment(database_url, server)
        add_store(email, env)
        syncctl("create", email, "--chunk-size", "1000", "--parallel", "4", env=env)
        planned = chunks(db, email)
        assert len(planned) == 4
        # Chunks 1 and 3 are held back by the server until released.
        held = {
            1: (f"lt {odata_time(planned[0]['window_end'])}", threading.Event()),
            3: (f"ge {odata_time(planned[2]['window_start'])}", threading.Event()),
        }

        def hold(mailbox: str, query: dict[str, str]) -> None:
            for marker, release in held.values():
                if is_listing(query) and marker in query["$filter"]:
                    release.wait(timeout=60)

        server.before_answer = hold
        worker = start_worker("--drain", "--concurrency", "4", env=env)
        try:
            seen: list[datetime | None] = []

            def statuses() -> list[str]:
                seen.append(job(db, email)["synced_through"])
                return [c["status"] for c in chunks(db, email)]

            wait_for(
                lambda: statuses() == ["processing", "completed", "processing", "completed"],
                timeout=60,
                what="chunks 2 and 4 completed while 1 and 3 are held",
            )
            assert job(db, email)["synced_through"] is None  # chunk 1 is not done
            held[1][1].set()
            wait_for(lambda: statuses()[0] == "completed", timeout=60, what="chunk 1 completed")
            # Chunk 1 and 2 are done, 3 is not: synced through chunk 2's end.
            assert job(db, email)["synced_through"] == planned[2]["window_start"]
            held[3][1].set()
            _, err = worker.communicate(timeout=120)
            assert worker.returncode == 0, err
        finally:
            for _, release in held.values():
                release.set()
            if worker.poll() is None:
                worker.kill()

        done = job(db, email)
        assert done["status"] == "completed"
        assert done["synced_through"] == done["sync_to"]
        known = [moment for moment in seen if moment is not None]
        assert known == sorted(known), "synced_through went backwards"
        assert_mirrored(db, server, email)


def attempts_of(db: Db, email: str) -> list[dict[str, Any]]:
    return db.execute(
        "SELECT c.chunk_index, a.started_at, a.finished_at"
        " FROM chunk_attempts a JOIN chunked_sync_jobs c ON c.id = a.chunk_id"
        " JOIN stores s ON s.id = c.store_id WHERE s.email = %s ORDER BY a.started_at",
        (email,),
    ).fetchall()


def most_at_once(attempts: list[dict[str, Any]]) -> int:
    """The most attempts whose [started_at, finished_at) overlap."""
    events = sorted(
        [(a["started_at"], 1) for a in attempts] + [(a["finished_at"], -1) for a in attempts],
        key=lambda event: (event[0], event[1]),  # an end before a start at the same time
    )
    running = most = 0
    for _, change in events:
        running += change
        most = max(most, running)
    return most


@pytest.mark.slow
def test_mail_deleted_inside_a_chunk_between_its_pages_misses_nothing(
    database_url: str, db: Db
) -> None:
    # One chunk of three pages; the 100 oldest go after its first page is
    # served. A next link that counts with $skip would start page 2 at 1100.
    email = "midchunk@contoso.test"
    with FakeGraphServer({email: 3000}, seed=19) as server:
        env = environment(database_url, server)
        add_store(email, env)
        syncctl("create", email, "--chunk-size", "3000", env=env)
        pages = 0
        lock = threading.Lock()

        def retention(mailbox: str, query: dict[str, str]) -> None:
            nonlocal pages
            with lock:
                if is_listing(query):
                    pages += 1
                    if pages == 2:
                        server.delete_oldest(email, 100)

        server.before_answer = retention
        drain(env=env)

        assert server.mailbox_size(email) == 2900
        assert_mirrored(db, server, email)
        assert len(stored_ids(db, email)) == 3000  # the 100 were read before they went
        assert sum(c["emails_synced"] for c in chunks(db, email)) == 3000
