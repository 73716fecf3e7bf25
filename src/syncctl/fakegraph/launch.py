"""Running the server from the command line: `syncctl dev fake-graph`."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from syncctl.errors import BadInput
from syncctl.fakegraph.server import FakeGraphServer


def parse_mailboxes(specs: Iterable[str]) -> dict[str, int]:
    """{email: count} from EMAIL=COUNT strings, as `syncctl dev fake-graph --mailbox` takes them."""
    mailboxes: dict[str, int] = {}
    for spec in specs:
        email, sep, count = spec.rpartition("=")
        if not sep or "@" not in email or not count.strip().isdigit():
            raise BadInput(
                f"--mailbox {spec!r}: give it as EMAIL=COUNT, e.g. ann@example.com=5000."
            )
        mailboxes[email.strip()] = int(count)
    return mailboxes


def serve(server: FakeGraphServer, *, announce: Callable[[str], None] = print) -> None:
    """Run the server until interrupted (Ctrl-C), announcing how to point syncctl at it
    and where its control endpoint is."""
    with server:
        announce(f"Graph-compatible server at {server.url}")
        for email, count in sorted(server.mailboxes.items()):
            folders = len(server.folders(email))
            announce(f"  mailbox {email}: {count} messages in {folders} folders")
        if server.churn:
            announce(f"  churn: {server.churn:g} changes a second per mailbox")
        mailbox_url = f"{server.control_url}/mailboxes/{{email}}"
        announce(f"Control endpoint (no token needed) at {server.control_url}:")
        announce(f'  POST {mailbox_url}/changes {{"add": 5, "edit": 3, "move": 2, "delete": 1}}')
        announce(f"  GET  {mailbox_url}/folders")
        announce(f"export SYNCCTL_GRAPH_URL={server.url}")
        announce(f"export SYNCCTL_GRAPH_TOKEN={server.token}")
        try:
            while not server.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
