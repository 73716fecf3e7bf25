"""The local Graph-compatible server, over real HTTP."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from helpers import WAIT, wait_for
from syncctl.errors import BadInput
from syncctl.fakegraph import FakeGraphServer, parse_mailboxes, serve

TOKEN = "fake-token-for-tests"  # noqa: S105 - the fake server's made-up token
MAILBOX = "megan@contoso.com"


@pytest.fixture
def server() -> Iterator[FakeGraphServer]:
    with FakeGraphServer({MAILBOX: 95, "empty@contoso.com": 0}, seed=7, token=TOKEN) as running:
        yield running


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10) as http:
        yield http


def messages_url(server: FakeGraphServer, mailbox: str = MAILBOX) -> str:
    return f"{server.url}/users/{mailbox}/messages"


def get(client: httpx.Client, url: str, **params: Any) -> httpx.Response:
    return client.get(url, params={k: str(v) for k, v in params.items()})


def ids(server: FakeGraphServer, indexes: range | list[int], mailbox: str = MAILBOX) -> list[str]:
    return [server.message(mailbox, i)["id"] for i in indexes]


def test_lists_ten_newest_first_by_default_with_absolute_next_link(
    server: FakeGraphServer, client: httpx.Client
) -> None:
    first = get(client, messages_url(server)).json()
    second = client.get(first["@odata.nextLink"]).json()

    assert [m["id"] for m in first["value"]] == ids(server, range(94, 84, -1))
    assert first["@odata.nextLink"].startswith(f"{server.url}/users/{MAILBOX}/messages?")
    assert "$skip=10" in first["@odata.nextLink"]
    assert [m["id"] for m in second["value"]] == ids(server, range(84, 74, -1))


def test_next_links_cover_the_mailbox_once_in_ascending_order(
    server: FakeGraphServer, client: httpx.Client
) -> None:
    page = get(client, messages_url(server), **{"$orderby": "receivedDateTime asc", "$top": 30})
    seen = []
    pages = 0
    while True:
        body = page.json()
        seen += [m["id"] for m in body["value"]]
        pages += 1
        if "@odata.nextLink" not in body:
            break
        page = client.get(body["@odata.nextLink"])

    assert seen == ids(server, range(95))
    assert pages == 4


def test_received_times_grow_with_the_index(server: FakeGraphServer) -> None:
    times = [server.received_at(MAILBOX, i) for i in range(95)]
    assert times == sorted(set(times))
    assert server.message(MAILBOX, 3)["receivedDateTime"] == times[3].strftime("%Y-%m-%dT%H:%M:%SZ")


def test_skip_past_the_end_is_an_empty_last_page(
    server: FakeGraphServer, client: httpx.Client
) -> None:
    body = get(client, messages_url(server), **{"$skip": 500}).json()
    assert body["value"] == []
    assert "@odata.nextLink" not in body


@pytest.mark.parametrize(("top", "status"), [(0, 400), (1, 200), (1000, 200), (1001, 400)])
def test_top_must_be_between_1_and_1000(
    server: FakeGraphServer, client: httpx.Client, top: int, status: int
) -> None:
    response = get(client, messages_url(server), **{"$top": top})
    assert response.status_code == status
    if status == 400:
        assert response.json()["error"]["code"] == "ErrorInvalidArgument"


@pytest.mark.parametrize(
    ("operators", "expected"),
    [(("ge", "lt"), range(10, 20)), (("gt", "le"), range(11, 21)), (("ge", "le"), range(10, 21))],
)
def test_received_filter_selects_the_window_for_list_and_count(
    server: FakeGraphServer,
    client: httpx.Client,
    operators: tuple[str, str],
    expected: range,
) -> None:
    start = server.received_at(MAILBOX, 10).strftime("%Y-%m-%dT%H:%M:%SZ")
    end = server.received_at(MAILBOX, 20).strftime("%Y-%m-%dT%H:%M:%SZ")
    where = f"receivedDateTime {operators[0]} {start} and receivedDateTime {operators[1]} {end}"
    listed = get(
        client,
        messages_url(server),
        **{"$filter": where, "$orderby": "receivedDateTime asc", "$top": 100, "$count": "true"},
    ).json()
    counted = get(client, messages_url(server) + "/$count", **{"$filter": where})

    assert [m["id"] for m in listed["value"]] == ids(server, expected)
    assert listed["@odata.count"] == len(expected)
    assert counted.headers["content-type"].startswith("text/plain")
    assert counted.text == str(len(expected))


def test_count_of_whole_and_empty_mailbox(server: FakeGraphServer, client: httpx.Client) -> None:
    assert client.get(messages_url(server) + "/$count").text == "95"
    assert client.get(messages_url(server, "empty@contoso.com") + "/$count").text == "0"
    assert client.get(messages_url(server, "empty@contoso.com")).json()["value"] == []


def test_orderby_not_first_in_filter_is_inefficient_filter(
    server: FakeGraphServer, client: httpx.Client
) -> None:
    response = get(
        client,
        messages_url(server),
        **{
            "$filter": "isRead eq false and receivedDateTime ge 2020-01-01T00:00:00Z",
            "$orderby": "receivedDateTime asc",
        },
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "InefficientFilter"


def test_select_returns_only_id_etag_and_selected(
    server: FakeGraphServer, client: httpx.Client
) -> None:
    body = get(client, messages_url(server), **{"$select": "subject,from", "$top": 3}).json()
    assert {frozenset(m) for m in body["value"]} == {
        frozenset({"@odata.etag", "id", "subject", "from"})
    }
    unknown = get(client, messages_url(server), **{"$select": "subject,nonsense"})
    assert unknown.status_code == 400
    assert "nonsense" in unknown.json()["error"]["message"]


def test_unknown_mailbox_is_404_error_invalid_user(
    server: FakeGraphServer, client: httpx.Client
) -> None:
    response = client.get(messages_url(server, "nobody@contoso.com"))
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "ErrorInvalidUser"
    assert "nobody@contoso.com" in error["message"]


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", f"Basic {TOKEN}"])
def test_missing_or_wrong_token_is_401_and_not_recorded(
    server: FakeGraphServer, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    response = httpx.get(messages_url(server), headers=headers)

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "InvalidAuthenticationToken"
    served = server.requests[-1]
    assert served.authorized is False
    assert "authorization" not in {name.lower() for name in served.headers}


def test_same_seed_same_mail_and_other_seed_other_mail(client: httpx.Client) -> None:
    def first_page(seed: int) -> list[dict[str, Any]]:
        with FakeGraphServer({MAILBOX: 50}, seed=seed, token=TOKEN) as server:
            value: list[dict[str, Any]] = get(client, messages_url(server), **{"$top": 50}).json()[
                "value"
            ]
            return value

    assert first_page(1) == first_page(1)
    assert {m["id"] for m in first_page(1)}.isdisjoint(m["id"] for m in first_page(2))


def test_huge_mailbox_is_served_without_generating_it(client: httpx.Client) -> None:
    size = 50_000_000
    with FakeGraphServer({MAILBOX: size}, token=TOKEN) as server:
        body = get(
            client,
            messages_url(server),
            **{"$orderby": "receivedDateTime asc", "$skip": size - 3, "$count": "true"},
        ).json()
        counted = client.get(messages_url(server) + "/$count").text

        assert [m["id"] for m in body["value"]] == ids(server, range(size - 3, size))
    assert body["@odata.count"] == size
    assert counted == str(size)


def test_generated_mail_is_varied_like_a_real_mailbox() -> None:
    server = FakeGraphServer({MAILBOX: 3000}, seed=3, token=TOKEN)
    mail = [server.message(MAILBOX, i) for i in range(3000)]
    conversations: dict[str, int] = {}
    for m in mail:
        conversations[m["conversationId"]] = conversations.get(m["conversationId"], 0) + 1

    assert {m["body"]["contentType"] for m in mail} == {"html", "text"}
    assert any("\x00" in m["body"]["content"] for m in mail)
    assert any(m["subject"] and "\x00" in m["subject"] for m in mail)
    assert any(m["subject"] and "\ud83d" in m["subject"] for m in mail)
    assert any(m["subject"] is None for m in mail)
    assert any(m["from"] is None for m in mail)
    assert any(m["body"]["content"] == "" for m in mail)
    assert any(len(m["body"]["content"]) > 100_000 for m in mail)
    assert any(m["subject"] and not m["subject"].isascii() for m in mail)
    assert {m["hasAttachments"] for m in mail} == {True, False}
    assert {m["flag"]["flagStatus"] for m in mail} == {"notFlagged", "flagged", "complete"}
    assert max(conversations.values()) > 1  # threads
    assert len({m["id"] for m in mail}) == 3000


def test_lone_surrogate_is_sent_escaped_in_valid_utf8(client: httpx.Client) -> None:
    with FakeGraphServer({MAILBOX: 3000}, seed=3, token=TOKEN) as server:
        index = next(
            i for i in range(3000) if "\ud83d" in (server.message(MAILBOX, i)["subject"] or "")
        )
        response = get(
            client,
            messages_url(server),
            **{"$orderby": "receivedDateTime asc", "$skip": index, "$top": 1},
        )

    text = response.content.decode("utf-8")  # would raise on a raw surrogate
    assert "\\ud83d" in text
    assert "\ud83d" in json.loads(text)["value"][0]["subject"]


def test_throttle_rate_answers_429_with_fractional_retry_after(client: httpx.Client) -> None:
    with FakeGraphServer({MAILBOX: 5}, token=TOKEN, throttle_rate=1.0, retry_after=2.128) as s:
        response = client.get(messages_url(s))

    assert response.status_code == 429
    assert response.headers["Retry-After"] == "2.128"
    assert response.json()["error"]["code"] == "TooManyRequests"


def test_error_rate_answers_server_errors(client: httpx.Client) -> None:
    with FakeGraphServer({MAILBOX: 5}, token=TOKEN, error_rate=1.0) as s:
        statuses = {client.get(messages_url(s)).status_code for _ in range(20)}

    assert statuses <= {500, 502, 503, 504}
    assert len(statuses) > 1


def test_latency_delays_every_answer(client: httpx.Client) -> None:
    with FakeGraphServer({MAILBOX: 5}, token=TOKEN, latency=0.2) as s:
        client.get(messages_url(s))
        served = s.requests[-1]

    assert served.answered_at - served.received_at >= 0.2


def test_hang_never_answers_until_stopped() -> None:
    with (
        FakeGraphServer({MAILBOX: 5}, token=TOKEN, hang=True) as s,
        httpx.Client(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=0.3) as http,
        pytest.raises(httpx.ReadTimeout),
    ):
        http.get(messages_url(s))


def test_fifth_request_in_flight_gets_mailbox_concurrency(server: FakeGraphServer) -> None:
    server.fail_next(hang=True, count=4)
    answers: list[int] = []

    def hanging_request() -> None:
        with httpx.Client(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=WAIT) as http:
            try:
                answers.append(http.get(messages_url(server)).status_code)
            except httpx.HTTPError:
                answers.append(0)

    threads = [threading.Thread(target=hanging_request) for _ in range(4)]
    for thread in threads:
        thread.start()
    wait_for(lambda: server.max_in_flight(MAILBOX) == 4, "four requests in flight")

    fifth = httpx.get(messages_url(server), headers={"Authorization": f"Bearer {TOKEN}"})
    other_mailbox = httpx.get(
        messages_url(server, "empty@contoso.com"), headers={"Authorization": f"Bearer {TOKEN}"}
    )
    server.stop()
    for thread in threads:
        thread.join(WAIT)

    assert fifth.status_code == 429
    assert fifth.json()["error"]["code"] == "ApplicationThrottled"
    assert "MailboxConcurrency" in fifth.json()["error"]["message"]
    assert "Retry-After" in fifth.headers
    assert other_mailbox.status_code == 200
    assert answers == [0, 0, 0, 0]  # the hanging ones were cut off, never answered


def test_fail_next_answers_queued_faults_in_order(
    server: FakeGraphServer, client: httpx.Client
) -> None:
    server.fail_next(503, retry_after=0.5)
    server.fail_next(200, body=b'{"value": [')
    server.fail_next(403, code="ErrorAccessDenied")

    first, second, third, fourth = (client.get(messages_url(server)) for _ in range(4))

    assert (first.status_code, first.headers["Retry-After"]) == (503, "0.5")
    assert (second.status_code, second.content) == (200, b'{"value": [')
    assert (third.status_code, third.json()["error"]["code"]) == (403, "ErrorAccessDenied")
    assert fourth.status_code == 200
    assert [r.status for r in server.requests] == [503, 200, 403, 200]


def test_record_keeps_query_and_headers(server: FakeGraphServer, client: httpx.Client) -> None:
    client.get(
        messages_url(server),
        params={"$top": "5"},
        headers={"Prefer": 'IdType="ImmutableId"'},
    )
    served = server.requests[-1]
    assert served.query == {"$top": "5"}
    assert served.headers["Prefer"] == 'IdType="ImmutableId"'
    assert (served.mailbox, served.status, served.message_count) == (MAILBOX, 200, 5)


def test_delivered_mail_arrives_after_the_rest(server: FakeGraphServer) -> None:
    before = [server.message(MAILBOX, i) for i in range(95)]
    server.deliver(MAILBOX, 5)

    assert server.mailbox_size(MAILBOX) == 100
    assert [server.message(MAILBOX, i) for i in range(95)] == before
    assert server.received_at(MAILBOX, 95) > server.received_at(MAILBOX, 94)


def test_parse_mailboxes_reads_email_equals_count() -> None:
    assert parse_mailboxes(["ann@example.com=10", "b=c@example.com=0"]) == {
        "ann@example.com": 10,
        "b=c@example.com": 0,
    }
    for bad in ("ann@example.com", "ann@example.com=ten", "=5", "ann=5"):
        with pytest.raises(BadInput, match="EMAIL=COUNT"):
            parse_mailboxes([bad])


def test_serve_announces_url_and_token_and_serves_until_stopped() -> None:
    server = FakeGraphServer({MAILBOX: 3}, token=TOKEN)
    lines: list[str] = []
    runner = threading.Thread(target=serve, args=(server,), kwargs={"announce": lines.append})
    runner.start()
    wait_for(lambda: any("SYNCCTL_GRAPH_TOKEN" in line for line in lines), "the announcement")

    response = httpx.get(messages_url(server), headers={"Authorization": f"Bearer {TOKEN}"})
    server.stop()
    runner.join(WAIT)

    assert response.status_code == 200
    assert f"export SYNCCTL_GRAPH_URL={server.url}" in lines
    assert f"export SYNCCTL_GRAPH_TOKEN={TOKEN}" in lines
    assert not runner.is_alive()
