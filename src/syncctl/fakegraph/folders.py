"""``/users/{mailbox}/mailFolders``: the top-level folders, one folder, a folder's childFolders.

Listings page with ``$top`` (1-1000, default 10) and ``$skip`` behind an
absolute ``@odata.nextLink`` (its ``$skiptoken`` made stale by
expire_links()), take ``$select`` and list hidden folders only with
``includeHiddenFolders=true``. A folder is named by its id or a well-known
name (``inbox``, any case); one the mailbox lacks is 404 ErrorItemNotFound.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from syncctl.fakegraph import odata
from syncctl.fakegraph.mailbox import Mailbox, MailFolder

if TYPE_CHECKING:
    from syncctl.fakegraph.server import FakeGraphServer

FOLDER_PROPERTIES = (
    "displayName",
    "parentFolderId",
    "childFolderCount",
    "unreadItemCount",
    "totalItemCount",
    "isHidden",
)
# unreadItemCount is not counted (that would generate every message): about
# this share of a folder's messages is taken as unread.
UNREAD_SHARE = 0.4


def folder_json(mailbox: Mailbox, folder: MailFolder) -> dict[str, Any]:
    """The folder as Graph's mailFolder JSON; the caller holds the mail lock."""
    total = mailbox.total(folder.number)
    return {
        "id": folder.id,
        "displayName": folder.name,
        "parentFolderId": mailbox.root_id
        if folder.parent is None
        else mailbox.folders[folder.parent].id,
        "childFolderCount": len(mailbox.children(folder.number, hidden=True)),
        "unreadItemCount": int(total * UNREAD_SHARE),
        "totalItemCount": total,
        "isHidden": folder.hidden,
    }


def one(
    server: FakeGraphServer, mailbox: Mailbox, reference: str, query: dict[str, str]
) -> odata.Answer:
    """GET .../mailFolders/{id}."""
    select = odata.parse_select(query.get("$select"), FOLDER_PROPERTIES, "mailFolder")
    with server.mail_lock:
        folder = mailbox.folder(reference)
        if folder is None:
            raise odata.not_found()
        document = odata.project(folder_json(mailbox, folder), select)
    context = f"{server.url}/$metadata#users('{quote(mailbox.name, safe='@')}')/mailFolders"
    return odata.Answer(200, odata.json_bytes({"@odata.context": context + "/$entity", **document}))


def listing(
    server: FakeGraphServer, mailbox: Mailbox, parent: str | None, query: dict[str, str]
) -> odata.Answer:
    """GET .../mailFolders (parent None) or .../mailFolders/{parent}/childFolders."""
    top = odata.top(query)
    skip = odata.integer(query, "$skip", 0)
    select = odata.parse_select(query.get("$select"), FOLDER_PROPERTIES, "mailFolder")
    hidden = query.get("includeHiddenFolders", "").lower() == "true"
    with server.mail_lock:
        generation = server.link_generation
        odata.check_page_link(query, generation)
        path = "mailFolders"
        number = None
        if parent is not None:
            folder = mailbox.folder(parent)
            if folder is None:
                raise odata.not_found()
            path, number = f"mailFolders/{quote(folder.id, safe='')}/childFolders", folder.number
        folders = mailbox.children(number, hidden=hidden)
        value = [odata.project(folder_json(mailbox, f), select) for f in folders[skip : skip + top]]
    context = f"{server.url}/$metadata#users('{quote(mailbox.name, safe='@')}')/{path}"
    document: dict[str, Any] = {"@odata.context": context, "value": value}
    if skip + top < len(folders):
        params = {**query, "$skip": str(skip + top), "$skiptoken": odata.skiptoken(generation)}
        document["@odata.nextLink"] = (
            f"{server.mailbox_url(mailbox)}/{path}?{odata.encode_query(params)}"
        )
    return odata.Answer(200, odata.json_bytes(document))
