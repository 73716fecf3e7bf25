"""A generated mailbox: its messages, its folders, their changes and the change log.

Message i is computed from (seed, mailbox, i), not stored: messages are
received in index order (``same_time`` consecutive ones share one time) and
each generated one lies in a folder picked by a repeating pattern of
FOLDER_PATTERN slots, shuffled per mailbox and weighted so the Inbox holds the
most. So a folder's count is arithmetic and its messages are found block by
block, whatever the size of the mailbox.

What changes is kept sparse: messages added (numbered from
FIRST_ADDED_INDEX), deleted, edited, or moved out of their generated folder;
folders added and deleted. Every change of a message is one entry of the
change log (index, from folder, to folder), numbered by version: a delta
round reads the entries after the version it started from.

A Mailbox is not thread-safe: its server holds one lock around every use.
"""

from __future__ import annotations

import base64
import bisect
import operator
import random
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from syncctl.fakegraph import content

# Messages are spread over these ten years, in index order.
FIRST_RECEIVED = datetime(2015, 1, 1, tzinfo=UTC)
RECEIVED_SPAN = timedelta(days=3653)
# Received times are whole seconds, at most a day apart.
MAX_STEP = 86_400
# Messages added at chosen times are numbered from here, far above any generated one.
FIRST_ADDED_INDEX = 10**9
# Generated message i lies in the folder of slot i % FOLDER_PATTERN of its mailbox's pattern.
FOLDER_PATTERN = 997
# A folder's weight in the pattern: the Inbox's, and the others' in turn.
INBOX_WEIGHT = 12
OTHER_WEIGHTS = (5, 2, 4, 1, 3, 2, 3)
# The most message ids of one mailbox index_of() remembers.
ID_CACHE = 1_000_000
# Delta rounds of one mailbox whose changed messages are kept between pages.
ROUNDS_KEPT = 16
_NONE = -1  # "no folder" in the change log: not yet added, or deleted

COMPARISONS: dict[str, Callable[[datetime, datetime], bool]] = {
    "eq": operator.eq,
    "gt": operator.gt,
    "ge": operator.ge,
    "lt": operator.lt,
    "le": operator.le,
}
# Graph's well-known folder names, usable in URLs instead of the folder's id.
WELL_KNOWN = {
    "Inbox": "inbox",
    "Sent Items": "sentitems",
    "Archive": "archive",
    "Deleted Items": "deleteditems",
    "Drafts": "drafts",
    "Junk Email": "junkemail",
    "Outbox": "outbox",
}
DEFAULT_FOLDERS = 5

Clauses = list[tuple[str, datetime]]


@dataclass
class MailFolder:
    """One mail folder. parent is the number of its parent folder, None at the top level."""

    number: int
    id: str
    name: str
    parent: int | None
    hidden: bool = False
    well_known: str | None = None


@dataclass(frozen=True)
class FolderPlan:
    """A folder of a new mailbox: parent is the position of its parent in the plan."""

    name: str
    parent: int | None
    weight: int


def folder_plan(folders: int | Sequence[str] | None) -> list[FolderPlan]:
    """The folders a new mailbox starts with, given as add_mailbox takes them.

    None: the default layout (Inbox with its child Receipts, Sent Items,
    Archive, Deleted Items). N: N folders, first the Inbox; from three on the
    tree has two levels, from eight three. Names: top-level folders of those
    names; the one named Inbox (else the first) is the Inbox.
    """
    if folders is None:
        folders = DEFAULT_FOLDERS
    if isinstance(folders, int):
        if folders < 1:
            raise ValueError(f"a mailbox needs at least one folder (its Inbox), not {folders}")
        plan = []
        for position in range(folders):
            name, parent = _generated_folder(position)
            weight = INBOX_WEIGHT if position == 0 else _other_weight(position)
            plan.append(FolderPlan(name, parent, weight))
        return plan
    names = [name.strip() for name in folders]
    if not names or any(not name for name in names):
        raise ValueError("give every folder a name, and at least one folder")
    if len({name.lower() for name in names}) != len(names):
        raise ValueError(f"two folders of the same name: {names}")
    inbox = next((i for i, name in enumerate(names) if name.lower() == "inbox"), 0)
    others = iter(range(1, len(names)))
    return [
        FolderPlan(name, None, INBOX_WEIGHT if i == inbox else _other_weight(next(others)))
        for i, name in enumerate(names)
    ]


def _generated_folder(position: int) -> tuple[str, int | None]:
    """The name and parent position of folder `position` of an N-folder layout."""
    fixed: tuple[tuple[str, int | None], ...] = (
        ("Inbox", None),
        ("Sent Items", None),
        ("Receipts", 0),
        ("Archive", None),
        ("Deleted Items", None),
    )
    if position < len(fixed):
        return fixed[position]
    # Then, in turn, a project at the top, its notes in it, their drafts in those.
    group, place = divmod(position - len(fixed), 3)
    name = ("Project", "Notes", "Drafts")[place]
    return f"{name} {group + 1}", None if place == 0 else position - 1


def _other_weight(position: int) -> int:
    return OTHER_WEIGHTS[(position - 1) % len(OTHER_WEIGHTS)]


class Mailbox:
    """One generated mailbox: see the module's docstring."""

    def __init__(
        self,
        seed: int,
        name: str,
        generated: int,
        *,
        same_time: int = 1,
        folders: int | Sequence[str] | None = None,
        throttle_rate: float | None = None,
        retry_after: float | None = None,
        latency: float | None = None,
    ) -> None:
        if not 0 <= generated < FIRST_ADDED_INDEX:
            raise ValueError(f"a mailbox cannot hold {generated} messages")
        if same_time < 1:
            raise ValueError(f"same_time must be at least 1, not {same_time}")
        plan = folder_plan(folders)
        self.seed = seed
        self.name = name
        self.generated = generated  # messages 0 .. generated-1
        self.same_time = same_time  # consecutive generated messages sharing one received time
        slots = -(-generated // same_time)
        self.step = max(1, min(MAX_STEP, int(RECEIVED_SPAN.total_seconds()) // max(slots, 1)))
        # This mailbox's own fault settings; None: the server's.
        self.throttle_rate = throttle_rate
        self.retry_after = retry_after
        self.latency = latency
        # Changes since generation: {index from FIRST_ADDED_INDEX up: received time},
        # the indexes (generated or added) deleted, and how often each was edited.
        # Entries are never taken out of `added`.
        self.added: dict[int, datetime] = {}
        self.deleted: set[int] = set()
        self.edits: dict[int, int] = {}
        # Bumped by expire_delta_tokens(): older delta and skip tokens are refused.
        self.delta_generation = 0
        self.root_id = self._folder_id("msgfolderroot")
        self.folders: dict[int, MailFolder] = {}
        self._by_id: dict[str, int] = {}
        self._next_folder = 0
        # Where messages are that are not in their generated folder (every added
        # one): {index: folder}; kept for deleted ones (their last folder).
        self._placed: dict[int, int] = {}
        # Per folder: the messages held in it that are not there by generation,
        # and how many it holds more (or fewer) than were generated in it.
        self._extra: dict[int, set[int]] = {}
        self._extra_sorted: dict[int, list[int]] = {}
        self._adjust: dict[int, int] = {}
        for item in plan:
            self._new_folder(item.name, item.parent, hidden=False)
        self.inbox = next((f.number for f in self.folders.values() if f.name.lower() == "inbox"), 0)
        self.folders[self.inbox].well_known = "inbox"
        # The folder each generated message is in: slot i % FOLDER_PATTERN of the
        # pattern (the folders' shares of it by weight, the rounding's rest to the Inbox).
        weights = sum(item.weight for item in plan)
        pattern = [
            number
            for number, item in enumerate(plan)
            for _ in range(FOLDER_PATTERN * item.weight // weights)
        ]
        pattern += [self.inbox] * (FOLDER_PATTERN - len(pattern))
        random.Random(content.digest(seed, name, "folders")).shuffle(pattern)
        self._pattern = pattern
        self._slots: dict[int, list[int]] = {}
        for offset, number in enumerate(pattern):
            self._slots.setdefault(number, []).append(offset)
        # The change log: entry v (version v + 1) moved message index from folder to folder.
        self._log_index = array("q")
        self._log_from = array("l")
        self._log_to = array("l")
        # The messages each recent delta round reports, kept between its pages.
        self._rounds: dict[tuple[int, int, int], list[int]] = {}
        # {id: index} of the added messages and of generated ones 0 .. _ids_scanned-1.
        self._ids: dict[str, int] = {}
        self._ids_scanned = 0
        # Draws the random changes of the churn and of the control endpoint.
        self.rng = random.Random(content.digest(seed, name, "changes"))

    # -- messages by received time -----------------------------------------

    @property
    def size(self) -> int:
        """Messages held now (every deleted index is one that exists)."""
        return self.generated + len(self.added) - len(self.deleted)

    @property
    def changed(self) -> bool:
        """Whether messages were added or deleted, so a listing is no longer arithmetic."""
        return bool(self.added or self.deleted)

    def has(self, index: int) -> bool:
        """Whether the index is a message of this mailbox, deleted or not."""
        return 0 <= index < self.generated or index in self.added

    def holds(self, index: int) -> bool:
        """Whether the index is a message the mailbox holds now."""
        return self.has(index) and index not in self.deleted

    def digest(self, index: int | str, salt: str = "") -> bytes:
        return content.digest(self.seed, self.name, index, salt)

    def message_id(self, index: int) -> str:
        return content.message_id(self.digest(index))

    def received(self, index: int) -> datetime:
        if index >= FIRST_ADDED_INDEX:
            return self.added[index]  # no lock needed: an entry never changes once added
        # One slot of `step` seconds per `same_time` messages, a random second
        # within it: never decreasing, so index order is received order.
        slot = index // self.same_time
        jitter = int.from_bytes(self.digest(slot)[:8]) % self.step
        return FIRST_RECEIVED + timedelta(seconds=slot * self.step + jitter)

    def listing(self, clauses: Clauses) -> Sequence[int]:
        """The indexes of the messages held now matching every clause, oldest first;
        at one received time, generated ones by index, then added ones as added."""
        low, high = self.window(clauses)
        if not self.changed:
            return range(low, high)  # no per-message list: a mailbox of millions stays cheap
        generated = [index for index in range(low, high) if index not in self.deleted]
        added = sorted(
            (received, index)
            for index, received in self.added.items()
            if index not in self.deleted and _matches(received, clauses)
        )
        listing: list[int] = []
        taken = 0
        for received, index in added:
            # It follows every generated message received at or before its time.
            follows = self.first_index(received, after=True)
            cut = bisect.bisect_left(generated, follows, taken)
            listing += generated[taken:cut]
            listing.append(index)
            taken = cut
        listing += generated[taken:]
        return listing

    def window(self, clauses: Clauses) -> tuple[int, int]:
        """The range [low, high) of generated indexes matching every clause."""
        low, high = 0, self.generated
        for op, moment in clauses:
            first_at_or_after = self.first_index(moment, after=False)
            first_after = self.first_index(moment, after=True)
            if op == "ge":
                low = max(low, first_at_or_after)
            elif op == "gt":
                low = max(low, first_after)
            elif op == "lt":
                high = min(high, first_at_or_after)
            elif op == "le":
                high = min(high, first_after)
            elif op == "eq":
                low, high = max(low, first_at_or_after), min(high, first_after)
        return low, max(low, high)

    def first_index(self, moment: datetime, *, after: bool) -> int:
        """The first generated index received at or (after=True) strictly after
        moment, by binary search: received times never decrease with the index."""
        low, high = 0, self.generated
        while low < high:
            middle = (low + high) // 2
            received = self.received(middle)
            if received > moment or (not after and received == moment):
                high = middle
            else:
                low = middle + 1
        return low

    # -- folders -------------------------------------------------------------

    def folder(self, reference: str) -> MailFolder | None:
        """The folder of this id, or of this well-known name (any case); None: no such folder."""
        number = self._by_id.get(reference)
        if number is None:
            alias = reference.lower()
            number = next((f.number for f in self.folders.values() if f.well_known == alias), None)
        return None if number is None else self.folders.get(number)

    def children(self, parent: int | None, *, hidden: bool = False) -> list[MailFolder]:
        """The folders directly in parent (None: the top level), hidden ones only if asked."""
        return [f for f in self.folders.values() if f.parent == parent and (hidden or not f.hidden)]

    def total(self, folder: int) -> int:
        """The number of messages in the folder now."""
        return self._generated_in(folder, self.generated) + self._adjust[folder]

    def folder_of(self, index: int) -> int | None:
        """The folder message `index` is in; None once deleted."""
        if index in self.deleted:
            return None
        return self.last_folder(index)

    def last_folder(self, index: int) -> int:
        """The folder the message is in or (deleted) was last in."""
        placed = self._placed.get(index)
        if placed is not None:
            return placed
        return self._pattern[index % FOLDER_PATTERN]

    def folder_id_of(self, index: int) -> str:
        """The id of the folder the message is in or was last in (its parentFolderId)."""
        number = self.last_folder(index)
        folder = self.folders.get(number)
        return folder.id if folder is not None else self._folder_id(number)

    def add_folder(self, name: str, parent: int | None, *, hidden: bool = False) -> MailFolder:
        if not name.strip():
            raise ValueError("a folder needs a name")
        if parent is not None and parent not in self.folders:
            raise ValueError(f"mailbox {self.name} has no folder {parent}")
        if any(f.name.lower() == name.strip().lower() for f in self.children(parent, hidden=True)):
            raise ValueError(f"a folder named {name.strip()!r} is already there")
        return self._new_folder(name.strip(), parent, hidden=hidden)

    def delete_folder(self, number: int) -> list[int]:
        """Delete the folder, its child folders and their messages; the messages deleted."""
        folder = self.folders[number]
        if number == self.inbox:
            raise ValueError("the Inbox cannot be deleted: new mail arrives there")
        deleted: list[int] = []
        for child in self.children(number, hidden=True):
            deleted += self.delete_folder(child.number)
        for index in self.members_after(number, -1, self.size):
            self.delete(index)
            deleted.append(index)
        del self.folders[number]
        del self._by_id[folder.id]
        del self._extra[number]
        del self._adjust[number]
        self._extra_sorted.pop(number, None)
        return deleted

    # -- changes -------------------------------------------------------------

    @property
    def version(self) -> int:
        """How many changes the mailbox had: a delta round names the version it started at."""
        return len(self._log_index)

    def deliver(self, count: int) -> None:
        """count more generated messages, received after the generated ones."""
        if count < 0 or self.generated + count >= FIRST_ADDED_INDEX:
            raise ValueError(f"cannot deliver {count} messages to {self.name}")
        first = self.generated
        self.generated += count
        for index in range(first, self.generated):
            if self._pattern[index % FOLDER_PATTERN] not in self.folders:
                # Its folder was deleted: it arrives in the Inbox.
                self._placed[index] = self.inbox
                self._enter(index, self.inbox)
            self._log(index, _NONE, self.last_folder(index))

    def add(self, received: datetime, folder: int) -> int:
        """A new message received at that time, in the folder; its index."""
        index = FIRST_ADDED_INDEX + len(self.added)
        self.added[index] = received
        self._ids[self.message_id(index)] = index
        self._placed[index] = folder
        self._enter(index, folder)
        self._log(index, _NONE, folder)
        return index

    def delete(self, index: int) -> bool:
        """Delete a message; False if it already was."""
        folder = self.folder_of(index)
        if folder is None:
            return False
        self._leave(index, folder)
        self.deleted.add(index)
        self._log(index, folder, _NONE)
        return True

    def edit(self, index: int) -> None:
        folder = self._held_folder(index)
        self.edits[index] = self.edits.get(index, 0) + 1
        self._log(index, folder, folder)

    def move(self, index: int, to: int) -> int:
        """Move a message to the folder; the folder it was in (a no-op when the same)."""
        if to not in self.folders:
            raise ValueError(f"mailbox {self.name} has no folder {to}")
        source = self._held_folder(index)
        if source == to:
            return source
        self._leave(index, source)
        if index < FIRST_ADDED_INDEX and self._pattern[index % FOLDER_PATTERN] == to:
            del self._placed[index]  # back in the folder it was generated in
        else:
            self._placed[index] = to
        self._enter(index, to)
        self._log(index, source, to)
        return source

    def index_of(self, message_id: str) -> int | None:
        """The index of the message with this id, held or deleted; None: no such message.
        Added ones are remembered as added; generated ones' ids are generated in
        index order and remembered (up to ID_CACHE of them), so a second look is quick."""
        found = self._ids.get(message_id)
        if found is not None:
            return found
        for index in range(self._ids_scanned, self.generated):
            the_id = self.message_id(index)
            if index < ID_CACHE:
                self._ids[the_id] = index
                self._ids_scanned = index + 1
            if the_id == message_id:
                return index
        return None

    def changes(self, since: int, until: int) -> Iterator[tuple[int, int, int]]:
        """The change log's entries (index, from folder, to folder) after version
        `since` up to `until`; a folder is -1 where the message was not held."""
        return zip(
            self._log_index[since:until],
            self._log_from[since:until],
            self._log_to[since:until],
            strict=True,
        )

    # -- delta rounds ----------------------------------------------------------

    def members_after(self, folder: int, after: int, limit: int) -> list[int]:
        """The first `limit` messages in the folder now with an index above `after`,
        in index order: its generated ones block by block, merged with the rest."""
        found: list[int] = []
        offsets = self._slots.get(folder, [])
        block, offset = divmod(max(after + 1, 0), FOLDER_PATTERN)
        start = bisect.bisect_left(offsets, offset)
        while offsets and len(found) < limit and block * FOLDER_PATTERN < self.generated:
            for slot in offsets[start:]:
                index = block * FOLDER_PATTERN + slot
                if index >= self.generated:
                    break
                if index in self._placed or index in self.deleted:
                    continue  # moved elsewhere (or back: then it is in _extra) or deleted
                found.append(index)
                if len(found) == limit:
                    break
            block, start = block + 1, 0
        extra = self._sorted_extra(folder)
        first = bisect.bisect_right(extra, after)
        found += extra[first : first + limit]
        found.sort()
        return found[:limit]

    def touched(self, folder: int, since: int, until: int) -> list[int]:
        """The messages that were in the folder at some version after `since` up to
        `until` and changed then (added, edited, moved in or out, deleted), by index."""
        key = (folder, since, until)
        indexes = self._rounds.get(key)
        if indexes is None:
            indexes = sorted(
                {
                    index
                    for index, source, to in self.changes(since, until)
                    if folder in (source, to)
                }
            )
            if len(self._rounds) >= ROUNDS_KEPT:
                del self._rounds[next(iter(self._rounds))]
            self._rounds[key] = indexes
        return indexes

    # -- picking messages at random (churn, the control endpoint) -------------

    def pick(self, count: int, rng: random.Random) -> list[int]:
        """count distinct messages held now, chosen at random."""
        if count > self.size:
            raise ValueError(f"mailbox {self.name} holds only {self.size} messages, not {count}")
        universe = self.generated + len(self.added)
        chosen: dict[int, None] = {}
        tries = 64 * count  # by rejection: quick unless most messages are deleted
        while len(chosen) < count and tries:
            tries -= 1
            drawn = rng.randrange(universe)
            index = drawn if drawn < self.generated else FIRST_ADDED_INDEX + drawn - self.generated
            if index not in self.deleted:
                chosen[index] = None
        if len(chosen) == count:
            return list(chosen)
        rest = [index for index in self.listing([]) if index not in chosen]
        return [*chosen, *rng.sample(rest, count - len(chosen))]

    # -- the rest ------------------------------------------------------------

    def _new_folder(self, name: str, parent: int | None, *, hidden: bool) -> MailFolder:
        number = self._next_folder
        self._next_folder += 1
        folder = MailFolder(
            number,
            self._folder_id(number),
            name,
            parent,
            hidden,
            WELL_KNOWN.get(name) if parent is None else None,
        )
        if folder.well_known is not None and self.folder(folder.well_known) is not None:
            folder.well_known = None  # a second "Archive" is just a folder
        self.folders[number] = folder
        self._by_id[folder.id] = number
        self._extra[number] = set()
        self._adjust[number] = 0
        return folder

    def _folder_id(self, key: int | str) -> str:
        """A Graph-like folder id, the same for the same (seed, mailbox, folder)."""
        return "AQMkAD" + base64.urlsafe_b64encode(self.digest(f"folder:{key}")).decode()

    def _generated_in(self, folder: int, below: int) -> int:
        """How many generated indexes under `below` lie in the folder by generation."""
        offsets = self._slots.get(folder, [])
        blocks, rest = divmod(below, FOLDER_PATTERN)
        return blocks * len(offsets) + bisect.bisect_left(offsets, rest)

    def _held_folder(self, index: int) -> int:
        folder = self.folder_of(index) if self.has(index) else None
        if folder is None:
            raise ValueError(f"mailbox {self.name} holds no message {index}")
        return folder

    def _enter(self, index: int, folder: int) -> None:
        if index >= FIRST_ADDED_INDEX or self._pattern[index % FOLDER_PATTERN] != folder:
            self._extra[folder].add(index)
            self._extra_sorted.pop(folder, None)
        self._adjust[folder] += 1

    def _leave(self, index: int, folder: int) -> None:
        if index in self._extra[folder]:
            self._extra[folder].discard(index)
            self._extra_sorted.pop(folder, None)
        self._adjust[folder] -= 1

    def _sorted_extra(self, folder: int) -> list[int]:
        extra = self._extra_sorted.get(folder)
        if extra is None:
            extra = self._extra_sorted[folder] = sorted(self._extra.get(folder, ()))
        return extra

    def _log(self, index: int, source: int, to: int) -> None:
        self._log_index.append(index)
        self._log_from.append(source)
        self._log_to.append(to)


def _matches(received: datetime, clauses: Clauses) -> bool:
    return all(COMPARISONS[op](received, moment) for op, moment in clauses)


def whole_second(moment: datetime) -> datetime:
    """A received time as Graph keeps it: UTC (naive means UTC), whole seconds."""
    utc = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return utc.replace(microsecond=0)
