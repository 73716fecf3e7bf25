"""The local Graph-compatible server, over real HTTP."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest

from helpers import WAIT, wait_for
from syncctl.errors import BadInput
from syncctl.fakegraph import FIRST_ADDED_INDEX, FakeGraphServer, parse_mailboxes, serve

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


def graph_time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def every_page(client: httpx.Client, url: str, **params: Any) -> list[str]:
    """The ids of a listing, following @odata.nextLink to its last page."""
    page = get(client, url, **params).json()
    seen = [m["id"] for m in page["value"]]
    while "@odata.nextLink" in page:
        page = client.get(page["@odata.nextLink"]).json()
        seen += [m["id"] for m in page["value"]]
    return seen


def count(client: httpx.Client, url: str, **params: Any) -> int:
    """The /$count of a listing, checked against its @odata.count."""
    counted = int(get(client, url + "/$count", **params).text)
    listed = get(client, url, **params, **{"$count": "true"}).json()
    assert listed["@odata.count"] == counted
    return counted


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


TIED = "tied@contoso.com"


@pytest.mark.parametrize(
    ("operators", "expected"),
    [(("ge", "lt"), range(6, 12)), (("gt", "le"), range(9, 15)), (("ge", "le"), range(6, 15))],
)
def test_tied_messages_share_a_time_and_a_window_takes_whole_ties(
    server: FakeGraphServer,
    client: httpx.Client,
    operators: tuple[str, str],
    expected: range,
) -> None:
    server.add_mailbox(TIED, 30, same_time=3)
    times = [server.received_at(TIED, i) for i in range(30)]
    start, end = graph_time(times[6]), graph_time(times[12])
    where = f"receivedDateTime {operators[0]} {start} and receivedDateTime {operators[1]} {end}"
    listed = get(
        client,
        messages_url(server, TIED),
        **{"$filter": where, "$orderby": "receivedDateTime asc", "$top": 100},
    ).json()

    assert times == sorted(times)
    assert len(set(times)) == 10
    assert times[6] == times[8] < times[9]
    assert [m["id"] for m in listed["value"]] == ids(server, expected, TIED)
    assert count(client, messages_url(server, TIED), **{"$filter": where}) == len(expected)


def test_eq_filter_lists_every_message_of_a_tie(
    server: FakeGraphServer, client: httpx.Client
) -> None:
    server.add_mailbox(TIED, 30, same_time=3)
    where = f"receivedDateTime eq {graph_time(server.received_at(TIED, 7))}"

    listed = get(client, messages_url(server, TIED), **{"$filter": where}).json()

    assert {m["id"] for m in listed["value"]} == set(ids(server, range(6, 9), TIED))


def test_paging_through_a_tied_mailbox_returns_every_message_once(
    server: FakeGraphServer, client: httpx.Client
) -> None:
    server.add_mailbox(TIED, 50, same_time=4)
    url = messages_url(server, TIED)

    # Pages of three split every tie of four.
    ascending = every_page(client, url, **{"$orderby": "receivedDateTime asc", "$top": 3})
    descending = every_page(client, url, **{"$orderby": "receivedDateTime desc", "$top": 3})

    assert ascending == ids(server, range(50), TIED)
    assert descending == ascending[::-1]


def test_deleted_messages_are_not_listed_counted_or_skipped_over(
    server: FakeGraphServer, client: httpx.Client
) -> None:
    server.delete_messages(MAILBOX, [3, 5, 5])
    server.delete_messages(MAILBOX, [5])
    oldest = server.delete_oldest(MAILBOX, 2)
    kept = [i for i in range(95) if i not in {0, 1, 3, 5}]
    url = messages_url(server)
    ascending = {"$orderby": "receivedDateTime asc"}
    skipped = get(client, url, **ascending, **{"$skip": 2, "$top": 3}).json()
    newest_last = get(client, url, **{"$skip": 88, "$top": 10}).json()
    where = (
        f"receivedDateTime ge {graph_time(server.received_at(MAILBOX, 2))}"
        f" and receivedDateTime lt {graph_time(server.received_at(MAILBOX, 7))}"
    )

    assert oldest == ids(server, [0, 1])
    assert server.mailbox_size(MAILBOX) == server.mailboxes[MAILBOX] == 91
    assert count(client, url) == 91
    assert [m["id"] for m in skipped["value"]] == ids(server, [6, 7, 8])
    assert [m["id"] for m in newest_last["value"]] == ids(server, [6, 4, 2])
    assert every_page(client, url, **ascending, **{"$top": 7}) == ids(server, kept)
    assert count(client, url, **{"$filter": where}) == 3
    assert every_page(client, url, **{"$filter": where}) == ids(server, [6, 4, 2])
    assert server.delete_oldest(MAILBOX, 2) == ids(server, [2, 4])


def test_deleting_a_message_the_mailbox_never_had_is_refused(server: FakeGraphServer) -> None:
    with pytest.raises(ValueError, match="no message 95"):
        server.delete_messages(MAILBOX, [94, 95])
    assert server.mailbox_size(MAILBOX) == 95


def test_added_messages_are_listed_in_received_order_among_the_others(
    server: FakeGraphServer, client: httpx.Client
) -> None:
    at_10, at_11, at_30, at_31 = (server.received_at(MAILBOX, i) for i in (10, 11, 30, 31))
    assert at_31 - at_30 > timedelta(seconds=2)  # room for a message strictly between
    # Added at one time: after the generated message there, in the order added.
    tied = server.add_messages(MAILBOX, [at_10, at_10])
    tied += server.add_messages(MAILBOX, [at_10])
    [between, earliest, latest] = server.add_messages(
        MAILBOX,
        [
            at_30 + (at_31 - at_30) / 2,
            server.received_at(MAILBOX, 0) - timedelta(days=1),
            server.received_at(MAILBOX, 94) + timedelta(days=1),
        ],
    )
    url = messages_url(server)
    expected = [
        earliest,
        *ids(server, range(11)),
        *tied,
        *ids(server, range(11, 31)),
        between,
        *ids(server, range(31, 95)),
        latest,
    ]
    window = f"receivedDateTime ge {graph_time(at_10)} and receivedDateTime lt {graph_time(at_11)}"
    newest = get(client, url, **{"$top": 3}).json()

    assert every_page(client, url, **{"$orderby": "receivedDateTime asc", "$top": 9}) == expected
    assert [m["id"] for m in newest["value"]] == [latest, *ids(server, [94, 93])]
    assert server.mailbox_size(MAILBOX) == count(client, url) == 101
    assert every_page(client, url, **{"$filter": window, "$orderby": "receivedDateTime asc"}) == [
        *ids(server, [10]),
        *tied,
    ]
    assert count(client, url, **{"$filter": window}) == 4
    added = server.message(MAILBOX, FIRST_ADDED_INDEX)
    assert (added["id"], added["receivedDateTime"]) == (tied[0], graph_time(at_10))
    assert {"subject", "body", "from", "conversationId"} <= set(added)


def test_message_ids_are_what_the_mailbox_holds_after_changes(
    server: FakeGraphServer, client: httpx.Client
) -> None:
    added = server.add_messages(
        MAILBOX, [server.received_at(MAILBOX, 50), server.received_at(MAILBOX, 2)]
    )
    server.delete_messages(MAILBOX, [0, 50, FIRST_ADDED_INDEX + 1])
    server.deliver(MAILBOX, 2)
    server.delete_oldest(MAILBOX, 1)
    # The one added at message 50's time stays where 50 was, before 51.
    expected = [*ids(server, range(2, 50)), added[0], *ids(server, range(51, 97))]

    assert server.message_ids(MAILBOX) == expected
    assert server.mailbox_size(MAILBOX) == server.mailboxes[MAILBOX] == len(expected) == 95
    assert every_page(client, messages_url(server), **{"$orderby": "receivedDateTime asc"}) == (
        expected
    )


def test_before_answer_holds_chosen_requests_in_flight_until_released(
    server: FakeGraphServer, client: httpx.Client
) -> None:
    start, end = (graph_time(server.received_at(MAILBOX, i)) for i in (10, 20))
    where = f"receivedDateTime ge {start} and receivedDateTime lt {end}"
    release = threading.Event()
    hooked: list[tuple[str, str | None]] = []

    def hold_the_window(mailbox: str, query: dict[str, str]) -> None:
        hooked.append((mailbox, query.get("$filter")))
        if query.get("$filter", "").startswith(f"receivedDateTime ge {start}"):
            release.wait(WAIT)

    answers: list[list[str]] = []

    def held_request() -> None:
        with httpx.Client(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=WAIT) as http:
            body = get(http, messages_url(server), **{"$filter": where, "$top": 100}).json()
            answers.append([m["id"] for m in body["value"]])

    server.before_answer = hold_the_window
    threads = [threading.Thread(target=held_request) for _ in range(2)]
    for thread in threads:
        thread.start()
    wait_for(lambda: server.max_in_flight(MAILBOX) == 2, "two held requests in flight")
    unheld = get(client, messages_url(server), **{"$top": 1})
    unauthorized = httpx.get(messages_url(server))
    server.delete_messages(MAILBOX, [10, 11])  # while held: their answers come after it
    release.set()
    for thread in threads:
        thread.join(WAIT)

    assert unheld.status_code == 200
    assert unauthorized.status_code == 401
    assert answers == [ids(server, range(19, 11, -1))] * 2
    # Called for the held and the unheld request, not for the unauthorized one.
    assert sorted(hooked, key=lambda call: call[1] or "") == [
        (MAILBOX, None),
        (MAILBOX, where),
        (MAILBOX, where),
    ]


def test_before_answer_that_raises_is_answered_500_and_logged(
    server: FakeGraphServer, client: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(mailbox: str, query: dict[str, str]) -> None:
        raise RuntimeError("the hook broke")

    server.before_answer = broken
    with caplog.at_level(logging.ERROR, logger="syncctl.fakegraph"):
        failed = client.get(messages_url(server))
    server.before_answer = None
    after = client.get(messages_url(server))

    assert failed.status_code == 500
    assert failed.json()["error"]["code"] == "InternalServerError"
    assert "the hook broke" in caplog.text
    assert after.status_code == 200


def test_expired_next_link_is_refused_and_a_fresh_listing_pages_on(
    server: FakeGraphServer, client: httpx.Client
) -> None:
    ascending = {"$orderby": "receivedDateTime asc", "$top": 30}
    old_link = get(client, messages_url(server), **ascending).json()["@odata.nextLink"]
    before_expiry = client.get(old_link)
    server.expire_links()
    refused = client.get(old_link)
    fresh = get(client, messages_url(server), **ascending).json()
    new_link = fresh["@odata.nextLink"]
    second = client.get(new_link).json()
    third = client.get(second["@odata.nextLink"])

    assert "$skip=30" in old_link
    assert "$skiptoken=" in old_link
    assert before_expiry.status_code == 200
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "BadRequest"
    assert "page token is no longer valid" in refused.json()["error"]["message"]
    assert [m["id"] for m in fresh["value"]] == ids(server, range(30))
    assert new_link != old_link
    assert [m["id"] for m in second["value"]] == ids(server, range(30, 60))
    assert third.status_code == 200
