"""A local Graph-compatible mail server, for the demo, tests, staging and load runs.

It serves on 127.0.0.1, with Graph's semantics for what syncctl uses, bearer
auth and Graph's error bodies:

- ``/v1.0/users/{mailbox}/messages`` and ``.../messages/$count``: every
  folder's messages by received time (messages.py);
- ``.../mailFolders``, ``.../mailFolders/{id}`` (with its
  ``totalItemCount``) and ``.../mailFolders/{id}/childFolders``
  (folders.py), and ``.../mailFolders/{id}/messages/$count`` (messages.py);
- ``.../mailFolders/{id}/messages/delta``: full and change rounds of a
  folder, with delta and page tokens (delta.py);
- ``/_fake/mailboxes/{email}/...``: a control endpoint that changes a
  mailbox from another process (control.py).

Mailboxes are generated, not stored (mailbox.py, content.py): message i of
a mailbox is computed from (seed, mailbox, i), so a mailbox of millions
costs no memory. A mailbox changes while it is read, as a real one does:
messages are added, deleted, edited and moved, folders added and deleted,
from Python, over the control endpoint, or at random at a steady rate
(churn.py); delta rounds report each change. Faults are switched on by the
knobs or queued one by one, and every Graph request is recorded
(server.py).
"""

from syncctl.fakegraph.content import PROPERTIES
from syncctl.fakegraph.launch import parse_mailboxes, serve
from syncctl.fakegraph.mailbox import FIRST_ADDED_INDEX
from syncctl.fakegraph.odata import API_PREFIX, DEFAULT_TOP, MAX_TOP
from syncctl.fakegraph.server import MAX_RECORDED, FakeGraphServer, ServedRequest

__all__ = [
    "API_PREFIX",
    "DEFAULT_TOP",
    "FIRST_ADDED_INDEX",
    "MAX_RECORDED",
    "MAX_TOP",
    "PROPERTIES",
    "FakeGraphServer",
    "ServedRequest",
    "parse_mailboxes",
    "serve",
]
