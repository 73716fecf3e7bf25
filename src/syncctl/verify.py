"""Proving a copy: Graph's own counts against the store's rows, folder by folder.

A store kept current by incremental rounds (it has folder state) is proved
per folder: Graph's `totalItemCount` of each folder, from the folder listing
(every folder's count in one pass: `mailFolders`, then each level of
`childFolders`), against the store's rows in that folder not marked deleted.
Folders Graph has that syncctl never synced, and folders of rows that Graph
no longer has, are compared too (the other side counts 0). A store only ever
synced by full jobs is proved by the window of its last completed full job:
Graph's `$count` of the window against its rows received in it.

The database is read first, in one snapshot, then Graph: mail that arrives
in between makes Graph count more, which the rules below explain; a copy
never looks more complete than it is.

A difference (Graph minus rows) is explained, not a loss, when:

- a round is in flight: the store's active incremental job has the folder's
  chunk pending or processing (a full job in flight explains every folder);
- the mail is newer than the last round: Graph counts more than the rows,
  and at least that many of the folder's messages were received at or after
  the folder's last round started (one `$count` of the folder).

Any other difference is "differs": mail missing from the copy, or rows of
mail the mailbox no longer has that are not marked deleted. `repair`
enqueues an incremental job whose chunks for those folders run a full round,
which reconciles both.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID

from syncctl.db import Connection, query
from syncctl.durations import format_time
from syncctl.errors import BadInput
from syncctl.incremental import INCREMENTAL, create_incremental_job
from syncctl.jobs import Store, find_store, list_stores
from syncctl.mailsource import (
    DeltaSource,
    Folder,
    FolderCount,
    FolderGone,
    MailboxNotFound,
    MailSourceError,
    Window,
)

# Verdicts of a folder (or a store's window).
OK = "ok"
ROUND_IN_FLIGHT = "round in flight"
JOB_IN_FLIGHT = "job in flight"
NEWER = "newer than the last round"
DIFFERS = "differs"
FOLDER_VERDICTS = (OK, NEWER, ROUND_IN_FLIGHT, JOB_IN_FLIGHT, DIFFERS)
# Verdicts of a store as a whole, besides the ones above.
EXPLAINED = "explained"
NEVER_SYNCED = "never synced"
NOT_VERIFIED = "not verified"

FOLDERS, WINDOW, NOTHING = "folders", "window", "nothing"
NO_FOLDER = "(no folder)"


class ProofSource(DeltaSource, FolderCount, Protocol):
    """What a proof asks the mail service: folders with their counts, a folder's
    count by received time, and a window's count."""

    def count(self, mailbox: str, window: Window) -> int: ...


@dataclass(frozen=True)
class FolderProof:
    """One folder (or a full job's window): Graph's count against the rows.
    difference is Graph minus rows: above 0, mail missing from the copy; below,
    rows of mail the mailbox no longer has. newer: how many of the folder's
    messages were received since its last round started (asked only when Graph
    counts more and no round is in flight)."""

    folder_id: str | None
    folder: str
    graph: int
    rows: int
    last_round_started_at: datetime | None
    last_round_at: datetime | None
    verdict: str
    newer: int | None = None

    @property
    def difference(self) -> int:
        return self.graph - self.rows


@dataclass(frozen=True)
class StoreProof:
    store: Store
    mode: str  # FOLDERS, WINDOW, or NOTHING (never synced, or not verified)
    folders: list[FolderProof]
    window: Window | None = None
    full_job_id: UUID | None = None
    active_job_id: UUID | None = None
    problem: str | None = None  # why it was not verified

    @property
    def drifted(self) -> list[FolderProof]:
        return [f for f in self.folders if f.verdict == DIFFERS]

    @property
    def verdict(self) -> str:
        if self.problem is not None:
            return NOT_VERIFIED
        if self.mode == NOTHING:
            return JOB_IN_FLIGHT if self.active_job_id else NEVER_SYNCED
        if self.drifted:
            return DIFFERS
        return OK if all(f.verdict == OK for f in self.folders) else EXPLAINED


@dataclass(frozen=True)
class Repair:
    """What --repair did for a store that differs: a job, or why not."""

    store: Store
    job_id: UUID | None
    full_rounds: list[str]  # the folders (paths) whose chunks run a full round
    skipped: str | None = None


@dataclass
class Verification:
    stores: list[StoreProof]
    repairs: list[Repair] = field(default_factory=list)

    @property
    def failed(self) -> list[StoreProof]:
        """The stores a check fails on: a folder differs, or the store could not be verified."""
        return [s for s in self.stores if s.verdict in (DIFFERS, NOT_VERIFIED)]

    def totals(self) -> dict[str, Any]:
        folders = [f for s in self.stores for f in s.folders]
        verdicts: dict[str, int] = {}
        for proof in folders:
            verdicts[proof.verdict] = verdicts.get(proof.verdict, 0) + 1
        drifted = [f for f in folders if f.verdict == DIFFERS]
        return {
            "stores": len(self.stores),
            "folders": len(folders),
            "graph": sum(f.graph for f in folders),
            "rows": sum(f.rows for f in folders),
            "verdicts": verdicts,
            "stores_differ": sum(s.verdict == DIFFERS for s in self.stores),
            "stores_not_verified": sum(s.verdict == NOT_VERIFIED for s in self.stores),
            "missing_from_copy": sum(f.difference for f in drifted if f.difference > 0),
            "rows_not_in_mailbox": sum(-f.difference for f in drifted if f.difference < 0),
        }


def verify(
    conn: Connection,
    source: ProofSource,
    *,
    store_ref: str | None,
    repair: bool = False,
) -> Verification:
    """Prove one store (store_ref: its id or email) or, with None, every store;
    with repair, enqueue an incremental job for each store that differs whose
    drifted folders run a full round."""
    if store_ref is not None:
        proofs = [prove_store(conn, source, find_store(conn, store_ref))]
    else:
        proofs = [_prove_or_report(conn, source, store) for store in _every_store(conn)]
    result = Verification(proofs)
    if repair:
        result.repairs = [
            repair_store(conn, source, proof) for proof in proofs if proof.verdict == DIFFERS
        ]
    return result


def _every_store(conn: Connection) -> list[Store]:
    return sorted(
        (
            Store(row["id"], row["name"], row["email"], row["business_id"])
            for row in list_stores(conn)
        ),
        key=lambda store: (store.email or "").lower(),
    )


def _prove_or_report(conn: Connection, source: ProofSource, store: Store) -> StoreProof:
    """prove_store, with a mailbox Graph does not know (or no address) reported,
    not raised: one gone mailbox does not stop --all."""
    if not store.email:
        return StoreProof(store, NOTHING, [], problem="the store has no email address")
    try:
        return prove_store(conn, source, store)
    except MailboxNotFound as exc:
        return StoreProof(store, NOTHING, [], problem=f"Graph does not know it ({exc.reason})")


def prove_store(conn: Connection, source: ProofSource, store: Store) -> StoreProof:
    """The store's folders (or its full job's window), Graph against the rows."""
    with _snapshot(conn):
        facts = conn.execute(query("verify_store_facts"), {"store_id": store.id}).fetchone()
        assert facts is not None
        known = conn.execute(query("verify_folders"), {"store_id": store.id}).fetchall()
        window = None
        window_rows = 0
        if not facts["has_folder_state"] and facts["full_job_id"] is not None:
            window = Window(facts["full_job_from"], facts["full_job_to"])
            counted = conn.execute(
                query("verify_window_rows"),
                {
                    "store_id": store.id,
                    "received_from": window.received_from,
                    "received_to": window.received_to,
                },
            ).fetchone()
            assert counted is not None
            window_rows = counted["rows"]
    active = facts["active_job_id"]
    if facts["has_folder_state"]:
        full_job_running = active is not None and facts["active_job_type"] != INCREMENTAL
        folders = _prove_folders(source, store.email, known, full_job_running=full_job_running)
        return StoreProof(store, FOLDERS, folders, active_job_id=active)
    if window is None:
        return StoreProof(store, NOTHING, [], active_job_id=active)
    graph = source.count(store.email, window)
    verdict = OK if graph == window_rows else JOB_IN_FLIGHT if active else DIFFERS
    proof = FolderProof(
        None,
        _window_label(window),
        graph,
        window_rows,
        None,
        facts["full_job_completed_at"],
        verdict,
    )
    return StoreProof(
        store,
        WINDOW,
        [proof],
        window=window,
        full_job_id=facts["full_job_id"],
        active_job_id=active,
    )


@contextmanager
def _snapshot(conn: Connection) -> Iterator[None]:
    with conn.transaction():
        conn.execute(query("verify_snapshot"))
        yield


def _prove_folders(
    source: ProofSource,
    mailbox: str,
    known: Sequence[dict[str, Any]],
    *,
    full_job_running: bool,
) -> list[FolderProof]:
    """Graph's folders in its order, then folders of rows that Graph no longer
    has, then rows with no folder."""
    listed = source.folders(mailbox)
    by_id = {row["folder_id"]: row for row in known}
    proofs = []
    for folder in listed:
        graph = _graph_total(source, mailbox, folder)
        row = by_id.get(folder.id)
        proofs.append(
            _prove_folder(
                source,
                mailbox,
                folder_id=folder.id,
                path=folder.path,
                graph=graph,
                row=row,
                full_job_running=full_job_running,
            )
        )
    listed_ids = {folder.id for folder in listed}
    for row in known:
        if row["folder_id"] in listed_ids or not row["rows"]:
            continue  # a gone folder with no rows left to prove has nothing to show
        if row["folder_id"] is None:
            path = NO_FOLDER
        else:
            path = f"{row['folder_name'] or row['folder_id']} (gone from the mailbox)"
        proofs.append(
            _prove_folder(
                source,
                mailbox,
                folder_id=row["folder_id"],
                path=path,
                graph=0,
                row=row,
                full_job_running=full_job_running,
            )
        )
    return proofs


def _graph_total(source: ProofSource, mailbox: str, folder: Folder) -> int:
    if folder.total is not None:
        return folder.total
    # The listing left it out: ask the folder itself (one request).
    return source.folder_total(mailbox, folder.id)


def _prove_folder(
    source: ProofSource,
    mailbox: str,
    *,
    folder_id: str | None,
    path: str,
    graph: int,
    row: dict[str, Any] | None,
    full_job_running: bool,
) -> FolderProof:
    """One folder's verdict, by the rules in the module's docstring. row: what
    syncctl knows of the folder (None: no rows and no round)."""
    rows = row["rows"] if row else 0
    started = row["last_round_started_at"] if row else None
    ended = row["last_round_at"] if row else None
    # Rounds of a release before migration 0012 left no start: go by when the round ended.
    since = started or ended

    def proof(verdict: str, newer: int | None = None) -> FolderProof:
        return FolderProof(folder_id, path, graph, rows, started, ended, verdict, newer)

    if graph == rows:
        return proof(OK)
    if row is not None and row["in_flight"]:
        return proof(ROUND_IN_FLIGHT)
    if full_job_running:
        return proof(JOB_IN_FLIGHT)
    if graph > rows and since is not None and folder_id is not None:
        try:
            # Whole seconds, as Graph keeps received times: mail of the second
            # the round started in may have arrived after it started.
            newer = source.folder_count(
                mailbox, folder_id, Window(since.replace(microsecond=0), None)
            )
        except FolderGone:
            return proof(DIFFERS)
        return proof(NEWER if newer >= graph - rows else DIFFERS, newer)
    return proof(DIFFERS)


def _window_label(window: Window) -> str:
    end = format_time(window.received_to) if window.received_to else "now"
    if window.received_from is None:
        return f"all mail received before {end}"
    return f"all mail received {format_time(window.received_from)} to {end}"


def repair_store(conn: Connection, source: ProofSource, proof: StoreProof) -> Repair:
    """Enqueue an incremental job for a store that differs, its drifted folders
    running a full round (a store proved by its window has no folder state, so
    every folder runs one). A store with an active job is skipped."""
    store = proof.store
    if proof.active_job_id is not None:
        return Repair(
            store,
            None,
            [],
            skipped=f"it has an active job ({proof.active_job_id}); verify again once it ends",
        )
    # A gone folder's rows are marked deleted as the job is created; rows with
    # no folder are in no folder's round.
    full_rounds = [f.folder_id for f in proof.drifted if f.folder_id is not None]
    if proof.mode == FOLDERS and not full_rounds:
        return Repair(
            store,
            None,
            [],
            skipped="only rows without a folder differ, which no round reconciles "
            "(they were stored before syncctl recorded folders)",
        )
    try:
        created = create_incremental_job(
            conn, source, store_ref=str(store.id), full_rounds=full_rounds
        )
    except (BadInput, MailSourceError) as exc:
        return Repair(store, None, [], skipped=str(exc))
    return Repair(
        store,
        created.job_id,
        [chunk.folder for chunk in created.chunks if chunk.round == "full"],
    )
