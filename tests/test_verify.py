"""`syncctl verify`, run as an operator runs it: the installed command and
workers against the local Graph server over real HTTP, real PostgreSQL. A
synced store proves equal to its mailbox folder by folder; rows lost behind
syncctl's back are found in their folder and repaired by one drain; mail
newer than the last round and rounds in flight are explained, not losses;
a store only ever synced by a full job is proved by its window."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import psycopg

from commandline import drain, environment, syncctl
from syncctl.fakegraph import FakeGraphServer

Db = psycopg.Connection[dict[str, Any]]


def add_store(email: str, env: dict[str, str]) -> None:
    syncctl("store", "add", "--name", email.partition("@")[0], "--email", email, env=env)


def synced(email: str, env: dict[str, str]) -> None:
    """A full job, then one incremental round: a store kept current."""
    syncctl("create", email, env=env)
    drain(env=env)
    syncctl("create", email, "--type", "incremental", env=env)
    drain(env=env)


def proof(env: dict[str, str], *args: str) -> dict[str, Any]:
    """`verify ARGS --json` (which must exit 0): its document."""
    document: dict[str, Any] = json.loads(syncctl("verify", *args, "--json", env=env).stdout)
    return document


def folders_of(document: dict[str, Any], email: str) -> dict[str, dict[str, Any]]:
    """The folders of one store in a verify document, by folder name."""
    store = next(s for s in document["stores"] if s["store"]["email"] == email)
    return {folder["folder"]: folder for folder in store["folders"]}


def folder_id(server: FakeGraphServer, email: str, name: str) -> str:
    return str(next(f["id"] for f in server.folders(email) if f["name"] == name))


def table_lines(output: str, word: str) -> list[str]:
    return [line for line in output.splitlines() if word in line]


def test_a_freshly_synced_store_verifies_folder_by_folder(database_url: str, db: Db) -> None:
    email = "fresh@contoso.test"
    with FakeGraphServer({email: 1500}, seed=31) as server:
        env = environment(database_url, server)
        add_store(email, env)
        synced(email, env)
        server.reset_record()

        document = proof(env, email, "--check")

        (store,) = document["stores"]
        assert (store["mode"], store["verdict"]) == ("folders", "ok")
        shown = {f["folder_id"]: f for f in store["folders"]}
        assert {f: shown[f]["graph"] for f in shown} == {
            f["id"]: f["total"] for f in server.folders(email)
        }
        assert all(f["rows"] == f["graph"] and f["difference"] == 0 for f in shown.values())
        assert all(f["verdict"] == "ok" for f in shown.values())
        # A round started when its chunk was claimed, before the page that ended it.
        assert all(
            datetime.fromisoformat(f["last_round_started_at"])
            < datetime.fromisoformat(f["last_round_at"])
            for f in shown.values()
        )
        assert document["totals"]["rows"] == server.mailbox_size(email)
        assert document["totals"]["verdicts"] == {"ok": len(shown)}
        # Graph's counts came from the folder listing: no message was read.
        assert server.requests
        assert all("/mailFolders" in r.path for r in server.requests)
        assert not any(r.path.endswith(("/messages", "/delta", "$count")) for r in server.requests)

        table = syncctl("verify", email, "--check", env=env)
        assert len(table_lines(table.stdout, email)) == len(shown)
        assert not table_lines(table.stdout, "differs")
        assert f"{len(shown)} folders of 1 store: {len(shown)} ok." in table.stderr
        assert " Inbox " in table_lines(table.stdout, email)[0]


def test_rows_deleted_behind_syncctls_back_are_found_in_their_folder_and_repaired(
    database_url: str, db: Db
) -> None:
    email = "lost@contoso.test"
    with FakeGraphServer({email: 1500}, seed=32) as server:
        env = environment(database_url, server)
        add_store(email, env)
        synced(email, env)
        inbox, archive = folder_id(server, email, "Inbox"), folder_id(server, email, "Archive")
        lost = server.message_ids(email, folder=inbox)[:7]
        db.execute("DELETE FROM emails WHERE provider_message_id = ANY(%s)", (lost,))
        # And mail deleted from the mailbox after the round: rows to be marked deleted.
        gone = server.message_ids(email, folder=archive)[:3]
        server.delete_messages(email, [server.index_of(email, m) for m in gone])

        checked = syncctl("verify", email, "--check", env=env, check=False)

        assert checked.returncode == 1, checked.stderr
        differing = table_lines(checked.stdout, "differs")
        assert len(differing) == 2, checked.stdout
        (inbox_line,) = [line for line in differing if " Inbox " in line]
        assert "+7" in inbox_line
        assert "differs: 7 missing from the copy" in inbox_line
        (archive_line,) = [line for line in differing if " Archive " in line]
        assert "differs: 3 rows not in the mailbox" in archive_line
        assert checked.stderr.strip().splitlines()[-1] == (
            f"syncctl: 1 store's copy differs from Graph: {email}."
        )
        folders = folders_of(proof(env, email), email)
        assert (folders["Inbox"]["graph"] - folders["Inbox"]["rows"]) == 7
        assert folders["Inbox"]["newer_since_last_round"] == 0
        assert folders["Archive"]["difference"] == -3
        assert {name for name, f in folders.items() if f["verdict"] != "ok"} == {"Inbox", "Archive"}

        repaired = proof(env, email, "--repair")

        (repair,) = repaired["repairs"]
        assert repair["skipped"] is None
        assert repair["job_id"] is not None
        assert sorted(repair["full_rounds"]) == ["Archive", "Inbox"]
        rounds = db.execute(
            "SELECT c.folder_id, c.checkpoint FROM chunked_sync_jobs c"
            " WHERE c.parent_sync_job_id = %s",
            (repair["job_id"],),
        ).fetchall()
        assert len(rounds) == len(server.folders(email))
        states = {
            row["folder_id"]: row["delta_link"]
            for row in db.execute("SELECT folder_id, delta_link FROM folder_sync_state").fetchall()
        }
        # Only the drifted folders lost their delta link: they run a full round.
        assert {f for f, link in states.items() if link is None} == {inbox, archive}

        drain(env=env)

        stored = {
            row["provider_message_id"]: row["deleted_at"]
            for row in db.execute("SELECT provider_message_id, deleted_at FROM emails").fetchall()
        }
        assert all(m in stored and stored[m] is None for m in lost)
        assert all(stored[m] is not None for m in gone)
        after = syncctl("verify", email, "--check", env=env)
        assert not table_lines(after.stdout, "differs")


def test_mail_newer_than_the_last_round_is_explained_not_a_loss(database_url: str, db: Db) -> None:
    email = "arriving@contoso.test"
    with FakeGraphServer({email: 1200}, seed=33) as server:
        env = environment(database_url, server)
        add_store(email, env)
        synced(email, env)
        inbox = folder_id(server, email, "Inbox")
        server.add_messages(email, [datetime.now(UTC)] * 4)  # into the Inbox
        server.reset_record()

        document = proof(env, email, "--check")

        folders = folders_of(document, email)
        assert folders["Inbox"]["difference"] == 4
        assert folders["Inbox"]["verdict"] == "newer than the last round"
        assert folders["Inbox"]["newer_since_last_round"] == 4
        assert all(f["verdict"] == "ok" for name, f in folders.items() if name != "Inbox")
        assert document["stores"][0]["verdict"] == "explained"
        (counted,) = [r for r in server.requests if r.path.endswith("/messages/$count")]
        assert inbox in counted.path
        assert {k.lower(): v for k, v in counted.headers.items()}["consistencylevel"] == "eventual"
        started = datetime.fromisoformat(folders["Inbox"]["last_round_started_at"])
        assert counted.query["$filter"] == (
            f"receivedDateTime ge {started.astimezone(UTC):%Y-%m-%dT%H:%M:%S}Z"
        )
        table = syncctl("verify", email, env=env)
        (line,) = table_lines(table.stdout, "newer than the last round")
        assert line.split()[1:5] == [
            "Inbox",
            str(folders["Inbox"]["graph"]),
            str(folders["Inbox"]["rows"]),
            "+4",
        ]
        assert line.endswith("(4 received since it started)")

        # Mail the round should have seen (received long before it started) is not explained.
        server.add_messages(email, [datetime(2020, 5, 1, tzinfo=UTC)] * 2, folder="archive")
        checked = syncctl("verify", email, "--check", "--json", env=env, check=False)
        assert checked.returncode == 1, checked.stderr
        folders = folders_of(json.loads(checked.stdout), email)
        assert folders["Archive"]["verdict"] == "differs"
        assert folders["Archive"]["newer_since_last_round"] == 0
        assert folders["Inbox"]["verdict"] == "newer than the last round"


def test_a_round_in_flight_explains_its_folder_and_a_busy_store_is_not_repaired(
    database_url: str, db: Db
) -> None:
    email = "busy@contoso.test"
    with FakeGraphServer({email: 1200}, seed=34) as server:
        env = environment(database_url, server)
        add_store(email, env)
        synced(email, env)
        inbox = folder_id(server, email, "Inbox")
        lost = server.message_ids(email, folder=inbox)[:5]
        db.execute("DELETE FROM emails WHERE provider_message_id = ANY(%s)", (lost,))
        syncctl("create", email, "--type", "incremental", env=env)  # not run yet

        folders = folders_of(proof(env, email, "--check"), email)

        assert folders["Inbox"]["verdict"] == "round in flight"
        assert folders["Inbox"]["difference"] == 5

        # Its Inbox chunk gone from the job, the job still active: the Inbox differs,
        # and --repair says why it leaves the store alone.
        db.execute(
            "UPDATE chunked_sync_jobs SET status = 'cancelled' WHERE folder_id = %s", (inbox,)
        )
        jobs_before = db.execute("SELECT count(*) AS n FROM sync_queue").fetchone()
        repaired = syncctl("verify", email, "--check", "--repair", env=env, check=False)
        assert repaired.returncode == 1
        assert f"Did not repair {email}: it has an active job (" in repaired.stderr
        assert db.execute("SELECT count(*) AS n FROM sync_queue").fetchone() == jobs_before


def test_verify_all_names_the_store_that_drifted(database_url: str, db: Db) -> None:
    emails = ["ann@contoso.test", "bob@contoso.test", "cat@contoso.test"]
    with FakeGraphServer(dict.fromkeys(emails, 600), seed=35) as server:
        env = environment(database_url, server)
        for email in emails:
            add_store(email, env)
            syncctl("create", email, env=env)
        drain(env=env)
        syncctl("create", "--all", "--type", "incremental", env=env)
        drain(env=env)
        server.add_mailbox("new@contoso.test", 50)
        add_store("new@contoso.test", env)  # never synced: nothing to prove yet
        sent = folder_id(server, "bob@contoso.test", "Sent Items")
        lost = server.message_ids("bob@contoso.test", folder=sent)[:4]
        db.execute("DELETE FROM emails WHERE provider_message_id = ANY(%s)", (lost,))

        checked = syncctl("verify", "--all", "--check", env=env, check=False)

        assert checked.returncode == 1, checked.stderr
        assert checked.stderr.strip().splitlines()[-1] == (
            "syncctl: 1 store's copy differs from Graph: bob@contoso.test."
        )
        (line,) = table_lines(checked.stdout, "differs")
        assert line.startswith("bob@contoso.test  Sent Items ")
        assert line.endswith("differs: 4 missing from the copy")
        for email in emails:
            assert len(table_lines(checked.stdout, email)) == len(server.folders(email))
        (new,) = table_lines(checked.stdout, "new@contoso.test")
        assert "never synced" in new
        document = json.loads(
            syncctl("verify", "--all", "--json", env=env, check=False).stdout  # exit 0: no --check
        )
        verdicts = {s["store"]["email"]: s["verdict"] for s in document["stores"]}
        assert verdicts == {
            "ann@contoso.test": "ok",
            "bob@contoso.test": "differs",
            "cat@contoso.test": "ok",
            "new@contoso.test": "never synced",
        }
        assert document["totals"]["stores_differ"] == 1
        assert document["totals"]["missing_from_copy"] == 4

        # A mailbox Graph no longer knows is reported, and the others are still proved.
        server.remove_mailbox("cat@contoso.test")
        checked = syncctl("verify", "--all", "--check", env=env, check=False)
        assert checked.returncode == 1
        assert checked.stderr.strip().splitlines()[-1] == (
            "syncctl: 1 store's copy differs from Graph: bob@contoso.test; "
            "1 store could not be verified: cat@contoso.test."
        )
        (cat,) = table_lines(checked.stdout, "cat@contoso.test")
        assert "not verified: Graph does not know it (404 ErrorInvalidUser" in cat
        assert len(table_lines(checked.stdout, "ann@contoso.test")) == len(
            server.folders("ann@contoso.test")
        )


def test_a_store_synced_only_by_a_full_job_is_proved_by_its_window(
    database_url: str, db: Db
) -> None:
    email = "window@contoso.test"
    start, end = datetime(2017, 1, 1, tzinfo=UTC), datetime(2021, 1, 1, tzinfo=UTC)
    with FakeGraphServer({email: 1000}, seed=36) as server:
        env = environment(database_url, server)
        add_store(email, env)
        syncctl("create", email, "--from", start.isoformat(), "--to", end.isoformat(), env=env)
        drain(env=env)
        in_window = sum(
            start <= server.received_at(email, i) < end for i in range(server.mailbox_size(email))
        )
        assert 0 < in_window < server.mailbox_size(email)

        document = proof(env, email, "--check")

        (store,) = document["stores"]
        assert (store["mode"], store["verdict"]) == ("window", "ok")
        assert store["window"] == {"from": start.isoformat(), "to": end.isoformat()}
        (window,) = store["folders"]
        assert window["graph"] == window["rows"] == in_window

        # Rows of the window lost: found; the copy's mail outside the window is not counted.
        db.execute(
            "DELETE FROM emails WHERE id IN (SELECT id FROM emails"
            " WHERE received_at >= %s AND received_at < %s ORDER BY id LIMIT 6)",
            (start, end),
        )
        checked = syncctl("verify", email, "--check", "--json", env=env, check=False)
        assert checked.returncode == 1
        (window,) = json.loads(checked.stdout)["stores"][0]["folders"]
        assert (window["graph"], window["rows"], window["verdict"]) == (
            in_window,
            in_window - 6,
            "differs",
        )

        # The repair is the store's first incremental job: every folder a full round.
        (repair,) = proof(env, email, "--repair")["repairs"]
        assert len(repair["full_rounds"]) == len(server.folders(email))
        drain(env=env)
        after = proof(env, email, "--check")
        assert after["stores"][0]["mode"] == "folders"
        assert after["stores"][0]["verdict"] == "ok"


def test_bad_input_exits_2_with_one_sentence_and_asks_graph_nothing(
    database_url: str, db: Db
) -> None:
    with FakeGraphServer({"ann@contoso.test": 10}) as server:
        env = environment(database_url, server)
        add_store("ann@contoso.test", env)
        server.reset_record()
        cases = {
            ("verify", "anne@contoso.test"): (
                "syncctl: No store anne@contoso.test; did you mean ann@contoso.test?"
            ),
            ("verify", "ann@contoso.test", "--all"): (
                "syncctl: Name one store, or pass --all (not both)."
            ),
            ("verify", "--check"): "syncctl: Name one store, or pass --all (not both).",
        }
        for args, sentence in cases.items():
            result = syncctl(*args, env=env, check=False)
            assert result.returncode == 2, result.stderr
            assert result.stderr.strip() == sentence
            assert result.stdout == ""
        assert server.requests == []
        assert db.execute("SELECT count(*) AS n FROM sync_queue").fetchone() == {"n": 0}
