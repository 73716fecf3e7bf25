"""The local Graph server's mail folders, delta rounds, changes and control endpoint, over HTTP."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from helpers import wait_for
from syncctl.fakegraph import FIRST_ADDED_INDEX, FakeGraphServer

TOKEN = "fake-token-for-tests"  # noqa: S105 - the fake server's made-up token
MAILBOX = "megan@contoso.com"
OTHER = "adele@contoso.com"
NOT_FOUND = "The specified object was not found in the store."
FOLDER_KEYS = {
    "id",
    "displayName",
    "parentFolderId",
    "childFolderCount",
    "unreadItemCount",
    "totalItemCount",
    "isHidden",
}


@pytest.fixture
def server() -> Iterator[FakeGraphServer]:
    with FakeGraphServer({MAILBOX: 300, OTHER: 40}, seed=11, token=TOKEN) as running:
        yield running


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as http:
        yield http


def user_url(server: FakeGraphServer, mailbox: str = MAILBOX) -> str:
    return f"{server.url}/users/{mailbox}"


def delta_url(server: FakeGraphServer, folder: str, mailbox: str = MAILBOX) -> str:
    return f"{user_url(server, mailbox)}/mailFolders/{folder}/messages/delta"


def folder_id(server: FakeGraphServer, name: str, mailbox: str = MAILBOX) -> str:
    found: str = next(f["id"] for f in server.folders(mailbox) if f["name"] == name)
    return found


def page_size(size: int) -> dict[str, str]:
    return {"Prefer": f'IdType="ImmutableId", odata.maxpagesize={size}'}


@dataclass
class Round:
    """What one delta round handed out, page by page."""

    pages: list[dict[str, Any]] = field(default_factory=list)
    responses: list[httpx.Response] = field(default_factory=list)

    @property
    def items(self) -> list[dict[str, Any]]:
        return [item for page in self.pages for item in page["value"]]

    @property
    def changed(self) -> list[str]:
        return [item["id"] for item in self.items if "@removed" not in item]

    @property
    def removed(self) -> list[str]:
        return [item["id"] for item in self.items if "@removed" in item]

    @property
    def delta_link(self) -> str:
        link: str = self.pages[-1]["@odata.deltaLink"]
        return link


def delta_round(
    client: httpx.Client, url: str, *, size: int | None = None, select: str | None = None
) -> Round:
    """Every page of a delta round from url (a folder's delta URL or a link), to its
    deltaLink; pages of `size` (Prefer: odata.maxpagesize), the first with `select`."""
    headers = page_size(size) if size is not None else {}
    params = {"$select": select} if select is not None else None
    result = Round()
    link: str | None = url
    while link is not None:
        response = client.get(link, params=params, headers=headers)
        params = None
        assert response.status_code == 200, response.text
        result.responses.append(response)
        result.pages.append(response.json())
        link = result.pages[-1].get("@odata.nextLink")
    return result


# -- folders -------------------------------------------------------------------


def test_default_layout_lists_top_level_folders_and_their_children(
    server: FakeGraphServer, client: httpx.Client
) -> None:
    top = client.get(f"{user_url(server)}/mailFolders").json()
    inbox = next(f for f in top["value"] if f["displayName"] == "Inbox")
    children = client.get(f"{user_url(server)}/mailFolders/{inbox['id']}/childFolders").json()
    by_alias = client.get(f"{user_url(server)}/mailFolders/InBoX/childFolders").json()
    receipts = children["value"][0]

    assert [f["displayName"] for f in top["value"]] == [
        "Inbox",
        "Sent Items",
        "Archive",
        "Deleted Items",
    ]
    assert all(set(f) == FOLDER_KEYS for f in top["value"])
    assert len({f["parentFolderId"] for f in top["value"]}) == 1  # the root's id
    assert top["value"][0]["parentFolderId"] not in {f["id"] for f in top["value"]}
    assert [f["childFolderCount"] for f in top["value"]] == [1, 0, 0, 0]
    assert not any(f["isHidden"] for f in top["value"])
    assert [f["displayName"] for f in children["value"]] == ["Receipts"]
    assert receipts["parentFolderId"] == inbox["id"]
    assert by_alias["value"] == children["value"]
    # Every message is in one folder; the Inbox holds the most.
    totals = {f["displayName"]: f["totalItemCount"] for f in [*top["value"], receipts]}
    assert sum(totals.values()) == 300
    assert max(totals, key=lambda name: totals[name]) == "Inbox"
    assert min(totals.values()) > 0


def test_folder_ids_are_opaque_and_stable_per_seed_and_mailbox() -> None:
    def ids(seed: int, mailbox: str) -> list[str]:
        return [f["id"] for f in FakeGraphServer({mailbox: 5}, seed=seed).folders(mailbox)]

    first = ids(1, MAILBOX)
    assert first == ids(1, MAILBOX)
    assert set(first).isdisjoint(ids(2, MAILBOX))
    assert set(first).isdisjoint(ids(1, OTHER))
    assert all(len(i) > 20 and i.isascii() and "inbox" not in i.lower() for i in first)


def test_folder_listings_page_with_top_and_keep_select_in_next_links(
    client: httpx.Client,
) -> None:
    with FakeGraphServer({MAILBOX: 50}, token=TOKEN, folders=25) as server:
        expected = [f["name"] for f in server.folders(MAILBOX) if f["parent"] is None]
        page = client.get(
            f"{user_url(server)}/mailFolders", params={"$top": "5", "$select": "displayName"}
        ).json()
        pages = [page]
        while "@odata.nextLink" in page:
            assert page["@odata.nextLink"].startswith(f"{user_url(server)}/mailFolders?")
            page = client.get(page["@odata.nextLink"]).json()
            pages.append(page)
        default = client.get(f"{user_url(server)}/mailFolders").json()

    listed = [f["displayName"] for p in pages for f in p["value"]]
    assert len(expected) == 11
    assert listed == expected
    assert [len(p["value"]) for p in pages] == [5, 5, 1]
    assert all(set(f) == {"id", "displayName"} for p in pages for f in p["value"])
    assert len(default["value"]) == 10  # Graph's default page of folders
    assert "@odata.nextLink" in default


def test_folder_count_layouts_have_levels_and_names_are_top_level() -> None:
    def depth(folders: list[dict[str, Any]], folder: dict[str, Any]) -> int:
        by_id = {f["id"]: f for f in folders}
        level = 1
        while folder["parent"] is not None:
            folder, level = by_id[folder["parent"]], level + 1
        return level

    server = FakeGraphServer(seed=3)
    server.add_mailbox("three@contoso.com", 100, folders=3)
    server.add_mailbox("ten@contoso.com", 1000, folders=10)
    server.add_mailbox("named@contoso.com", 100, folders=["Work", "Inbox", "Personal"])
    three = server.folders("three@contoso.com")
    ten = server.folders("ten@contoso.com")
    named = server.folders("named@contoso.com")

    assert len(three) == 3
    assert three[0]["name"] == "Inbox"
    assert max(depth(three, f) for f in three) == 2
    assert len(ten) == 10
    assert max(depth(ten, f) for f in ten) == 3
    assert sum(f["total"] for f in ten) == 1000
    assert all(f["total"] > 0 for f in ten)
    assert [(f["name"], f["parent"]) for f in named] == [
        ("Work", None),
        ("Inbox", None),
        ("Personal", None),
    ]
    totals = {f["name"]: f["total"] for f in named}
    assert max(totals, key=lambda name: totals[name]) == "Inbox"


def test_hidden_folder_is_listed_only_when_asked(
    server: FakeGraphServer, client: httpx.Client
) -> None:
    hidden = server.add_folder(MAILBOX, "Conversation History", hidden=True)
    shown = client.get(f"{user_url(server)}/mailFolders").json()["value"]
    everything = client.get(
        f"{user_url(server)}/mailFolders", params={"includeHiddenFolders": "true"}
    ).json()["value"]
    one = client.get(f"{user_url(server)}/mailFolders/{hidden}").json()

    assert hidden not in {f["id"] for f in shown}
    assert [f["displayName"] for f in everything][-1] == "Conversation History"
    assert everything[-1]["isHidden"] is True
    assert (one["id"], one["isHidden"], one["totalItemCount"]) == (hidden, True, 0)


@pytest.mark.parametrize(
    "path", ["mailFolders/nope", "mailFolders/nope/childFolders", "mailFolders/nope/messages/delta"]
)
def test_unknown_folder_is_404_item_not_found(
    server: FakeGraphServer, client: httpx.Client, path: str
) -> None:
    response = client.get(f"{user_url(server)}/{path}")

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "ErrorItemNotFound"
    assert response.json()["error"]["message"] == NOT_FOUND


def test_total_item_count_is_exact_after_changes(
    server: FakeGraphServer, client: httpx.Client
) -> None:
    def total(folder: str) -> int:
        count: int = client.get(f"{user_url(server)}/mailFolders/{folder}").json()["totalItemCount"]
        assert count == len(server.message_ids(MAILBOX, folder))
        return count

    inbox, archive, receipts = (folder_id(server, n) for n in ("Inbox", "Archive", "Receipts"))
    before = {folder: total(folder) for folder in (inbox, archive, receipts)}
    in_inbox = [server.index_of(MAILBOX, i) for i in server.message_ids(MAILBOX, inbox)[:6]]
    new_folder = server.add_folder(MAILBOX, "Projects", parent=inbox)

    server.add_messages(MAILBOX, [datetime(2030, 1, 1, tzinfo=UTC)] * 3, folder=receipts)
    server.move_messages(MAILBOX, in_inbox[:4], archive)
    server.move_messages(MAILBOX, in_inbox[4:5], new_folder)
    server.delete_messages(MAILBOX, in_inbox[5:6])
    server.edit_messages(MAILBOX, in_inbox[:2])  # an edit moves nothing

    assert total(inbox) == before[inbox] - 6
    assert total(archive) == before[archive] + 4
    assert total(receipts) == before[receipts] + 3
    assert total(new_folder) == 1
    assert sum(f["total"] for f in server.folders(MAILBOX)) == server.mailbox_size(MAILBOX)
    assert server.mailbox_size(MAILBOX) == 300 + 3 - 1

    server.delete_folder(MAILBOX, inbox_child := receipts)
    assert client.get(f"{user_url(server)}/mailFolders/{inbox_child}").status_code == 404
    assert server.mailbox_size(MAILBOX) == 302 - (before[receipts] + 3)
    assert sum(f["total"] for f in server.folders(MAILBOX)) == server.mailbox_size(MAILBOX)


def test_messages_carry_the_folder_they_are_in(
    server: FakeGraphServer, client: httpx.Client
) -> None:
    archive = folder_id(server, "Archive")
    server.move_messages(MAILBOX, [0, 1], archive)
    listed = client.get(
        f"{user_url(server)}/messages",
        params={"$top": "1000", "$select": "parentFolderId", "$orderby": "receivedDateTime asc"},
    ).json()["value"]
    folder_ids = {f["id"] for f in server.folders(MAILBOX)}

    assert len(listed) == 300
    assert all(m["parentFolderId"] == server.folder_of(MAILBOX, m["id"]) for m in listed[:40])
    assert {m["parentFolderId"] for m in listed} == folder_ids
    assert listed[0]["parentFolderId"] == listed[1]["parentFolderId"] == archive
    assert server.message(MAILBOX, 0)["parentFolderId"] == archive


def test_python_api_refuses_what_graph_would_refuse(server: FakeGraphServer) -> None:
    inbox = folder_id(server, "Inbox")
    server.delete_messages(MAILBOX, [3])

    with pytest.raises(ValueError, match="no folder 'nope'"):
        server.move_messages(MAILBOX, [1], "nope")
    with pytest.raises(ValueError, match="holds no message 3"):
        server.edit_messages(MAILBOX, [1, 3])
    with pytest.raises(ValueError, match="Inbox cannot be deleted"):
        server.delete_folder(MAILBOX, inbox)
    with pytest.raises(ValueError, match="already there"):
        server.add_folder(MAILBOX, "receipts", parent="inbox")
    with pytest.raises(ValueError, match="no longer holds"):
        server.folder_of(MAILBOX, server.message(MAILBOX, 3)["id"])
    assert server.index_of(MAILBOX, server.message(MAILBOX, 7)["id"]) == 7
    assert (
        server.message(MAILBOX, 1)["changeKey"]
        == FakeGraphServer({MAILBOX: 300}, seed=11).message(MAILBOX, 1)["changeKey"]
    )  # the edit refused changed nothing


def test_edits_change_key_etag_time_and_something_visible(server: FakeGraphServer) -> None:
    before = server.message(MAILBOX, 5)
    server.edit_messages(MAILBOX, [5])
    once = server.message(MAILBOX, 5)
    server.edit_messages(MAILBOX, [5])
    twice = server.message(MAILBOX, 5)

    for earlier, later in ((before, once), (once, twice)):
        assert later["changeKey"] != earlier["changeKey"]
        assert later["@odata.etag"] != earlier["@odata.etag"]
        assert later["lastModifiedDateTime"] > earlier["lastModifiedDateTime"]
        assert later["isRead"] is not earlier["isRead"]
        assert later["categories"] != earlier["categories"]
        assert (later["id"], later["subject"], later["body"]) == (
            earlier["id"],
            earlier["subject"],
            earlier["body"],
        )


# -- delta ------------------------------------------------------------------------


def test_full_round_returns_exactly_each_folders_messages_across_pages(
    server: FakeGraphServer, client: httpx.Client
) -> None:
    # Moved out, moved in, moved there and back, deleted, added: what a round finds now.
    inbox, archive = folder_id(server, "Inbox"), folder_id(server, "Archive")
    from_inbox = [server.index_of(MAILBOX, i) for i in server.message_ids(MAILBOX, inbox)[:5]]
    in_archive = server.message_ids(MAILBOX, archive)
    from_archive = [server.index_of(MAILBOX, i) for i in in_archive[:2]]
    server.move_messages(MAILBOX, from_inbox[:3], archive)
    server.move_messages(MAILBOX, from_archive, "inbox")
    server.move_messages(MAILBOX, from_inbox[2:3], inbox)
    server.delete_messages(MAILBOX, from_inbox[3:4])
    server.add_messages(MAILBOX, [datetime(2030, 1, 1, tzinfo=UTC)], folder=archive)
    assert len(server.message_ids(MAILBOX, archive)) == len(in_archive) + 3 - 2 - 1 + 1

    for folder in server.folders(MAILBOX):
        result = delta_round(client, delta_url(server, folder["id"]), size=7)

        assert sorted(result.changed) == sorted(server.message_ids(MAILBOX, folder["id"]))
        assert len(result.changed) == len(set(result.changed)) == folder["total"]
        assert result.removed == []
        assert all(len(page["value"]) <= 7 for page in result.pages)
        assert all("@odata.nextLink" in page for page in result.pages[:-1])
        assert "@odata.deltaLink" not in result.pages[0] or len(result.pages) == 1
        assert "@odata.nextLink" not in result.pages[-1]
        assert result.pages[-1]["@odata.deltaLink"].startswith(
            f"{delta_url(server, folder['id'])}?$deltatoken="
        )
        assert (
            result.pages[0]
            .get("@odata.nextLink", "")
            .startswith(f"{delta_url(server, folder['id'])}?$skiptoken=")
            or len(result.pages) == 1
        )
        assert {r.headers["Preference-Applied"] for r in result.responses} == {
            "odata.maxpagesize=7"
        }
        assert all(
            item["@odata.type"] == "#microsoft.graph.message"
            and item["parentFolderId"] == folder["id"]
            for item in result.items
        )


def test_page_is_ten_by_default_and_at_most_1000(client: httpx.Client) -> None:
    with FakeGraphServer({MAILBOX: 3000}, token=TOKEN) as server:
        url = delta_url(server, "inbox")
        default = client.get(url)
        capped = client.get(url, headers=page_size(5000))

    assert len(default.json()["value"]) == 10
    assert "Preference-Applied" not in default.headers
    assert len(capped.json()["value"]) == 1000
    assert capped.headers["Preference-Applied"] == "odata.maxpagesize=1000"


def test_change_round_returns_exactly_the_changes(
    server: FakeGraphServer, client: httpx.Client
) -> None:
    inbox, archive, sent = (folder_id(server, n) for n in ("Inbox", "Archive", "Sent Items"))
    inbox_round = delta_round(client, delta_url(server, "inbox"), size=50)
    archive_round = delta_round(client, delta_url(server, archive), size=50)
    held = [server.index_of(MAILBOX, i) for i in server.message_ids(MAILBOX, inbox)]
    elsewhere = server.index_of(MAILBOX, server.message_ids(MAILBOX, sent)[0])

    added = server.add_messages(MAILBOX, [datetime(2031, 5, 1, tzinfo=UTC)] * 2)
    edited = server.edit_messages(MAILBOX, held[:2])
    moved = server.move_messages(MAILBOX, held[2:3], archive)
    server.delete_messages(MAILBOX, held[3:4])
    deleted = [server.message(MAILBOX, held[3])["id"]]
    server.edit_messages(MAILBOX, [elsewhere])  # another folder's change
    inbox_changes = delta_round(client, inbox_round.delta_link, size=2)
    archive_changes = delta_round(client, archive_round.delta_link, size=2)

    assert sorted(inbox_changes.changed) == sorted(added + edited)
    assert sorted(inbox_changes.removed) == sorted(moved + deleted)
    assert len(inbox_changes.pages) == 3  # six items, two a page
    removal = {"@odata.type": "#microsoft.graph.message", "@removed": {"reason": "deleted"}}
    assert [item for item in inbox_changes.items if "@removed" in item] == [
        {**removal, "id": message_id} for message_id in inbox_changes.removed
    ]
    items = {item["id"]: item for item in inbox_changes.items}
    for index, message_id in zip(held[:2], edited, strict=True):
        assert items[message_id]["changeKey"] == server.message(MAILBOX, index)["changeKey"]
        assert items[message_id]["categories"][-1] == "Edit 1"
    assert archive_changes.changed == moved
    assert archive_changes.removed == []
    assert archive_changes.items[0]["parentFolderId"] == archive
    # And the round after that is quiet again.
    assert delta_round(client, inbox_changes.delta_link).items == []


def test_round_without_changes_is_one_empty_page(
    server: FakeGraphServer, client: httpx.Client
) -> None:
    first = delta_round(client, delta_url(server, "inbox"), size=1000)
    server.edit_messages(OTHER, [0])  # another mailbox's change
    server.reset_record()
    quiet = delta_round(client, first.delta_link, size=1000)

    assert len(first.pages) == 1
    assert len(quiet.pages) == 1
    assert quiet.pages[0]["value"] == []
    assert "@odata.deltaLink" in quiet.pages[0]
    assert len(server.requests) == 1


def test_select_is_kept_across_next_and_delta_links(
    server: FakeGraphServer, client: httpx.Client
) -> None:
    allowed = {"@odata.type", "@odata.etag", "id", "subject", "isRead"}
    full = delta_round(client, delta_url(server, "inbox"), size=10, select="subject,isRead")
    index = server.index_of(MAILBOX, full.changed[0])
    server.edit_messages(MAILBOX, [index])
    changes = delta_round(client, full.delta_link, size=10)

    assert len(full.pages) > 2
    assert all(set(item) == allowed for item in full.items)
    assert changes.changed == [full.changed[0]]
    assert set(changes.items[0]) == allowed
    assert changes.items[0]["isRead"] is not full.items[0]["isRead"]
    unknown = client.get(delta_url(server, "inbox"), params={"$select": "subject,nonsense"})
    assert unknown.status_code == 400


@pytest.mark.parametrize("option", ["$top", "$skip", "$orderby"])
def test_delta_refuses_listing_options(
    server: FakeGraphServer, client: httpx.Client, option: str
) -> None:
    response = client.get(delta_url(server, "inbox"), params={option: "5"})

    assert response.status_code == 400
    assert option in response.json()["error"]["message"]


def test_changes_made_while_a_round_is_paged_appear_by_the_next_round(
    server: FakeGraphServer, client: httpx.Client
) -> None:
    archive = folder_id(server, "Archive")
    url: str | None = delta_url(server, "inbox")
    delta_link: str | None = None
    seen: list[str] = []
    changed: dict[str, str] = {}
    while url is not None:
        page = client.get(url, headers=page_size(20)).json()
        seen += [item["id"] for item in page["value"]]
        if len(seen) == 20:  # after the first page: change what it handed out
            first, second, third = (server.index_of(MAILBOX, i) for i in seen[:3])
            changed["moved"] = server.move_messages(MAILBOX, [first], archive)[0]
            server.delete_messages(MAILBOX, [second])
            changed["deleted"] = seen[1]
            changed["edited"] = server.edit_messages(MAILBOX, [third])[0]
            changed["added"] = server.add_messages(MAILBOX, [datetime(2032, 1, 1, tzinfo=UTC)])[0]
        url = page.get("@odata.nextLink")
        delta_link = page.get("@odata.deltaLink")
    assert delta_link is not None
    after = delta_round(client, delta_link, size=100)

    assert len(seen) == len(set(seen))
    assert {changed["moved"], changed["deleted"]} <= set(after.removed)
    assert {changed["edited"], changed["added"]} <= set(after.changed)


def test_expired_tokens_are_gone_with_a_location_that_starts_a_full_round(
    server: FakeGraphServer, client: httpx.Client
) -> None:
    select = {"$select": "subject"}
    first_page = client.get(delta_url(server, "inbox"), params=select, headers=page_size(5))
    page_link = first_page.json()["@odata.nextLink"]
    delta_link = delta_round(client, delta_url(server, "inbox"), select="subject").delta_link
    other_link = delta_round(client, delta_url(server, "inbox", OTHER)).delta_link
    inbox = folder_id(server, "Inbox")

    server.expire_delta_tokens(MAILBOX)
    refused = [client.get(link) for link in (page_link, delta_link)]
    location = refused[1].headers["Location"]
    restarted = delta_round(client, location, size=100)

    for response in refused:
        assert response.status_code == 410
        assert response.json()["error"]["code"] == "syncStateNotFound"
        assert response.headers["Location"] == location
    assert location == f"{delta_url(server, inbox)}?$select=subject"
    assert sorted(restarted.changed) == sorted(server.message_ids(MAILBOX, inbox))
    assert all(
        set(item) == {"@odata.type", "@odata.etag", "id", "subject"} for item in restarted.items
    )
    assert client.get(other_link).status_code == 200  # another mailbox's tokens still work
    server.expire_delta_tokens()
    assert client.get(other_link).status_code == 410


@pytest.mark.parametrize("token", ["not-a-token", "W10", "eyJhIjogMX0"])
def test_undecodable_token_is_gone(
    server: FakeGraphServer, client: httpx.Client, token: str
) -> None:
    response = client.get(delta_url(server, "inbox"), params={"$deltatoken": token})

    assert response.status_code == 410
    assert response.json()["error"]["code"] == "syncStateNotFound"
    assert response.headers["Location"] == delta_url(server, folder_id(server, "Inbox"))


def test_token_of_another_folder_is_gone_and_of_a_deleted_folder_404(
    server: FakeGraphServer, client: httpx.Client
) -> None:
    projects = server.add_folder(MAILBOX, "Projects")
    server.move_messages(MAILBOX, [0, 1, 2], projects)
    projects_link = delta_round(client, delta_url(server, projects)).delta_link
    token = projects_link.partition("$deltatoken=")[2]

    elsewhere = client.get(delta_url(server, "inbox"), params={"$deltatoken": token})
    server.delete_folder(MAILBOX, projects)
    gone_folder = client.get(projects_link)

    assert elsewhere.status_code == 410
    assert gone_folder.status_code == 404
    assert gone_folder.json()["error"]["code"] == "ErrorItemNotFound"
    assert server.mailbox_size(MAILBOX) == 297


def test_expire_links_makes_stale_next_links_of_folders_and_rounds(
    server: FakeGraphServer, client: httpx.Client
) -> None:
    folders_link = client.get(f"{user_url(server)}/mailFolders", params={"$top": "2"}).json()[
        "@odata.nextLink"
    ]
    page_link = client.get(delta_url(server, "inbox")).json()["@odata.nextLink"]
    delta_link = delta_round(client, delta_url(server, "archive"), size=1000).delta_link

    server.expire_links()

    assert client.get(folders_link).status_code == 400
    assert client.get(page_link).status_code == 410
    assert client.get(delta_link).status_code == 200  # a delta link is not a page link


def test_faults_hook_and_record_apply_to_folder_and_delta_requests(
    server: FakeGraphServer, client: httpx.Client
) -> None:
    hooked: list[tuple[str, dict[str, str]]] = []
    server.before_answer = lambda mailbox, query: hooked.append((mailbox, query))
    archive = folder_id(server, "Archive")
    server.fail_next(503, retry_after=0.5)
    failed = client.get(delta_url(server, archive))
    served = client.get(delta_url(server, archive), headers=page_size(3))
    listed = client.get(f"{user_url(server)}/mailFolders")
    unauthorized = httpx.get(delta_url(server, archive))
    record = server.requests

    assert (failed.status_code, failed.headers["Retry-After"]) == (503, "0.5")
    assert served.status_code == listed.status_code == 200
    assert unauthorized.status_code == 401
    assert [r.status for r in record] == [503, 200, 200, 401]
    assert all(r.mailbox == MAILBOX for r in record)
    assert record[1].path == f"/v1.0/users/{MAILBOX}/mailFolders/{archive}/messages/delta"
    assert record[1].message_count == 3
    assert record[1].headers["Prefer"].endswith("odata.maxpagesize=3")
    assert [mailbox for mailbox, _ in hooked] == [MAILBOX] * 3


def test_huge_mailbox_serves_folders_and_a_delta_page_without_generating_it(
    client: httpx.Client,
) -> None:
    size = 50_000_000
    with FakeGraphServer({MAILBOX: size}, token=TOKEN, folders=10) as server:
        archive = folder_id(server, "Archive")
        server.move_messages(MAILBOX, [size - 1], archive)
        server.edit_messages(MAILBOX, [size - 2])
        started = time.monotonic()
        folders = client.get(f"{user_url(server)}/mailFolders", params={"$top": "100"}).json()[
            "value"
        ]
        first = client.get(delta_url(server, "inbox"), headers=page_size(50)).json()
        newest = client.get(
            f"{user_url(server)}/messages", params={"$top": "3", "$select": "parentFolderId"}
        ).json()
        elapsed = time.monotonic() - started

    assert elapsed < 5
    assert sum(f["total"] for f in server.folders(MAILBOX)) == size
    assert len(folders) < 10  # some are child folders
    assert len(first["value"]) == 50
    assert newest["value"][0]["parentFolderId"] == archive


# -- the control endpoint and churn --------------------------------------------------


def test_control_endpoint_changes_a_mailbox_without_a_token_or_a_record(
    server: FakeGraphServer, client: httpx.Client
) -> None:
    inbox_round = delta_round(client, delta_url(server, "inbox"), size=1000)
    server.reset_record()
    server.fail_next(503)  # a fault queued for Graph requests: not the control endpoint's
    answer = httpx.post(
        f"{server.control_url}/mailboxes/{MAILBOX}/changes",
        json={"add": 3, "edit": 2, "move": 2, "delete": 1},
    )
    applied = answer.json()
    listed = httpx.get(f"{server.control_url}/mailboxes/{MAILBOX}/folders")

    assert answer.status_code == 200
    assert set(applied) == {"added", "edited", "moved", "deleted"}
    assert (len(applied["added"]), len(applied["edited"]), len(applied["moved"])) == (3, 2, 2)
    assert len(applied["deleted"]) == 1
    assert server.mailbox_size(MAILBOX) == 302
    assert server.requests == []
    assert client.get(f"{user_url(server)}/mailFolders").status_code == 503  # still queued
    inbox = folder_id(server, "Inbox")
    moved = {m["id"] for m in applied["moved"]}
    deleted = set(applied["deleted"])
    still_in_inbox = set(applied["added"]) - moved - deleted
    assert still_in_inbox <= set(server.message_ids(MAILBOX, inbox))
    for move in applied["moved"]:
        assert move["from"] != move["to"]
        if move["id"] not in deleted:
            assert server.folder_of(MAILBOX, move["id"]) == move["to"]
    for message_id in applied["edited"]:
        edited = server.message(MAILBOX, server.index_of(MAILBOX, message_id))
        assert edited["categories"][-1] == "Edit 1"
    assert listed.status_code == 200
    assert listed.json() == {"value": server.folders(MAILBOX)}
    changes = delta_round(client, inbox_round.delta_link, size=1000)
    assert still_in_inbox <= set(changes.changed)
    moved_out = {m["id"] for m in applied["moved"] if m["from"] == inbox}
    assert moved_out | (deleted & set(inbox_round.changed)) <= set(changes.removed)


def test_control_endpoint_can_expire_delta_tokens(
    server: FakeGraphServer, client: httpx.Client
) -> None:
    delta_link = delta_round(client, delta_url(server, "inbox"), size=1000).delta_link
    answer = httpx.post(
        f"{server.control_url}/mailboxes/{MAILBOX}/changes", json={"expire_delta_tokens": True}
    )

    assert answer.json() == {"added": [], "edited": [], "moved": [], "deleted": []}
    assert client.get(delta_link).status_code == 410


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"add": -1}', "from 0 to"),
        (b'{"add": "5"}', "whole number"),
        (b'{"edit": true}', "whole number"),
        (b'{"delete": 1000}', "holds 40"),
        (b'{"frobnicate": 1}', "Unknown change"),
        (b'{"expire_delta_tokens": "yes"}', "true or false"),
    ],
)
def test_control_endpoint_refuses_bad_input_with_one_sentence(
    server: FakeGraphServer, body: bytes, says: str
) -> None:
    before = server.folders(OTHER)
    answer = httpx.post(
        f"{server.control_url}/mailboxes/{OTHER}/changes",
        content=body,
        headers={"Content-Type": "application/json"},
    )
    sentence = answer.json()["error"]

    assert answer.status_code == 400
    assert says in sentence
    assert sentence.endswith(".")
    assert sentence.count(". ") == 0
    assert server.folders(OTHER) == before  # nothing changed


def test_control_endpoint_knows_its_mailboxes_and_methods(server: FakeGraphServer) -> None:
    unknown = httpx.post(f"{server.control_url}/mailboxes/nobody@contoso.com/changes", json={})
    wrong_method = httpx.get(f"{server.control_url}/mailboxes/{MAILBOX}/changes")
    nowhere = httpx.get(f"{server.control_url}/elsewhere")

    assert unknown.status_code == 404
    assert "nobody@contoso.com" in unknown.json()["error"]
    assert wrong_method.status_code == 405
    assert nowhere.status_code == 404


def test_moves_need_another_folder(client: httpx.Client) -> None:
    with FakeGraphServer({MAILBOX: 10}, token=TOKEN, folders=1) as server:
        answer = httpx.post(f"{server.control_url}/mailboxes/{MAILBOX}/changes", json={"move": 1})

    assert answer.status_code == 400
    assert "no other folder" in answer.json()["error"]


def test_churn_changes_the_mailbox_while_it_runs(client: httpx.Client) -> None:
    with FakeGraphServer({MAILBOX: 200}, seed=5, token=TOKEN, churn=400) as server:
        links = [
            delta_round(client, delta_url(server, f["id"]), size=1000).delta_link
            for f in server.folders(MAILBOX)
        ]
        wait_for(lambda: server.mailbox_size(MAILBOX) >= 240, "new mail from churn")
        changes = [delta_round(client, link, size=1000) for link in links]
    stopped_at = server.mailbox_size(MAILBOX)
    time.sleep(0.2)

    changed = {i for c in changes for i in c.changed}
    removed = {i for c in changes for i in c.removed}
    current = server.message_ids(MAILBOX)
    indexes = {i: server.index_of(MAILBOX, i) for i in current}
    added = [i for i in current if indexes[i] >= FIRST_ADDED_INDEX]
    edited = [
        i
        for i in changed & set(current)
        if any(c.startswith("Edit ") for c in server.message(MAILBOX, indexes[i])["categories"])
    ]
    assert server.mailbox_size(MAILBOX) == stopped_at  # no churn once stopped
    assert len(added) >= 40
    assert set(added) & changed
    assert edited
    assert removed  # moved out or deleted
    assert len(current) < 200 + len(added)  # some were deleted
