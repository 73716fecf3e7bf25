"""Random changes to a mailbox, as its user and its mail make them: asked for by
count (the control endpoint) or at a steady rate in the background (churn).

New messages arrive in the Inbox at the current time; edits, moves and
deletes pick messages the mailbox holds; a move goes to another visible
folder. The choices come from the mailbox's own random generator, seeded
from (seed, mailbox), so the same requests make the same changes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from syncctl.fakegraph.mailbox import Mailbox, whole_second

# The background churn's mix of changes: (kind, weight).
MIX = (("add", 50), ("edit", 25), ("move", 15), ("delete", 10))
# How often the background churn wakes to make the changes that are due.
TICK = 0.05


@dataclass
class Applied:
    """The changes made, by message id (moves with the folder ids they went from and to)."""

    added: list[str] = field(default_factory=list)
    edited: list[str] = field(default_factory=list)
    moved: list[dict[str, str]] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "added": self.added,
            "edited": self.edited,
            "moved": self.moved,
            "deleted": self.deleted,
        }


def apply_random(
    mailbox: Mailbox, *, add: int = 0, edit: int = 0, move: int = 0, delete: int = 0
) -> Applied:
    """Make the changes (in this order), the messages picked at random; the caller
    holds the mail lock. ValueError, before any change, when the mailbox holds too
    few messages or has no other folder to move to."""
    for kind, count in (("add", add), ("edit", edit), ("move", move), ("delete", delete)):
        if count < 0:
            raise ValueError(f"{kind} must be a count of zero or more, not {count}")
    held = mailbox.size + add
    for kind, count in (("edit", edit), ("move", move), ("delete", delete)):
        if count > held:
            raise ValueError(f"cannot {kind} {count} messages: mailbox {mailbox.name} holds {held}")
    if move and len(_targets(mailbox)) < 2:
        raise ValueError(f"mailbox {mailbox.name} has no other folder to move messages to")
    applied = Applied()
    now = whole_second(datetime.now(UTC))
    for _ in range(add):
        applied.added.append(mailbox.message_id(mailbox.add(now, mailbox.inbox)))
    for index in mailbox.pick(edit, mailbox.rng):
        mailbox.edit(index)
        applied.edited.append(mailbox.message_id(index))
    for index in mailbox.pick(move, mailbox.rng):
        applied.moved.append(_move(mailbox, index))
    for index in mailbox.pick(delete, mailbox.rng):
        mailbox.delete(index)
        applied.deleted.append(mailbox.message_id(index))
    return applied


def churn_once(mailbox: Mailbox) -> None:
    """One change drawn from MIX; an add when there is nothing to edit, move or delete,
    an edit instead of a move when there is no other folder. The caller holds the lock."""
    kind = mailbox.rng.choices([k for k, _ in MIX], [w for _, w in MIX])[0]
    if mailbox.size == 0:
        kind = "add"
    elif kind == "move" and len(_targets(mailbox)) < 2:
        kind = "edit"
    apply_random(mailbox, **{kind: 1})


class Churn:
    """Changes every mailbox at `rate` changes a second, on a thread of its own."""

    def __init__(
        self,
        rate: float,
        mailboxes: Callable[[], Mapping[str, Mailbox]],
        lock: threading.Lock,
    ) -> None:
        self.rate = rate
        self._mailboxes = mailboxes
        self._lock = lock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="fake-graph-churn", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        owed: dict[str, float] = {}  # changes due but not yet made, per mailbox
        last = time.monotonic()
        while not self._stop.wait(TICK):
            now = time.monotonic()
            elapsed, last = now - last, now
            with self._lock:
                for name, mailbox in self._mailboxes().items():
                    due = owed.get(name, 0.0) + self.rate * elapsed
                    for _ in range(int(due)):
                        churn_once(mailbox)
                    owed[name] = due - int(due)


def _targets(mailbox: Mailbox) -> list[int]:
    """The folders a random move may go to: every visible one."""
    return [number for number, folder in mailbox.folders.items() if not folder.hidden]


def _move(mailbox: Mailbox, index: int) -> dict[str, str]:
    source = mailbox.folders[mailbox.last_folder(index)]
    to = mailbox.rng.choice([n for n in _targets(mailbox) if n != source.number])
    mailbox.move(index, to)
    return {"id": mailbox.message_id(index), "from": source.id, "to": mailbox.folders[to].id}
