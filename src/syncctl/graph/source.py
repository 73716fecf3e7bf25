"""Microsoft Graph as a mail source: the seam (mailsource.MailSource) over
Graph's HTTP client, message listing, folders and delta rounds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import datetime

import httpx

from syncctl.config import DatabaseTarget
from syncctl.graph import delta, messages
from syncctl.graph.auth import TokenProvider
from syncctl.graph.client import GraphClient
from syncctl.graph.settings import GraphSettings
from syncctl.graph.slots import MailboxSlots
from syncctl.mailsource import PAGE_SIZE, DeltaPage, Folder, Page, Window


class GraphMailSource:
    """mailsource.MailSource over Microsoft Graph. Thread-safe; close() when done."""

    def __init__(
        self,
        settings: GraphSettings,
        *,
        tokens: TokenProvider | None = None,
        slots: MailboxSlots | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] | None = None,
        delta_page_size: int = PAGE_SIZE,
    ) -> None:
        self.settings = settings
        self.delta_page_size = delta_page_size
        self._client = GraphClient(
            settings, tokens=tokens, slots=slots, transport=transport, sleep=sleep
        )

    def __repr__(self) -> str:
        return f"GraphMailSource(url={self.settings.url!r})"

    def __enter__(self) -> GraphMailSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def interrupt(self) -> None:
        self._client.interrupt()

    def close(self) -> None:
        self._client.close()

    def check_mailbox(self, mailbox: str) -> None:
        """MailboxNotFound unless Graph knows the mailbox: one request for its
        Inbox's id (Mail.Read reaches it; looking up the user would need User.Read.All)."""
        self._client.get(
            mailbox, self._client.mailbox_url(mailbox, "mailFolders/inbox"), {"$select": "id"}
        )

    def count(self, mailbox: str, window: Window) -> int:
        return messages.count(self._client, mailbox, window)

    def received_at(self, mailbox: str, window: Window, position: int) -> datetime | None:
        return messages.received_at(self._client, mailbox, window, position)

    def fetch_page(
        self,
        mailbox: str,
        window: Window,
        *,
        skip: int,
        top: int,
        next_link: str | None = None,
    ) -> Page:
        return messages.fetch_page(
            self._client, mailbox, window, skip=skip, top=top, next_link=next_link
        )

    def folders(self, mailbox: str) -> list[Folder]:
        return delta.folders(self._client, mailbox)

    def folder_total(self, mailbox: str, folder_id: str) -> int:
        return delta.folder_total(self._client, mailbox, folder_id)

    def folder_count(self, mailbox: str, folder_id: str, window: Window) -> int:
        return delta.folder_count(self._client, mailbox, folder_id, window)

    def delta_page(self, mailbox: str, folder_id: str, link: str | None) -> DeltaPage:
        return delta.delta_page(
            self._client, mailbox, folder_id, link, page_size=self.delta_page_size
        )


def open_mail_source(target: DatabaseTarget, *, worker: bool = False) -> GraphMailSource:
    """Graph as configured by the environment, its per-mailbox request slots kept
    in target's database. worker: wait out refused connections with backoff
    (commands a person runs fail at once). Raises BadInput when no credentials
    are configured."""
    settings = replace(GraphSettings.from_env(), retry_refused_connections=worker)
    # A slot outlives any request that holds it, so only a crashed holder's slot expires.
    slots = MailboxSlots(target, lease=settings.longest_request + 30.0)
    return GraphMailSource(settings, slots=slots)
