"""The Graph mail source over real HTTP against the local Graph-compatible server."""

from __future__ import annotations

import logging
import math
import os
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from helpers import WAIT, quick_graph_settings, wait_for
from syncctl.config import DatabaseTarget
from syncctl.db import Connection, query
from syncctl.errors import BadInput
from syncctl.fakegraph import FakeGraphServer
from syncctl.graph import (
    IMMUTABLE_IDS,
    SELECT_FIELDS,
    ClientCredentialsApp,
    GraphMailSource,
    GraphSettings,
    MailboxSlots,
    MsalTokens,
    StaticToken,
    message_from_graph,
    open_mail_source,
    window_filter,
)
from syncctl.ingest import write_page
from syncctl.mailsource import MailSourceError, Message, NextLinkExpired, Window
from test_ingest import LEASE, claimed_chunk

# Made-up credentials: the tests check they never show.
TOKEN = "graph-token-5f1c2e9a"  # noqa: S105
CLIENT_SECRET = "client-secret-0b7d44"  # noqa: S105
MAILBOX = "megan@contoso.com"
WHOLE = Window(None, None)


def fast(server: FakeGraphServer, **changes: Any) -> GraphSettings:
    return quick_graph_settings(server.url, TOKEN, **changes)


@pytest.fixture
def server() -> Iterator[FakeGraphServer]:
    with FakeGraphServer({MAILBOX: 2500}, seed=11, token=TOKEN) as running:
        yield running


@pytest.fixture
def source(server: FakeGraphServer) -> Iterator[GraphMailSource]:
    with GraphMailSource(fast(server)) as graph:
        yield graph


def read_all(
    source: GraphMailSource, mailbox: str, window: Window = WHOLE, top: int = 1000
) -> list[Message]:
    """Every message of the window, page by page, as a worker reads the last chunk."""
    page = source.fetch_page(mailbox, window, skip=0, top=top)
    messages = list(page.messages)
    while page.next_link is not None:
        page = source.fetch_page(
            mailbox, window, skip=len(messages), top=top, next_link=page.next_link
        )
        messages += page.messages
    return messages


def expected_ids(server: FakeGraphServer, indexes: range, mailbox: str = MAILBOX) -> list[str]:
    return [server.message(mailbox, i)["id"] for i in indexes]


class FakeApp:
    """Stands in for msal.ConfidentialClientApplication: answers from a script."""

    def __init__(self, *answers: dict[str, Any]) -> None:
        self.answers = list(answers)
        self.calls = 0

    def acquire_token_for_client(self, scopes: list[str]) -> dict[str, Any]:
        self.calls += 1
        assert scopes == ["http://127.0.0.1/.default"] or scopes[0].endswith("/.default")
        return self.answers[min(self.calls, len(self.answers)) - 1]


def apps(*made: FakeApp) -> tuple[Callable[[], ClientCredentialsApp], list[FakeApp]]:
    """A factory handing out the given apps in turn, and the list of those handed out."""
    handed: list[FakeApp] = []

    def factory() -> ClientCredentialsApp:
        handed.append(made[len(handed)])
        return handed[-1]

    return factory, handed


def token(value: str, expires_in: int = 3600) -> dict[str, Any]:
    return {"access_token": value, "token_type": "Bearer", "expires_in": expires_in}


# -- paging -------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 999, 1000, 1001])
def test_next_links_cover_the_mailbox_exactly_once(size: int) -> None:
    with (
        FakeGraphServer({MAILBOX: size}, token=TOKEN) as server,
        GraphMailSource(fast(server)) as source,
    ):
        messages = read_all(source, MAILBOX)

        assert [m.provider_message_id for m in messages] == expected_ids(server, range(size))
        assert len(server.requests) == max(1, math.ceil(size / 1000))
        assert source.count(MAILBOX, WHOLE) == size


def test_every_request_asks_for_immutable_ids_and_stored_fields_only(
    server: FakeGraphServer, source: GraphMailSource
) -> None:
    read_all(source, MAILBOX)
    source.count(MAILBOX, WHOLE)

    assert len(server.requests) == 4
    assert all(r.headers.get("Prefer") == IMMUTABLE_IDS for r in server.requests)
    first, *followed, counted = server.requests
    assert first.query["$select"] == ",".join(SELECT_FIELDS)
    assert first.query["$orderby"] == "receivedDateTime asc"
    assert first.query["$top"] == "1000"
    assert "$skip" not in first.query
    assert all(r.query["$skip"] in ("1000", "2000") for r in followed)
    assert counted.path.endswith("/messages/$count")
    assert counted.headers.get("ConsistencyLevel") == "eventual"
    assert counted.query["$filter"] == first.query["$filter"]


def test_window_limits_the_pages_and_the_count(
    server: FakeGraphServer, source: GraphMailSource
) -> None:
    window = Window(server.received_at(MAILBOX, 100), server.received_at(MAILBOX, 1350))

    messages = read_all(source, MAILBOX, window)

    assert [m.provider_message_id for m in messages] == expected_ids(server, range(100, 1350))
    assert source.count(MAILBOX, window) == 1250


@pytest.mark.parametrize("position", [0, 1, 999, 1249])
def test_received_at_finds_the_time_of_a_position_in_the_window(
    server: FakeGraphServer, source: GraphMailSource, position: int
) -> None:
    window = Window(server.received_at(MAILBOX, 100), server.received_at(MAILBOX, 1350))

    assert source.received_at(MAILBOX, window, position) == server.received_at(
        MAILBOX, 100 + position
    )
    asked = server.requests[-1].query
    assert (asked["$top"], asked.get("$skip", "0"), asked["$select"]) == (
        "1",
        str(position),
        "receivedDateTime",
    )


def test_received_at_past_the_end_of_the_window_is_none(
    server: FakeGraphServer, source: GraphMailSource
) -> None:
    window = Window(None, server.received_at(MAILBOX, 10))
    assert source.received_at(MAILBOX, window, 10) is None


def test_an_expired_next_link_is_its_own_error_and_not_retried(
    server: FakeGraphServer, source: GraphMailSource
) -> None:
    first = source.fetch_page(MAILBOX, WHOLE, skip=0, top=1000)
    assert first.next_link is not None
    server.expire_links()

    with pytest.raises(NextLinkExpired):
        source.fetch_page(MAILBOX, WHOLE, skip=1000, top=1000, next_link=first.next_link)

    assert [r.status for r in server.requests] == [200, 400]  # asked once, not retried
    # A listing that is not a link still works, and hands out links that do.
    again = source.fetch_page(MAILBOX, WHOLE, skip=1000, top=1000)
    assert again.next_link is not None
    assert source.fetch_page(MAILBOX, WHOLE, skip=2000, top=1000, next_link=again.next_link)


def test_chunks_by_skip_with_the_last_reading_to_the_end(
    server: FakeGraphServer, source: GraphMailSource
) -> None:
    first = source.fetch_page(MAILBOX, WHOLE, skip=0, top=600)
    second = source.fetch_page(MAILBOX, WHOLE, skip=600, top=600)
    rest = read_all_from(source, skip=1200)

    ids = [m.provider_message_id for m in [*first.messages, *second.messages, *rest]]
    assert ids == expected_ids(server, range(2500))
    assert server.requests[1].query["$skip"] == "600"


def read_all_from(source: GraphMailSource, *, skip: int) -> list[Message]:
    page = source.fetch_page(MAILBOX, WHOLE, skip=skip, top=1000)
    messages = list(page.messages)
    while page.next_link:
        page = source.fetch_page(MAILBOX, WHOLE, skip=0, top=1000, next_link=page.next_link)
        messages += page.messages
    return messages


def test_top_is_capped_at_graphs_largest_page(
    server: FakeGraphServer, source: GraphMailSource
) -> None:
    page = source.fetch_page(MAILBOX, WHOLE, skip=0, top=5000)
    assert len(page.messages) == 1000
    assert server.requests[0].query["$top"] == "1000"


def test_window_filter_is_utc_with_start_inclusive_and_end_exclusive() -> None:
    plus_two = timezone(timedelta(hours=2))
    window = Window(
        datetime(2024, 1, 2, 5, 4, 5, tzinfo=plus_two),
        datetime(2024, 2, 1, 0, 0, 0, 500000),  # naive: taken as UTC
    )
    assert window_filter(window) == (
        "receivedDateTime ge 2024-01-02T03:04:05Z and "
        "receivedDateTime lt 2024-02-01T00:00:00.500000Z"
    )
    # $orderby must name the first $filter property, so an open start is still a clause.
    assert window_filter(WHOLE) == "receivedDateTime ge 1900-01-01T00:00:00Z"


def test_graph_example_message_maps_every_stored_field() -> None:
    # From Graph's documented list-messages response.
    example = {
        "id": "AAMkAGVmMDEzK",
        "receivedDateTime": "2018-02-13T03:53:55Z",
        "sentDateTime": "2018-02-13T03:53:55Z",
        "hasAttachments": False,
        "internetMessageId": (
            "<DM5PR1501MB2117E943C78792608769840ECDF60@DM5PR1501MB2117.namprd15.prod.outlook.com>"
        ),
        "subject": "MyAnalytics | Your past week",
        "importance": "normal",
        "conversationId": "AAQkAGVmMDEzE",
        "isRead": False,
        "isDraft": False,
        "body": {
            "contentType": "html",
            "content": '<html lang="en">\r\n<head></head>\r\n<body> </body>\r\n</html>\r\n',
        },
        "sender": {"emailAddress": {"name": "MyAnalytics", "address": "no-reply@contoso.com"}},
        "from": {"emailAddress": {"name": "MyAnalytics", "address": "no-reply@contoso.com"}},
        "toRecipients": [
            {"emailAddress": {"name": "Megan Bowen", "address": "MeganB@contoso.com"}}
        ],
        "ccRecipients": [],
        "bccRecipients": [],
        "flag": {"flagStatus": "notFlagged"},
    }

    message = message_from_graph(example)

    assert message.provider_message_id == "AAMkAGVmMDEzK"
    assert message.received_at is not None
    assert message.received_at.isoformat() == ("2018-02-13T03:53:55+00:00")
    assert message.sent_at == message.received_at
    assert message.internet_message_id == example["internetMessageId"]
    assert (message.conversation_id, message.subject) == ("AAQkAGVmMDEzE", example["subject"])
    assert (message.from_address, message.from_name) == ("no-reply@contoso.com", "MyAnalytics")
    assert message.to_recipients == [{"name": "Megan Bowen", "address": "MeganB@contoso.com"}]
    assert (message.cc_recipients, message.bcc_recipients) == ([], [])
    assert (message.is_read, message.is_draft, message.has_attachments) == (False, False, False)
    assert (message.importance, message.flag_status) == ("normal", "notFlagged")
    assert message.body_content_type == "html"
    assert message.body == example["body"]["content"]  # type: ignore[index]


def test_message_with_odd_fields_maps_what_it_can() -> None:
    message = message_from_graph(
        {
            "id": "x",
            "receivedDateTime": "not a time",
            "subject": None,
            "from": None,
            "sender": {"emailAddress": {"address": "s@example.com"}},
            "isRead": "true",  # as in one of Graph's own documented examples
            "toRecipients": [{"emailAddress": {"name": "N"}}, "junk", {"nothing": 1}],
            "body": "not an object",
        }
    )
    assert message.received_at is None
    assert message.subject is None
    assert (message.from_address, message.from_name) == ("s@example.com", None)
    assert message.is_read is True
    assert message.to_recipients == [{"name": "N", "address": None}]
    assert (message.body, message.body_content_type) == (None, None)


def test_generated_mail_with_bad_text_is_fetched_and_stored(conn: Connection) -> None:
    chunk = claimed_chunk(conn, MAILBOX)
    with (
        FakeGraphServer({MAILBOX: 3000}, seed=3, token=TOKEN) as server,
        GraphMailSource(fast(server)) as source,
    ):
        page = source.fetch_page(MAILBOX, WHOLE, skip=0, top=1000)
        while True:
            write_page(conn, chunk, page.messages, checkpoint={"next": page.next_link}, lease=LEASE)
            if page.next_link is None:
                break
            page = source.fetch_page(MAILBOX, WHOLE, skip=0, top=1000, next_link=page.next_link)
        with_surrogate = next(
            i for i in range(3000) if "\ud83d" in (server.message(MAILBOX, i)["subject"] or "")
        )
        surrogate_id = server.message(MAILBOX, with_surrogate)["id"]

    stored = conn.execute(
        "SELECT count(*) AS n, count(*) FILTER (WHERE body LIKE '%%x%%') AS long FROM emails"
    ).fetchone()
    assert stored is not None
    assert stored["n"] == 3000
    subject = conn.execute(
        "SELECT subject FROM emails WHERE provider_message_id = %s", (surrogate_id,)
    ).fetchone()
    assert subject is not None
    assert subject["subject"].endswith("\ufffd")


# -- faults -------------------------------------------------------------------


@pytest.mark.parametrize("status", [429, 503])
@pytest.mark.parametrize("retry_after", [1, 0.35])
def test_throttled_request_waits_as_retry_after_says(
    server: FakeGraphServer, source: GraphMailSource, status: int, retry_after: float
) -> None:
    server.fail_next(status, retry_after=retry_after)

    page = source.fetch_page(MAILBOX, WHOLE, skip=0, top=10)

    throttled, retried = server.requests
    assert (throttled.status, retried.status) == (status, 200)
    assert retried.received_at - throttled.answered_at >= retry_after
    assert len(page.messages) == 10


def test_retry_after_is_capped(server: FakeGraphServer) -> None:
    waits: list[float] = []
    with GraphMailSource(fast(server, retry_after_cap=0.2), sleep=waits.append) as source:
        server.fail_next(429, retry_after=3600)
        source.fetch_page(MAILBOX, WHOLE, skip=0, top=10)
    assert waits == [0.2]


def test_server_errors_are_retried_with_growing_capped_backoff(server: FakeGraphServer) -> None:
    waits: list[float] = []
    settings = fast(server, max_tries=5, backoff_base=0.1, backoff_cap=0.3)
    with GraphMailSource(settings, sleep=waits.append) as source:
        for status in (500, 502, 503, 504):
            server.fail_next(status)
        page = source.fetch_page(MAILBOX, WHOLE, skip=0, top=10)

    assert [r.status for r in server.requests] == [500, 502, 503, 504, 200]
    assert len(page.messages) == 10
    assert 0.05 <= waits[0] <= 0.1
    assert 0.1 <= waits[1] <= 0.2
    assert all(0.15 <= w <= 0.3 for w in waits[2:])


def test_bounded_retries_then_a_transient_error(
    server: FakeGraphServer, source: GraphMailSource
) -> None:
    server.fail_next(503, count=10, code="ServiceUnavailable")

    with pytest.raises(MailSourceError) as failed:
        source.fetch_page(MAILBOX, WHOLE, skip=0, top=10)

    assert failed.value.permanent is False
    assert "after 3 tries" in str(failed.value)
    assert "503 ServiceUnavailable" in str(failed.value)
    assert MAILBOX in str(failed.value)
    assert len(server.requests) == 3


def test_unknown_mailbox_fails_permanently_naming_it(
    server: FakeGraphServer, source: GraphMailSource
) -> None:
    with pytest.raises(MailSourceError) as failed:
        source.fetch_page("ghost@contoso.com", WHOLE, skip=0, top=10)

    assert (failed.value.permanent, failed.value.whole_mailbox) == (True, True)
    assert "ghost@contoso.com" in str(failed.value)
    assert "ErrorInvalidUser" in str(failed.value)
    assert len(server.requests) == 1


def test_access_denied_fails_permanently_at_once(
    server: FakeGraphServer, source: GraphMailSource
) -> None:
    server.fail_next(403, code="ErrorAccessDenied")

    with pytest.raises(MailSourceError) as failed:
        source.count(MAILBOX, WHOLE)

    assert (failed.value.permanent, failed.value.whole_mailbox) == (True, True)
    assert MAILBOX in str(failed.value)
    assert "Mail.Read" in str(failed.value)
    assert len(server.requests) == 1


def test_unauthorized_renews_the_token_once_then_succeeds(server: FakeGraphServer) -> None:
    factory, handed = apps(FakeApp(token("revoked-token")), FakeApp(token(TOKEN)))
    tokens = MsalTokens(factory, "http://127.0.0.1/.default")
    with GraphMailSource(fast(server), tokens=tokens) as source:
        page = source.fetch_page(MAILBOX, WHOLE, skip=0, top=10)
        source.fetch_page(MAILBOX, WHOLE, skip=10, top=10)

    assert len(page.messages) == 10
    assert [r.authorized for r in server.requests] == [False, True, True]
    assert [app.calls for app in handed] == [1, 1]  # the new token is kept, not fetched again


def test_unauthorized_after_renewal_fails_permanently_as_refused(
    server: FakeGraphServer,
) -> None:
    with (
        GraphMailSource(fast(server), tokens=StaticToken("no-longer-valid")) as source,
        pytest.raises(MailSourceError) as failed,
    ):
        source.fetch_page(MAILBOX, WHOLE, skip=0, top=10)

    assert failed.value.permanent is True
    assert "credentials were refused" in str(failed.value)
    assert MAILBOX in str(failed.value)
    assert "no-longer-valid" not in str(failed.value)
    assert len(server.requests) == 2


def test_refused_app_credentials_fail_permanently(server: FakeGraphServer) -> None:
    refused = {
        "error": "invalid_client",
        "error_description": "AADSTS7000215: Invalid client secret provided.\r\nTrace ID: 1",
    }
    factory, _ = apps(FakeApp(refused))
    with (
        GraphMailSource(fast(server), tokens=MsalTokens(factory, "x/.default")) as source,
        pytest.raises(MailSourceError) as failed,
    ):
        source.fetch_page(MAILBOX, WHOLE, skip=0, top=10)

    assert failed.value.permanent is True
    assert "credentials were refused" in str(failed.value)
    assert "invalid_client" in str(failed.value)
    assert server.requests == []


def test_identity_platform_hiccup_is_retried(server: FakeGraphServer) -> None:
    busy = {"error": "temporarily_unavailable", "error_description": "try later"}
    factory, handed = apps(FakeApp(busy, token(TOKEN)))
    with GraphMailSource(fast(server), tokens=MsalTokens(factory, "x/.default")) as source:
        page = source.fetch_page(MAILBOX, WHOLE, skip=0, top=10)

    assert len(page.messages) == 10
    assert handed[0].calls == 2


@pytest.mark.parametrize(
    "body",
    [
        b'{"value": [{"id": "AAMkAG1"',
        b"<html><body>502 Bad Gateway</body></html>",
        b'{"value": "not a list"}',
        b'[{"id": "x"}]',
        b'{"value": [{"subject": "no id"}]}',
        b'{"value": [], "@odata.nextLink": 5}',
    ],
)
def test_page_that_is_not_graph_json_fails_the_attempt_and_writes_nothing(
    server: FakeGraphServer, source: GraphMailSource, conn: Connection, body: bytes
) -> None:
    chunk = claimed_chunk(conn, MAILBOX)
    first = source.fetch_page(MAILBOX, WHOLE, skip=0, top=10)
    write_page(conn, chunk, first.messages, checkpoint={"next": first.next_link}, lease=LEASE)
    server.fail_next(200, body=body)

    with pytest.raises(MailSourceError) as failed:
        source.fetch_page(MAILBOX, WHOLE, skip=10, top=10, next_link=first.next_link)

    assert failed.value.permanent is False
    assert "not valid Graph JSON" in str(failed.value)
    assert MAILBOX in str(failed.value)
    row = conn.execute("SELECT count(*) AS n FROM emails").fetchone()
    assert row is not None
    assert row["n"] == 10
    state = conn.execute(
        "SELECT checkpoint FROM chunked_sync_jobs WHERE id = %s", (chunk.id,)
    ).fetchone()
    assert state is not None
    assert state["checkpoint"] == {"next": first.next_link}


def test_hanging_server_costs_a_read_timeout_per_try() -> None:
    outcome: list[BaseException] = []
    with FakeGraphServer({MAILBOX: 5}, token=TOKEN, hang=True) as server:
        settings = fast(server, read_timeout=0.2, max_tries=2)

        def fetch() -> None:
            with GraphMailSource(settings) as source:
                try:
                    source.fetch_page(MAILBOX, WHOLE, skip=0, top=10)
                except MailSourceError as exc:
                    outcome.append(exc)

        worker = threading.Thread(target=fetch)
        worker.start()
        worker.join(WAIT)
        assert not worker.is_alive(), "the read timeout did not end the hung request"
        assert len(server.requests) == 2

    assert len(outcome) == 1
    assert isinstance(outcome[0], MailSourceError)
    assert not outcome[0].permanent
    assert "read timeout" in str(outcome[0])


def test_next_link_to_another_host_is_refused(
    server: FakeGraphServer, source: GraphMailSource
) -> None:
    with pytest.raises(MailSourceError) as failed:
        source.fetch_page(
            MAILBOX, WHOLE, skip=0, top=10, next_link="https://elsewhere.example/v1.0/users/x"
        )
    assert failed.value.permanent is True
    assert server.requests == []


# -- secrets ------------------------------------------------------------------


def test_no_secret_in_errors_logs_tracebacks_or_reprs(
    server: FakeGraphServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = fast(server, client_secret=CLIENT_SECRET, tenant_id="t", client_id="c")
    failures: list[MailSourceError] = []
    with GraphMailSource(settings) as source:
        source.fetch_page(MAILBOX, WHOLE, skip=0, top=10)
        server.fail_next(503, count=3)
        server.fail_next(429, retry_after=0.01)
        calls: list[Callable[[], object]] = [
            lambda: source.fetch_page(MAILBOX, WHOLE, skip=0, top=10),  # retries, gives up
            lambda: source.fetch_page("ghost@contoso.com", WHOLE, skip=0, top=10),
        ]
        for call in calls:
            with pytest.raises(MailSourceError) as failed:
                call()
            failures.append(failed.value)
        server.token = "rotated"  # noqa: S105 - the server stops accepting TOKEN
        with pytest.raises(MailSourceError) as refused:
            source.count(MAILBOX, WHOLE)
        failures.append(refused.value)
        shown = [repr(settings), str(settings), repr(source), repr(StaticToken(TOKEN))]

    refused_app = {"error": "invalid_client", "error_description": "AADSTS7000215"}
    factory, _ = apps(FakeApp(refused_app))
    tokens = MsalTokens(factory, "x/.default")
    with GraphMailSource(settings, tokens=tokens) as source:
        with pytest.raises(MailSourceError) as no_token:
            source.fetch_page(MAILBOX, WHOLE, skip=0, top=10)
        failures.append(no_token.value)
        shown.append(repr(tokens))

    shown += [str(f) for f in failures]
    shown += ["".join(traceback.format_exception(f)) for f in failures]
    shown.append(caplog.text)
    assert "credentials were refused" in str(failures[2])
    assert caplog.text  # the retries were logged
    for text in shown:
        assert TOKEN not in text
        assert CLIENT_SECRET not in text


# -- settings -----------------------------------------------------------------


def test_settings_from_environment() -> None:
    settings = GraphSettings.from_env(
        {
            "SYNCCTL_GRAPH_URL": "https://graph.microsoft.us/v1.0/",
            "SYNCCTL_TENANT_ID": "tenant",
            "SYNCCTL_CLIENT_ID": "client",
            "SYNCCTL_CLIENT_SECRET": CLIENT_SECRET,
            "SYNCCTL_AUTHORITY_HOST": "login.microsoftonline.us",
        }
    )
    assert settings.url == "https://graph.microsoft.us/v1.0"
    assert settings.scope == "https://graph.microsoft.us/.default"
    assert settings.authority == "https://login.microsoftonline.us/tenant"
    assert CLIENT_SECRET not in repr(settings)

    default = GraphSettings.from_env({"SYNCCTL_GRAPH_TOKEN": TOKEN})
    assert default.url == "https://graph.microsoft.com/v1.0"
    assert default.authority_host == "https://login.microsoftonline.com"
    assert TOKEN not in repr(default)


@pytest.mark.parametrize(
    ("environ", "complaint"),
    [
        ({}, "No Graph credentials"),
        ({"SYNCCTL_TENANT_ID": "t", "SYNCCTL_CLIENT_ID": "c"}, "SYNCCTL_CLIENT_SECRET"),
        ({"SYNCCTL_GRAPH_TOKEN": "x", "SYNCCTL_GRAPH_URL": "graph.local"}, "not an http"),
    ],
)
def test_incomplete_settings_are_bad_input(environ: dict[str, str], complaint: str) -> None:
    with pytest.raises(BadInput, match=complaint):
        GraphSettings.from_env(environ)


def test_static_token_wins_over_app_credentials(server: FakeGraphServer) -> None:
    settings = GraphSettings.from_env(
        {
            "SYNCCTL_GRAPH_URL": server.url,
            "SYNCCTL_GRAPH_TOKEN": TOKEN,
            "SYNCCTL_TENANT_ID": "t",
            "SYNCCTL_CLIENT_ID": "c",
            "SYNCCTL_CLIENT_SECRET": CLIENT_SECRET,
        }
    )
    with GraphMailSource(settings) as source:
        assert source.count(MAILBOX, WHOLE) == 2500


def test_app_token_is_kept_until_shortly_before_it_expires() -> None:
    now = [1000.0]
    factory, handed = apps(FakeApp(token("first", 3600), token("second", 3600)))
    tokens = MsalTokens(factory, "x/.default", margin=300, clock=lambda: now[0])

    seen = [tokens.token()]
    now[0] += 3299
    seen.append(tokens.token())
    now[0] += 2
    seen.append(tokens.token())

    assert seen == ["first", "first", "second"]
    assert handed[0].calls == 2


def test_renewal_after_401_is_shared_by_threads_that_saw_the_same_token() -> None:
    factory, handed = apps(FakeApp(token("old")), FakeApp(token("new")))
    tokens = MsalTokens(factory, "x/.default")
    rejected = tokens.token()

    assert tokens.refresh(rejected) == "new"
    assert tokens.refresh(rejected) == "new"  # a second thread with the same 401
    assert len(handed) == 2


# -- the per-mailbox request limit ------------------------------------------


def test_in_flight_limit_holds_across_processes_sharing_the_database(
    target: DatabaseTarget,
) -> None:
    with FakeGraphServer({MAILBOX: 100}, token=TOKEN, latency=0.1, enforce_concurrency=4) as server:
        # Each source stands for one process: its own slots and database connection.
        sources = [
            GraphMailSource(fast(server, max_tries=1), slots=MailboxSlots(target)) for _ in range(2)
        ]
        start = threading.Barrier(12)
        fetched: list[int] = []
        errors: list[BaseException] = []

        def fetch(source: GraphMailSource, number: int) -> None:
            start.wait()
            try:
                page = source.fetch_page(MAILBOX, WHOLE, skip=number, top=1)
                fetched.append(len(page.messages))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=fetch, args=(sources[n % 2], n)) for n in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
        for source in sources:
            source.close()

        assert errors == []
        assert fetched == [1] * 12
        assert server.max_in_flight(MAILBOX) <= 4
        assert [r for r in server.requests if r.status == 429] == []


def test_request_waits_for_a_slot_held_by_another_process(
    target: DatabaseTarget, conn: Connection
) -> None:
    server = FakeGraphServer({MAILBOX: 100, "other@contoso.com": 5}, token=TOKEN).start()
    holding = GraphMailSource(
        fast(server, max_tries=1, read_timeout=WAIT), slots=MailboxSlots(target)
    )
    waiting = GraphMailSource(fast(server, max_tries=1), slots=MailboxSlots(target, max_wait=0.3))
    outcomes: list[str] = []

    def hang_on_graph() -> None:
        try:
            holding.fetch_page(MAILBOX, WHOLE, skip=0, top=1)
            outcomes.append("answered")
        except MailSourceError:
            outcomes.append("cut off")

    server.fail_next(hang=True, count=4)
    threads = [threading.Thread(target=hang_on_graph) for _ in range(4)]
    try:
        for thread in threads:
            thread.start()
        wait_for(lambda: server.max_in_flight(MAILBOX) == 4, "four requests in flight")
        held = conn.execute(query("request_slots_in_use"), {"mailbox": MAILBOX}).fetchall()

        with pytest.raises(MailSourceError, match="No Graph request slot") as waited:
            waiting.fetch_page(MAILBOX, WHOLE, skip=0, top=1)
        other = waiting.fetch_page("other@contoso.com", WHOLE, skip=0, top=1)
    finally:
        server.stop()
        for thread in threads:
            thread.join(WAIT)
        holding.close()
        waiting.close()

    assert [row["slot"] for row in held] == [0, 1, 2, 3]
    assert waited.value.permanent is False
    assert len(other.messages) == 1  # another mailbox has slots of its own
    assert len([r for r in server.requests if r.mailbox == MAILBOX]) == 4  # no fifth was sent
    assert outcomes == ["cut off"] * 4
    # Every slot was given back, even by requests that failed.
    assert conn.execute(query("request_slots_in_use"), {"mailbox": MAILBOX}).fetchall() == []


def test_slots_of_a_crashed_process_come_free_when_their_lease_ends(
    target: DatabaseTarget, conn: Connection
) -> None:
    crashed = MailboxSlots(target, lease=0.5)
    holds = [crashed.hold(MAILBOX) for _ in range(4)]
    taken = sorted(hold.__enter__() for hold in holds)
    crashed.close()  # gone without giving its slots back

    survivor = MailboxSlots(target, max_wait=WAIT)
    try:
        in_use = conn.execute(query("request_slots_in_use"), {"mailbox": MAILBOX}).fetchall()
        with survivor.hold(MAILBOX) as slot:
            assert slot in taken
    finally:
        survivor.close()
        for hold in holds:
            hold.__exit__(None, None, None)
        crashed.close()

    assert taken == [0, 1, 2, 3]
    assert len(in_use) == 4


def test_slot_rows_lost_in_a_database_crash_are_made_again(
    target: DatabaseTarget, conn: Connection
) -> None:
    # graph_request_slots is UNLOGGED: crash recovery and a promoted standby empty it.
    slots = MailboxSlots(target, max_wait=WAIT)
    try:
        with slots.hold(MAILBOX):
            pass
        conn.execute("TRUNCATE graph_request_slots")

        with slots.hold(MAILBOX) as slot:
            held = conn.execute(query("request_slots_in_use"), {"mailbox": MAILBOX}).fetchall()
    finally:
        slots.close()

    assert [row["slot"] for row in held] == [slot]


def test_slots_of_a_killed_process_on_this_host_come_free_at_once(
    target: DatabaseTarget, conn: Connection
) -> None:
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(gone.stdout)
    host = socket.gethostname()
    holders = [f"{host}:{dead_pid}:killed{n}" for n in range(3)] + [f"{host}:{os.getppid()}:alive"]
    conn.execute(query("ensure_request_slots"), {"mailbox": MAILBOX, "limit": 4})
    for slot, holder in enumerate(holders):
        conn.execute(
            "UPDATE graph_request_slots SET holder = %s, expires_at = now() + interval '10 minutes'"
            " WHERE mailbox = %s AND slot = %s",
            [holder, MAILBOX, slot],
        )
    survivor = MailboxSlots(target, max_wait=WAIT)
    started = time.monotonic()
    try:
        with survivor.hold(MAILBOX) as slot:
            waited = time.monotonic() - started
            in_use = conn.execute(query("request_slots_in_use"), {"mailbox": MAILBOX}).fetchall()
    finally:
        survivor.close()

    assert slot in (0, 1, 2)
    assert waited < 5, f"waited {waited:.1f}s for a slot of a process that is gone"
    # The dead process's other slots were given back; the live one's was not.
    assert sorted(row["slot"] for row in in_use) == [slot, 3]


def test_open_mail_source_reads_the_environment_and_uses_database_slots(
    server: FakeGraphServer,
    target: DatabaseTarget,
    conn: Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SYNCCTL_GRAPH_URL", server.url)
    monkeypatch.setenv("SYNCCTL_GRAPH_TOKEN", TOKEN)
    for name in ("SYNCCTL_TENANT_ID", "SYNCCTL_CLIENT_ID", "SYNCCTL_CLIENT_SECRET"):
        monkeypatch.delenv(name, raising=False)

    source = open_mail_source(target)
    try:
        assert source.count(MAILBOX.upper(), WHOLE) == 2500
    finally:
        source.close()

    slots = conn.execute("SELECT mailbox, slot FROM graph_request_slots ORDER BY slot").fetchall()
    assert slots == [{"mailbox": MAILBOX, "slot": n} for n in range(4)]


def test_open_mail_source_without_credentials_is_bad_input(
    target: DatabaseTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in (
        "SYNCCTL_GRAPH_TOKEN",
        "SYNCCTL_TENANT_ID",
        "SYNCCTL_CLIENT_ID",
        "SYNCCTL_CLIENT_SECRET",
    ):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(BadInput, match="SYNCCTL_GRAPH_TOKEN"):
        open_mail_source(target)
