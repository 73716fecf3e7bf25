"""Benchmark 6: incremental rounds of a 100,000-message mailbox in 10 folders.

After a full job has copied the mailbox, three incremental jobs run one
after another, each created with `syncctl create --type incremental` and
drained by one `syncctl run --drain --concurrency 4`: the first round (a
full round of every folder: no delta state yet), a round with no changes,
and a round after 1% of the messages changed (half new, a quarter edited,
15% moved to another folder, 10% deleted). For each: the Graph requests
(folder discovery at create, and delta pages), the rows written, and the
wall time of create plus drain. The local server is warmed first, so the
figures measure syncctl, not the server generating mail.
"""

from __future__ import annotations

import math
import time
from typing import Any

from bench.common import PgServer, Section, Target, bench_connect, fresh_database, ratio
from bench.mail import CachedGraphServer, run_worker, syncctl, syncctl_env

FOLDERS = 10
CHANGED_SHARE = 0.01
PAGE = 1000  # the delta page syncctl asks for (Prefer: odata.maxpagesize)


def _round(graph: CachedGraphServer, url: str, env: dict[str, str], email: str) -> dict[str, Any]:
    """One incremental job, created and drained; what it cost."""
    graph.reset_record()
    began = time.perf_counter()
    syncctl("create", email, "--type", "incremental", env=env)
    created = time.perf_counter()
    run_worker("--drain", "--concurrency", "4", env=env)
    ended = time.perf_counter()
    requests = graph.requests
    delta_requests = [r for r in requests if r.path.endswith("/messages/delta")]
    delta = sum(r.status == 200 for r in delta_requests)
    refused = len(delta_requests) - delta  # 429s and the like, tried again
    with bench_connect(url) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(c.emails_synced), 0) AS written FROM chunked_sync_jobs c"
            " WHERE c.parent_sync_job_id = (SELECT id FROM sync_queue"
            "   ORDER BY created_at DESC LIMIT 1)"
        ).fetchone()
    return {
        "discovery": len(requests) - len(delta_requests),
        "delta": delta,
        "refused": refused,
        "written": int(row["written"]) if row else 0,
        "create_s": created - began,
        "drain_s": ended - created,
        "wall_s": ended - began,
    }


def run(server: PgServer, *, quick: bool) -> Section:
    size = 10_000 if quick else 100_000
    email = "incremental@bench.test"
    graph = CachedGraphServer({}, latency=0.0)
    graph.add_mailbox(email, size, folders=FOLDERS)
    section = Section(
        6,
        "Incremental rounds",
        f"A {size:,}-message mailbox in {FOLDERS} folders (two levels), copied by a full job, "
        "then kept current: three `syncctl create STORE --type incremental` jobs, each "
        "drained by one `syncctl run --drain --concurrency 4` (four folders' rounds at once). "
        f"Round 3 follows {CHANGED_SHARE:.0%} of the messages changing: half new, a quarter "
        "edited, 15% moved to another folder, 10% deleted. Requests are what the local Graph "
        "server served: folder discovery (at create) and delta pages of up to "
        f"{PAGE} items (answered ones; any the server refused, e.g. 429, and syncctl sent "
        "again, in brackets). Written: rows inserted, updated or marked deleted. Wall: create plus "
        "drain, each a fresh process.",
    )
    with graph, fresh_database(server, "incremental") as url:
        graph.warm(email)
        env = syncctl_env(url, graph)
        syncctl("store", "add", "--name", "incremental", "--email", email, env=env)
        began = time.perf_counter()
        syncctl("create", email, env=env)
        run_worker("--drain", "--concurrency", "4", env=env)
        full_job = time.perf_counter() - began
        folders = graph.folders(email)
        first = _round(graph, url, env, email)
        quiet = _round(graph, url, env, email)
        changes = round(size * CHANGED_SHARE)
        graph.apply_changes(
            email,
            add=changes // 2,
            edit=changes // 4,
            move=changes * 15 // 100,
            delete=changes - changes // 2 - changes // 4 - changes * 15 // 100,
        )
        changed = _round(graph, url, env, email)
    rows = [
        ["full job (for comparison)", "", "", f"{size:,}", "", "", f"{full_job:.2f}"],
        *(
            [
                name,
                str(r["discovery"]),
                str(r["delta"]) + (f" (+{r['refused']} refused)" if r["refused"] else ""),
                f"{r['written']:,}",
                f"{r['create_s']:.2f}",
                f"{r['drain_s']:.2f}",
                f"{r['wall_s']:.2f}",
            ]
            for name, r in (
                ("1. first round after the full job", first),
                ("2. no changes", quiet),
                (f"3. {changes:,} changes ({CHANGED_SHARE:.0%})", changed),
            )
        ),
    ]
    section.table(
        "",
        [
            "round",
            "discovery requests",
            "delta requests",
            "rows written",
            "create s",
            "drain s",
            "wall s",
        ],
        rows,
    )
    pages_of_changes = math.ceil(changes / PAGE)
    section.targets += [
        Target(
            "no changes: delta requests per folder", ratio(quiet["delta"], len(folders)), 1.0, False
        ),
        Target("no changes: rows written", quiet["written"], 0, False, unit=""),
        Target(
            f"{changes:,} changes: delta requests over one per folder plus a page per "
            f"{PAGE} changes",
            ratio(changed["delta"], len(folders) + pages_of_changes),
            1.0,
            False,
        ),
        Target(
            "first round: wall time against the full job's",
            ratio(first["wall_s"], full_job),
            1.0,
            False,
        ),
    ]
    section.notes += [
        f"The mailbox has {len(folders)} folders; discovery is one `mailFolders` request plus "
        "one `childFolders` request per folder that has children.",
        "The first round reads every folder whole (Graph's delta has no state yet), the same "
        "bytes as the full job; it writes only messages the store does not hold at their "
        "change key, in their folder, not marked deleted, so after a full job it writes "
        f"{first['written']:,} rows: the messages the full job did not see.",
        f"Round 3 wrote {changed['written']:,} rows for {changes:,} changes: a deletion is one "
        "row marked (never removed); a move is one row whose folder changes, or two writes "
        "when the old folder's round runs first (marked deleted there, restored by the new "
        "folder's round).",
    ]
    return section
