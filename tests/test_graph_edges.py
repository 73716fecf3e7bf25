"""Graph at its edges, as an operator meets them: a mailbox Graph does not
know, a store reference with a typo, Graph not listening, a fixed token
refused, a request that hangs, and the sentences that say so. Commands run
as the installed `syncctl` against real PostgreSQL and the local Graph
server over real HTTP."""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any, LiteralString

import psycopg
import pytest

from commandline import environment, start_worker, syncctl
from helpers import WAIT, quick_graph_settings, unconfigured_env, wait_for
from syncctl import jobs
from syncctl.db import Connection
from syncctl.errors import BadInput
from syncctl.fakegraph import FakeGraphServer
from syncctl.graph import GraphMailSource, MsalTokens, StaticToken
from syncctl.mailsource import MailboxNotFound, MailSourceError, Window

Db = psycopg.Connection[dict[str, Any]]

KNOWN = "megan@contoso.test"
GHOST = "ghost@contoso.test"
WHOLE = Window(None, None)
TOKEN = "edge-token-8d2f61"  # noqa: S105 - made up


def one_line_error(stderr: str) -> str:
    """The single `syncctl: ...` line a failed command printed (logs aside)."""
    lines = [line for line in stderr.strip().splitlines() if line.startswith("syncctl: ")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def row_count(db: Db, table: LiteralString) -> int:
    row = db.execute(f"SELECT count(*) AS n FROM {table}").fetchone()
    assert row is not None
    return int(row["n"])


@pytest.fixture
def server() -> Iterator[FakeGraphServer]:
    with FakeGraphServer({KNOWN: 30}, seed=5, token=TOKEN) as running:
        yield running


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A local port nothing listens on: bound (so nobody else takes it), never listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


# -- 1. a mailbox Graph does not know is bad input at `create` ------------------


@pytest.mark.parametrize(
    "code", ["ErrorInvalidUser", "ResourceNotFound", "MailboxNotEnabledForRESTAPI"]
)
def test_create_for_a_mailbox_graph_does_not_know_exits_2_naming_it(
    database_url: str, db: Db, server: FakeGraphServer, code: str
) -> None:
    env = environment(database_url, server)
    syncctl("store", "add", "--name", "m", "--email", KNOWN, env=env)
    server.fail_next(404, code=code)

    result = syncctl("create", KNOWN, env=env, check=False)

    assert result.returncode == 2, result.stderr
    line = one_line_error(result.stderr)
    assert f"Mailbox {KNOWN} was not found in Graph (404 {code}" in line
    assert "`syncctl store list`" in line
    assert "could not be reached" not in line
    assert ".." not in line
    assert row_count(db, "sync_queue") == 0


def test_unknown_mailbox_at_create_is_exit_2_but_refused_access_stays_exit_3(
    database_url: str, db: Db, server: FakeGraphServer
) -> None:
    env = environment(database_url, server)
    syncctl("store", "add", "--name", "g", "--email", GHOST, "--no-check", env=env)
    syncctl("store", "add", "--name", "m", "--email", KNOWN, env=env)

    unknown = syncctl("create", GHOST, env=env, check=False)
    server.fail_next(403, code="ErrorAccessDenied")
    denied = syncctl("create", KNOWN, env=env, check=False)
    refused = syncctl(
        "create", KNOWN, env={**env, "SYNCCTL_GRAPH_TOKEN": "not-the-token"}, check=False
    )

    assert unknown.returncode == 2, unknown.stderr
    assert GHOST in one_line_error(unknown.stderr)
    assert "ErrorInvalidUser" in unknown.stderr
    assert denied.returncode == 3, denied.stderr
    assert "Mail.Read" in one_line_error(denied.stderr)
    assert refused.returncode == 3, refused.stderr
    assert "credentials were refused" in one_line_error(refused.stderr)
    assert row_count(db, "sync_queue") == 0


def test_a_worker_still_fails_the_whole_job_of_an_unknown_mailbox_once(
    database_url: str, db: Db, server: FakeGraphServer
) -> None:
    env = environment(database_url, server)
    syncctl("store", "add", "--name", "m", "--email", KNOWN, env=env)
    syncctl("create", KNOWN, "--chunk-size", "10", env=env)
    server.remove_mailbox(KNOWN)

    worker = start_worker("--drain", env=env)
    _, err = worker.communicate(timeout=120)

    assert worker.returncode == 1, err
    job = db.execute("SELECT status, last_error FROM sync_queue").fetchone()
    assert job is not None
    assert job["status"] == "failed"
    chunks = db.execute("SELECT status, attempts FROM chunked_sync_jobs").fetchall()
    assert len(chunks) == 3
    assert {c["status"] for c in chunks} == {"failed"}
    assert sum(c["attempts"] for c in chunks) == 1  # one request, not one per chunk or try
    mailbox_requests = [r for r in server.requests if r.status == 404]
    assert len(mailbox_requests) == 1


# -- 2. `store add` asks Graph first ---------------------------------------------


def test_store_add_asks_graph_and_refuses_a_mailbox_it_does_not_know(
    database_url: str, db: Db, server: FakeGraphServer
) -> None:
    env = environment(database_url, server)

    refused = syncctl("store", "add", "--name", "g", "--email", GHOST, env=env, check=False)
    asked = server.requests

    assert refused.returncode == 2, refused.stderr
    line = one_line_error(refused.stderr)
    assert GHOST in line
    assert "ErrorInvalidUser" in line
    assert "--no-check" in line
    assert ".." not in line
    assert row_count(db, "stores") == 0
    assert len(asked) == 1
    assert asked[0].path == f"/v1.0/users/{GHOST}/mailFolders/inbox"
    assert asked[0].query == {"$select": "id"}

    server.reset_record()
    syncctl("store", "add", "--name", "m", "--email", KNOWN, env=env)
    assert [(r.path, r.status) for r in server.requests] == [
        (f"/v1.0/users/{KNOWN}/mailFolders/inbox", 200)
    ]
    stored = db.execute("SELECT email FROM stores").fetchall()
    assert stored == [{"email": KNOWN}]


def test_store_add_no_check_registers_without_asking_graph(
    database_url: str, db: Db, server: FakeGraphServer
) -> None:
    env = environment(database_url, server)

    syncctl("store", "add", "--name", "g", "--email", GHOST, "--no-check", env=env)

    assert server.requests == []
    assert db.execute("SELECT email FROM stores").fetchall() == [{"email": GHOST}]
    help_text = syncctl("store", "add", "--help", env=env).stdout
    assert "--no-check" in help_text
    assert "offline" in help_text


def test_store_add_without_graph_credentials_says_how_to_configure_them_or_skip(
    database_url: str, db: Db
) -> None:
    env = unconfigured_env(SYNCCTL_DATABASE_URL=database_url)

    refused = syncctl("store", "add", "--name", "s", "--email", KNOWN, env=env, check=False)

    assert refused.returncode == 2, refused.stderr
    line = one_line_error(refused.stderr)
    for hint in ("SYNCCTL_GRAPH_TOKEN", "SYNCCTL_TENANT_ID", "SYNCCTL_CLIENT_SECRET", "--no-check"):
        assert hint in line
    assert row_count(db, "stores") == 0

    syncctl("store", "add", "--name", "s", "--email", KNOWN, "--no-check", env=env)
    assert row_count(db, "stores") == 1


def test_store_add_refuses_bad_input_before_asking_graph(
    database_url: str, db: Db, server: FakeGraphServer
) -> None:
    env = environment(database_url, server)
    syncctl("store", "add", "--name", "m", "--email", KNOWN, env=env)
    server.reset_record()

    twice = syncctl("store", "add", "--name", "m", "--email", KNOWN.upper(), env=env, check=False)
    no_address = syncctl("store", "add", "--name", "x", "--email", "nobody", env=env, check=False)

    assert (twice.returncode, no_address.returncode) == (2, 2)
    assert "exists already" in one_line_error(twice.stderr)
    assert "not a mailbox address" in one_line_error(no_address.stderr)
    assert server.requests == []
    assert row_count(db, "stores") == 1


def test_store_add_when_graph_is_down_exits_3_and_stores_nothing(
    database_url: str, db: Db, closed_port: int
) -> None:
    env = unconfigured_env(
        SYNCCTL_DATABASE_URL=database_url,
        SYNCCTL_GRAPH_URL=f"http://127.0.0.1:{closed_port}/v1.0",
        SYNCCTL_GRAPH_TOKEN=TOKEN,
    )

    result = syncctl("store", "add", "--name", "m", "--email", KNOWN, env=env, check=False)

    assert result.returncode == 3, result.stderr
    assert "SYNCCTL_GRAPH_URL" in one_line_error(result.stderr)
    assert row_count(db, "stores") == 0


# -- 3. a store reference with a typo -------------------------------------------


def test_create_for_a_mistyped_store_offers_the_closest_registered_ones(
    database_url: str, db: Db, server: FakeGraphServer
) -> None:
    env = environment(database_url, server)
    for email in ("sales@contoso.test", "support@contoso.test", "bob@contoso.test"):
        syncctl("store", "add", "--name", email[:3], "--email", email, "--no-check", env=env)

    typo = syncctl("create", "saels@contoso.test", env=env, check=False)
    far = syncctl("create", "zed@contoso.test", env=env, check=False)

    assert typo.returncode == 2, typo.stderr
    assert one_line_error(typo.stderr) == (
        "syncctl: No store saels@contoso.test; did you mean sales@contoso.test?"
    )
    assert far.returncode == 2, far.stderr
    assert "add it with `syncctl store add`" in one_line_error(far.stderr)
    assert "did you mean" not in far.stderr
    assert row_count(db, "sync_queue") == 0
    assert row_count(db, "stores") == 3
    assert server.requests == []


def test_a_mistyped_store_gets_at_most_three_suggestions_closest_first(
    conn: Connection,
) -> None:
    for email in (
        "anna@contoso.test",
        "ann@contoso.test",
        "annie@contoso.test",
        "anne@contoso.test",
        "hanna@contoso.test",
        "bob@contoso.test",
    ):
        jobs.add_store(conn, name=email[:4], email=email)

    with pytest.raises(BadInput) as refused:
        jobs.find_store(conn, "annn@contoso.test")

    # Five are close (bob is not); the three closest are offered.
    assert refused.value.message == (
        "No store annn@contoso.test; did you mean ann@contoso.test, anna@contoso.test "
        "or anne@contoso.test?"
    )


# -- 4. Graph not listening ------------------------------------------------------


def test_create_against_a_closed_port_exits_3_at_once_naming_the_url(
    database_url: str, closed_port: int
) -> None:
    url = f"http://127.0.0.1:{closed_port}/v1.0"
    env = unconfigured_env(
        SYNCCTL_DATABASE_URL=database_url, SYNCCTL_GRAPH_URL=url, SYNCCTL_GRAPH_TOKEN=TOKEN
    )
    syncctl("store", "add", "--name", "m", "--email", KNOWN, "--no-check", env=env)

    started = time.monotonic()
    result = syncctl("create", KNOWN, env=env, check=False)
    took = time.monotonic() - started

    assert result.returncode == 3, result.stderr
    line = one_line_error(result.stderr)
    assert f"{url}/users/{KNOWN}/messages" in line
    assert "SYNCCTL_GRAPH_URL" in line
    assert "try 2" not in result.stderr  # no retry was even announced
    # Retrying with backoff took 24 s; one refused connection takes well under one.
    assert took < 5, f"took {took:.1f}s"


def test_a_refused_connection_is_not_retried_but_timeouts_and_5xx_are(
    server: FakeGraphServer, closed_port: int
) -> None:
    waits: list[float] = []
    down = quick_graph_settings(f"http://127.0.0.1:{closed_port}/v1.0", TOKEN, max_tries=4)
    with (
        GraphMailSource(down, sleep=waits.append) as source,
        pytest.raises(MailSourceError) as failed,
    ):
        source.count(KNOWN, WHOLE)
    assert waits == []
    assert failed.value.permanent is False  # a worker tries the chunk again later
    assert "Could not connect to Graph" in str(failed.value)

    up = quick_graph_settings(server.url, TOKEN, max_tries=4, read_timeout=0.3)
    with GraphMailSource(up, sleep=waits.append) as source:
        server.fail_next(503)
        server.fail_next(hang=True)
        server.fail_next(429, retry_after=0.01)
        assert source.count(KNOWN, WHOLE) == 30
    assert len(waits) == 3


def test_a_worker_waits_out_graph_being_down_without_using_up_the_attempt(
    database_url: str, db: Db
) -> None:
    # A command a person runs fails at once on a refused connection; a worker
    # must not: an outage or a proxy restart would otherwise fail chunks.
    with FakeGraphServer({KNOWN: 30}, seed=5, token=TOKEN) as server:
        env = environment(database_url, server)
        port = server.port
        syncctl("store", "add", "--name", "m", "--email", KNOWN, env=env)
        syncctl("create", KNOWN, "--chunk-size", "1000", env=env)
    # The server is gone: its port refuses connections now.
    worker = start_worker("--lease", "30s", "--drain", env=env)
    try:

        def claimed() -> bool:
            row = db.execute(
                "SELECT count(*) AS n FROM chunked_sync_jobs WHERE status = 'processing'"
            ).fetchone()
            return row is not None and row["n"] == 1

        wait_for(claimed, what="the worker to claim the chunk")
        time.sleep(2)  # refused, and waiting with backoff
        with FakeGraphServer({KNOWN: 30}, seed=5, token=TOKEN, port=port):
            _, err = worker.communicate(timeout=WAIT)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()
    assert worker.returncode == 0, err
    assert "could not connect to http://127.0.0.1" in err
    chunk = db.execute("SELECT status, attempts FROM chunked_sync_jobs").fetchone()
    assert chunk is not None
    assert (chunk["status"], chunk["attempts"]) == ("completed", 1)


# -- 5. no double full stops -----------------------------------------------------


def test_error_sentences_quoting_a_message_that_ends_a_sentence_add_no_second_stop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    failures: list[str] = []
    # error_rate 1: every request is the server's own "Injected server error."
    with FakeGraphServer({KNOWN: 30}, token=TOKEN, error_rate=1.0) as failing:
        settings = quick_graph_settings(failing.url, TOKEN, max_tries=2)
        with GraphMailSource(settings) as source, pytest.raises(MailSourceError) as gave_up:
            source.count(KNOWN, WHOLE)
        failures.append(str(gave_up.value))
    with FakeGraphServer({KNOWN: 30}, token=TOKEN) as server:
        settings = quick_graph_settings(server.url, TOKEN, max_tries=2)
        with GraphMailSource(settings) as source:
            server.fail_next(503, count=2)  # "Injected fault."
            for mailbox in (KNOWN, GHOST):
                with pytest.raises(MailSourceError) as failed:
                    source.count(mailbox, WHOLE)
                failures.append(str(failed.value))
        refused = {
            "error": "invalid_client",
            "error_description": "AADSTS7000215: Invalid client secret provided.",
        }

        class Refusing:
            def acquire_token_for_client(self, scopes: list[str]) -> dict[str, Any]:
                return refused

        tokens = MsalTokens(Refusing, "x/.default")
        with (
            GraphMailSource(settings, tokens=tokens) as source,
            pytest.raises(MailSourceError) as no_token,
        ):
            source.count(KNOWN, WHOLE)
        failures.append(str(no_token.value))

    assert re.search(r"last: 50\d \w+: Injected server error\.$", failures[0])
    assert failures[1].endswith("last: 503 ServiceUnavailable: Injected fault.")
    assert "is invalid.)" in failures[2]
    assert "Invalid client secret provided; check" in failures[3]
    for text in failures + [r.getMessage() for r in caplog.records]:
        assert ".." not in text, text
        assert ".;" not in text, text


# -- 6. a fixed token refused ------------------------------------------------------


def test_a_refused_fixed_token_is_not_said_to_be_renewed(
    server: FakeGraphServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="syncctl")
    settings = quick_graph_settings(server.url, "expired-fixed-token")
    with (
        GraphMailSource(settings, tokens=StaticToken("expired-fixed-token")) as source,
        pytest.raises(MailSourceError) as failed,
    ):
        source.count(KNOWN, WHOLE)

    said = [r.getMessage() for r in caplog.records if "401" in r.getMessage()]
    assert len(said) == 1
    assert "SYNCCTL_GRAPH_TOKEN is a fixed token, which syncctl cannot renew" in said[0]
    assert "renewing" not in said[0]
    assert failed.value.permanent is True
    assert "fixed token, which syncctl cannot renew" in str(failed.value)
    assert "expired-fixed-token" not in str(failed.value) + "".join(said)
    assert len(server.requests) == 2  # sent once more, in case the refusal was passing


def test_a_refused_app_token_is_renewed_once_and_said_so(
    server: FakeGraphServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="syncctl")

    class App:
        calls = 0

        def acquire_token_for_client(self, scopes: list[str]) -> dict[str, Any]:
            App.calls += 1
            value = "revoked" if App.calls == 1 else TOKEN
            return {"access_token": value, "expires_in": 3600}

    tokens = MsalTokens(App, "x/.default")
    with GraphMailSource(quick_graph_settings(server.url, TOKEN), tokens=tokens) as source:
        assert source.count(KNOWN, WHOLE) == 30

    said = [r.getMessage() for r in caplog.records if "401" in r.getMessage()]
    assert len(said) == 1
    assert "renewing it and trying once more" in said[0]
    assert "fixed" not in said[0]


def test_create_with_a_refused_fixed_token_says_it_cannot_be_renewed(
    database_url: str, server: FakeGraphServer
) -> None:
    env = environment(database_url, server)
    syncctl("store", "add", "--name", "m", "--email", KNOWN, env=env)

    result = syncctl(
        "create", KNOWN, env={**env, "SYNCCTL_GRAPH_TOKEN": "stale-token"}, check=False
    )

    assert result.returncode == 3, result.stderr
    assert "renewing" not in result.stderr
    assert "cannot renew" in one_line_error(result.stderr)
    assert "stale-token" not in result.stderr


# -- 7. a hung request says so while it hangs ---------------------------------------


def test_a_hung_request_is_logged_once_while_it_hangs(
    server: FakeGraphServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="syncctl")
    settings = quick_graph_settings(
        server.url, TOKEN, read_timeout=1.5, slow_request_notice=0.3, max_tries=1
    )
    with GraphMailSource(settings) as source:
        source.count(KNOWN, WHOLE)  # answered at once: nothing to say
        assert not [r for r in caplog.records if "has not answered" in r.getMessage()]

        server.fail_next(hang=True)
        started = time.time()
        with pytest.raises(MailSourceError) as failed:
            source.count(KNOWN, WHOLE)
        ended = time.time()

    assert "read timeout" in str(failed.value)
    waiting = [r for r in caplog.records if "has not answered" in r.getMessage()]
    assert len(waiting) == 1
    notice = waiting[0]
    assert notice.levelno == logging.WARNING
    assert KNOWN in notice.getMessage()
    assert re.search(r" in 0\.[34]s \(GET /v1\.0/users/", notice.getMessage())
    assert "1.5s read timeout" in notice.getMessage()
    # Said while the request hung, not after the timeout ended it.
    assert started + 0.25 <= notice.created < ended - 0.5


def test_slow_request_notices_carry_the_senders_context(server: FakeGraphServer) -> None:
    import contextvars

    chunk: contextvars.ContextVar[str] = contextvars.ContextVar("chunk", default="none")
    seen: list[tuple[str, str]] = []

    class Remember(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "has not answered" in record.getMessage():
                seen.append((chunk.get(), threading.current_thread().name))

    handler = Remember()
    logging.getLogger("syncctl").addHandler(handler)
    try:
        settings = quick_graph_settings(
            server.url, TOKEN, read_timeout=0.8, slow_request_notice=0.2, max_tries=1
        )
        with GraphMailSource(settings) as source:
            server.fail_next(hang=True)
            chunk.set("job 7 chunk 2")
            with pytest.raises(MailSourceError):
                source.count(KNOWN, WHOLE)
    finally:
        logging.getLogger("syncctl").removeHandler(handler)

    assert seen == [("job 7 chunk 2", "syncctl-graph-slow-requests")]


def test_mailbox_not_found_is_a_whole_mailbox_error_naming_it(server: FakeGraphServer) -> None:
    with GraphMailSource(quick_graph_settings(server.url, TOKEN)) as source:
        with pytest.raises(MailboxNotFound) as failed:
            source.check_mailbox(GHOST)
        source.check_mailbox(KNOWN.upper())

    assert (failed.value.permanent, failed.value.whole_mailbox) == (True, True)
    assert failed.value.mailbox == GHOST
    assert failed.value.reason.startswith("404 ErrorInvalidUser")
