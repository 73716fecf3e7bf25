"""`syncctl demo`: the whole system on this machine, with sample data.

One command starts (or reuses) the embedded PostgreSQL, serves sample
mailboxes from the local Graph-compatible server in this process, creates
their jobs, runs worker processes (`syncctl run --drain`), shows the live
progress view, kills one worker in the middle of a chunk on purpose and shows
another finish it once the lease runs out, and ends with the reports.

Sample stores have addresses in a reserved domain (DEMO_DOMAIN), so the demo
tells its data from anything else in the database and resets only its own.
"""

from __future__ import annotations

import math
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import typer
from rich.console import Console

from syncctl import jobs, output, progress, reports
from syncctl.config import EMBEDDED, DatabaseTarget, resolve_database, syncctl_home
from syncctl.db import Connection, connection, query
from syncctl.errors import BadInput, CheckFailed
from syncctl.fakegraph import FakeGraphServer, serve
from syncctl.graph import GraphMailSource, GraphSettings, MailboxSlots
from syncctl.incremental import create_incremental_job
from syncctl.invocation import command_name
from syncctl.mailsource import MAILBOX_CONCURRENCY
from syncctl.migrate import migrate

# Reserved for documentation and tests (RFC 2606): no real mailbox lives there.
DEMO_DOMAIN = "demo.syncctl.invalid"
DEMO_SUFFIX = f"@{DEMO_DOMAIN}"
WORKERS = 3
WORKER_CONCURRENCY = 2
# Short, so the killed worker's chunk is reaped within seconds.
LEASE = "5s"
# Progress refreshes: often on a terminal, where the frame is redrawn; less in a log.
REFRESH_TERMINAL = 0.5
REFRESH_PLAIN = 1.0
# The demo takes well under a minute; past this, something is wrong.
DEADLINE = 180.0
# How long workers get to exit once the jobs are finished, or to hand chunks back.
WORKER_EXIT_TIMEOUT = 30.0
POLL = 0.05
SEED = 2025
# The database variables that `syncctl` commands read, which the demo never uses by itself.
DATABASE_VARIABLES = ("SYNCCTL_DATABASE_URL", "DATABASE_URL")

ShowReports = Callable[[DatabaseTarget, str], None]


@dataclass(frozen=True)
class SampleMailbox:
    """A sample mailbox: its size, how its job is chunked, and how the server treats it."""

    local_part: str
    name: str
    messages: int
    chunk_size: int
    role: str  # what it shows, for the person watching
    parallel: int = MAILBOX_CONCURRENCY  # chunks of its job at once
    throttle_rate: float | None = None
    retry_after: float | None = None
    latency: float | None = None
    # Removed from the server once its job exists: a user deleted meanwhile.
    deleted: bool = False

    @property
    def email(self) -> str:
        return f"{self.local_part}{DEMO_SUFFIX}"


SAMPLE_MAILBOXES = (
    SampleMailbox(
        "archive",
        "Archive",
        15_000,
        5_000,
        "the largest; a worker is killed while reading it",
        # Slower pages keep a chunk open long enough to be caught midway.
        latency=0.05,
    ),
    SampleMailbox("sales", "Sales", 6_000, 2_000, "mid-sized"),
    SampleMailbox("support", "Support", 2_500, 1_000, "small", parallel=1),
    SampleMailbox(
        "legal",
        "Legal",
        5_000,
        500,
        "throttles hard: half its requests get 429 with Retry-After 0.2s",
        throttle_rate=0.5,
        retry_after=0.2,
    ),
    SampleMailbox(
        "former",
        "Former employee",
        1_500,
        1_000,
        "deleted after its job is created: its chunks fail with 404, for good",
        deleted=True,
    ),
)
# The mailbox whose reader is killed midway.
VICTIM = SAMPLE_MAILBOXES[0]


def is_demo_store(email: str | None) -> bool:
    return bool(email) and str(email).strip().lower().endswith(DEMO_SUFFIX)


# -- the database -------------------------------------------------------------


def demo_database(flag_url: str | None) -> DatabaseTarget:
    """The database named with --database-url, else the embedded one under SYNCCTL_HOME;
    never one configured through the environment, so sample data lands nowhere by accident."""
    if flag_url:
        return resolve_database(flag_url)
    # Imported here: starting the embedded server is the slow path.
    from syncctl.embedded import embedded_database_url

    return DatabaseTarget(embedded_database_url(syncctl_home()), EMBEDDED)


def describe_database(target: DatabaseTarget) -> str:
    if target.source != EMBEDDED:
        return f"{target.masked_url} (from {target.source})"
    described = f"the embedded PostgreSQL in {syncctl_home() / 'pgdata'}"
    configured = [name for name in DATABASE_VARIABLES if os.environ.get(name)]
    if configured:
        described += (
            f" ({configured[0]} is set, but the demo writes sample data only to a database "
            "given with --database-url)"
        )
    return described


def check_no_other_work(conn: Connection) -> None:
    """Refuse a database with active jobs that are not the demo's: its workers would run them
    against the sample server, and wait for them before exiting."""
    others = [
        row for row in reports.job_rows(conn, active=True) if not is_demo_store(row["store_email"])
    ]
    if others:
        raise BadInput(
            f"The database has {len(others)} active job(s) that are not the demo's "
            f"(such as job {others[0]['job_id']} of {others[0]['store_email']}); the demo's "
            "workers would run them against its sample server. Let them finish, or give the "
            "demo another database with --database-url."
        )


@dataclass(frozen=True)
class DemoReset:
    stores: int
    jobs: int
    emails: int


def reset_demo(conn: Connection) -> DemoReset:
    """Delete the sample stores with their jobs, chunks, attempts, messages and request
    slots, in one transaction; nothing of any other store."""
    params = {"suffix": DEMO_SUFFIX}
    with conn.transaction():
        # Jobs first (chunks and attempts go with them): the order every chunk change keeps.
        deleted_jobs = conn.execute(query("demo_delete_jobs"), params).rowcount
        deleted_emails = conn.execute(query("demo_delete_emails"), params).rowcount
        conn.execute(query("demo_delete_request_slots"), params)
        deleted_stores = conn.execute(query("demo_delete_stores"), params).rowcount
    return DemoReset(deleted_stores, deleted_jobs, deleted_emails)


def stored_messages(conn: Connection) -> dict[str, int]:
    """{email: messages stored} of every sample store."""
    rows = conn.execute(query("demo_stored_messages"), {"suffix": DEMO_SUFFIX}).fetchall()
    return {row["email"]: int(row["messages"]) for row in rows}


# -- the sample server and jobs ------------------------------------------------


def sample_server(mailboxes: Sequence[SampleMailbox] = SAMPLE_MAILBOXES) -> FakeGraphServer:
    """The Graph-compatible server with the sample mailboxes (not started)."""
    server = FakeGraphServer(seed=SEED)
    for mailbox in mailboxes:
        server.add_mailbox(
            mailbox.email,
            mailbox.messages,
            throttle_rate=mailbox.throttle_rate,
            retry_after=mailbox.retry_after,
            latency=mailbox.latency,
        )
    return server


def create_sample_jobs(
    conn: Connection,
    target: DatabaseTarget,
    server: FakeGraphServer,
    mailboxes: Sequence[SampleMailbox] = SAMPLE_MAILBOXES,
) -> dict[str, UUID]:
    """Register the sample stores (once) and create a job for each, counted over Graph;
    a job of an earlier run still active is replaced. Returns {email: job id}."""
    known = {str(store["email"]).lower() for store in jobs.list_stores(conn)}
    for mailbox in mailboxes:
        if mailbox.email not in known:
            jobs.add_store(conn, name=mailbox.name, email=mailbox.email)
    settings = GraphSettings(url=server.url, token=server.token)
    created: dict[str, UUID] = {}
    with closing(GraphMailSource(settings, slots=MailboxSlots(target))) as source:
        for mailbox in mailboxes:
            job = jobs.create_job(
                conn,
                source,
                store_ref=mailbox.email,
                chunk_size=mailbox.chunk_size,
                parallel=mailbox.parallel,
                sync_type="demo",
                force=True,
            )
            created[mailbox.email] = job.job_id
    for mailbox in mailboxes:
        if mailbox.deleted:
            server.remove_mailbox(mailbox.email)
    return created


# -- workers ------------------------------------------------------------------


@dataclass
class DemoWorker:
    worker_id: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def running(self) -> bool:
        return self.process.poll() is None


def start_workers(
    target: DatabaseTarget, server: FakeGraphServer, log_dir: Path, *, count: int = WORKERS
) -> list[DemoWorker]:
    """Start `syncctl run --drain` processes pointed at the database and the sample server."""
    env = {
        name: value
        for name, value in os.environ.items()
        # Real Graph credentials or another database must not reach the demo's workers.
        if name == "SYNCCTL_HOME" or not (name.startswith("SYNCCTL_") or name == "DATABASE_URL")
    }
    env.update(
        SYNCCTL_DATABASE_URL=target.url,
        SYNCCTL_GRAPH_URL=server.url,
        SYNCCTL_GRAPH_TOKEN=server.token,
    )
    log_dir.mkdir(parents=True, exist_ok=True)
    workers = []
    for number in range(1, count + 1):
        worker_id = f"demo-{number}-{secrets.token_hex(2)}"
        log = log_dir / f"worker-{number}.log"
        with log.open("wb") as log_file:
            process = subprocess.Popen(  # noqa: S603 - this interpreter, fixed arguments
                [
                    sys.executable,
                    "-m",
                    "syncctl",
                    "run",
                    "--drain",
                    "--lease",
                    LEASE,
                    "--concurrency",
                    str(WORKER_CONCURRENCY),
                    "--worker-id",
                    worker_id,
                ],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        workers.append(DemoWorker(worker_id, process, log))
    return workers


def stop_workers(workers: Sequence[DemoWorker], *, timeout: float = WORKER_EXIT_TIMEOUT) -> None:
    """Ask running workers to hand their chunks back and exit; kill those that do not."""
    for worker in workers:
        if worker.running:
            worker.process.terminate()
    deadline = time.monotonic() + timeout
    for worker in workers:
        try:
            worker.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.process.kill()
            worker.process.wait()


@dataclass(frozen=True)
class Kill:
    """The worker killed on purpose and the chunk it held."""

    worker_id: str
    pid: int
    job_id: UUID
    chunk_id: UUID
    chunk_index: int
    total_chunks: int
    attempt: int
    messages_written: int  # the chunk's checkpoint when its worker died
    store: str


class Saboteur(threading.Thread):
    """Kills the worker reading a chunk of the job midway (SIGKILL: no goodbye, no
    hand-back), then reports the chunk being reaped, taken over and completed."""

    def __init__(
        self,
        target: DatabaseTarget,
        job_id: UUID,
        store: str,
        workers: Sequence[DemoWorker],
    ) -> None:
        super().__init__(name="syncctl-demo-saboteur", daemon=True)
        self.target = target
        self.job_id = job_id
        self.store = store
        self.workers = {worker.worker_id: worker for worker in workers}
        self.kill: Kill | None = None
        self.failure: BaseException | None = None
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def run(self) -> None:
        try:
            with connection(self.target) as conn:
                self.kill = self._kill_midway(conn)
                if self.kill is not None:
                    self._follow(conn, self.kill)
        except Exception as exc:
            self.failure = exc

    def _kill_midway(self, conn: Connection) -> Kill | None:
        while not self._stop_event.wait(POLL):
            report = reports.job_report(conn, self.job_id)
            if report.job["status"] not in reports.ACTIVE:
                return None
            for chunk in report.chunks:
                worker = self.workers.get(chunk["worker_id"])
                if (
                    worker is not None
                    and worker.running
                    and chunk["status"] == "processing"
                    and 0 < chunk["emails_synced"] < chunk["estimated_emails"]
                ):
                    return self._kill(conn, worker, chunk)
        return None

    def _kill(self, conn: Connection, worker: DemoWorker, chunk: Mapping[str, Any]) -> Kill:
        worker.process.kill()
        worker.process.wait()
        # Read after the death: what the chunk's last committed page left in its checkpoint.
        after = _chunk(conn, self.job_id, chunk["chunk_id"])
        kill = Kill(
            worker_id=worker.worker_id,
            pid=worker.process.pid,
            job_id=self.job_id,
            chunk_id=chunk["chunk_id"],
            chunk_index=chunk["chunk_index"],
            total_chunks=chunk["total_chunks"],
            attempt=chunk["attempts"],
            messages_written=after["emails_synced"],
            store=self.store,
        )
        output.message(
            f"Killed worker {kill.worker_id} (pid {kill.pid}, SIGKILL) while it was reading "
            f"chunk {kill.chunk_index}/{kill.total_chunks} of {kill.store}, "
            f"{kill.messages_written} of its {chunk['estimated_emails']} messages written. "
            f"Nobody is told: its lease ({LEASE}) runs out and a surviving worker reaps the chunk."
        )
        return kill

    def _follow(self, conn: Connection, kill: Kill) -> None:
        taken_over = False
        while not self._stop_event.wait(POLL):
            history = _history(conn, kill)
            later = _after_reaped(history, kill)
            if later and not taken_over:
                taken_over = True
                output.message(
                    f"Chunk {kill.chunk_index}/{kill.total_chunks} of {kill.store}: lease "
                    f"expired, reaped; worker {later[0]['worker_id']} took it over "
                    f"(attempt {later[0]['attempt']}) and resumes from its checkpoint, "
                    f"after message {kill.messages_written}."
                )
            done = [a for a in later if a["outcome"] == "completed"]
            if done:
                output.message(
                    f"Chunk {kill.chunk_index}/{kill.total_chunks} of {kill.store}: completed "
                    f"by worker {done[0]['worker_id']}."
                )
                return


def _chunk(conn: Connection, job_id: UUID, chunk_id: UUID) -> dict[str, Any]:
    """One chunk of the job as `status JOB` reports it, its attempts under "history"."""
    [chunk] = [c for c in reports.job_report(conn, job_id).chunks if c["chunk_id"] == chunk_id]
    return chunk


def _history(conn: Connection, kill: Kill) -> list[dict[str, Any]]:
    """Every attempt of the killed worker's chunk, in order."""
    history: list[dict[str, Any]] = _chunk(conn, kill.job_id, kill.chunk_id)["history"]
    return history


def _after_reaped(history: Sequence[Mapping[str, Any]], kill: Kill) -> list[Mapping[str, Any]]:
    """The attempts after the killed one, once it has been reaped; else none."""
    for position, attempt in enumerate(history):
        if attempt["worker_id"] == kill.worker_id and attempt["attempt"] == kill.attempt:
            return list(history[position + 1 :]) if attempt["outcome"] == "reaped" else []
    return []


# -- the demo -----------------------------------------------------------------


def run_demo(
    target: DatabaseTarget,
    *,
    reset: bool = False,
    keep_running: bool = False,
    show_reports: ShowReports,
    console: Console | None = None,
) -> None:
    """Run the demo end to end; raise CheckFailed (one sentence) when it did not go as planned.
    show_reports(target, since) prints the closing reports, as their commands do."""
    started = time.monotonic()
    console = console if console is not None else Console(highlight=False)
    output.message(
        "syncctl demo: sample mailboxes on a local Graph-compatible server, synced by "
        f"{WORKERS} worker processes, one of them killed midway on purpose."
    )
    output.message(f"Database: {describe_database(target)}.")
    log_dir = syncctl_home() / "demo"
    with connection(target) as conn:
        applied = migrate(conn)
        if applied:
            output.message(f"Created the schema ({len(applied)} migration(s)).")
        check_no_other_work(conn)
        if reset:
            removed = reset_demo(conn)
            output.message(
                f"Reset: deleted {removed.stores} sample store(s) with {removed.jobs} job(s) and "
                f"{removed.emails} message(s); nothing else was touched."
            )
        with sample_server() as server:
            output.message(f"Graph-compatible server at {server.url}, with these mailboxes:")
            for mailbox in SAMPLE_MAILBOXES:
                at_once = (
                    "one at a time" if mailbox.parallel == 1 else f"{mailbox.parallel} at once"
                )
                output.message(
                    f"  {mailbox.email}: {mailbox.messages} messages in chunks of "
                    f"{mailbox.chunk_size}, {at_once}; {mailbox.role}"
                )
            job_ids = create_sample_jobs(conn, target, server)
            output.message(
                f"Created {len(job_ids)} jobs. Starting {WORKERS} workers: `syncctl run --drain "
                f"--lease {LEASE} --concurrency {WORKER_CONCURRENCY}`, logs in {log_dir}."
            )
            try:
                with _running_workers(target, server, log_dir, job_ids[VICTIM.email]) as demo:
                    deadline = time.monotonic() + DEADLINE
                    end = progress.watch(
                        conn,
                        job_id=list(job_ids.values()),
                        interval=REFRESH_TERMINAL if console.is_terminal else REFRESH_PLAIN,
                        until=lambda: not demo.any_running() or time.monotonic() > deadline,
                        console=console,
                    )
                    if end == "interrupted":
                        raise KeyboardInterrupt
                    demo.wait_for_workers()
            except KeyboardInterrupt:
                output.message(
                    "Interrupted: the workers handed their chunks back. `syncctl demo` starts "
                    "again, replacing the demo's unfinished jobs."
                )
                raise
            elapsed = time.monotonic() - started
            output.message(f"Every worker has exited, {elapsed:.0f}s after the demo started.")
            problems = _problems(conn, job_ids, demo)
            _show_parallel_chunks(conn, job_ids)
            _show_throttling(server)
            if demo.saboteur.kill is not None:
                _show_recovery(conn, demo.saboteur.kill)
            problems += keep_current(conn, target, server, log_dir)
            since = f"{math.ceil(time.monotonic() - started) + 1}s"
            show_reports(target, since)
            _explain(target, job_ids, problems)
            if keep_running:
                output.message(
                    "--keep-running: the Graph-compatible server stays up until Ctrl-C. "
                    "To use it from another terminal:"
                )
                serve(server, announce=typer.echo)
    if problems:
        raise CheckFailed(problems[0])


@dataclass
class _RunningDemo:
    workers: list[DemoWorker]
    saboteur: Saboteur

    def any_running(self) -> bool:
        return any(worker.running for worker in self.workers)

    def wait_for_workers(self) -> None:
        deadline = time.monotonic() + WORKER_EXIT_TIMEOUT
        while self.any_running() and time.monotonic() < deadline:
            time.sleep(POLL)


@contextmanager
def _running_workers(
    target: DatabaseTarget, server: FakeGraphServer, log_dir: Path, victim_job: UUID
) -> Iterator[_RunningDemo]:
    """Workers and the saboteur, stopped on the way out whatever happened."""
    workers = start_workers(target, server, log_dir)
    saboteur = Saboteur(target, victim_job, VICTIM.email, workers)
    try:
        saboteur.start()
        yield _RunningDemo(workers, saboteur)
    finally:
        saboteur.stop()
        stop_workers(workers)


def _problems(conn: Connection, job_ids: Mapping[str, UUID], demo: _RunningDemo) -> list[str]:
    """What did not go as planned, one sentence each; empty when all did."""
    problems: list[str] = []
    killed = demo.saboteur.kill.worker_id if demo.saboteur.kill is not None else None
    # 1 is a drained worker that ran a failed chunk: the deleted mailbox's, as planned.
    crashed = [
        worker
        for worker in demo.workers
        if worker.worker_id != killed and worker.process.returncode not in (0, 1)
    ]
    problems.extend(
        f"Worker {worker.worker_id} exited with code {worker.process.returncode}; "
        f"its log is {worker.log}."
        for worker in crashed
    )
    if demo.saboteur.failure is not None:
        problems.append(f"Watching for the worker to kill failed: {demo.saboteur.failure}.")
    rows = {row["job_id"]: row for row in reports.job_rows(conn, job_ids=job_ids.values())}
    stored = stored_messages(conn)
    for mailbox in SAMPLE_MAILBOXES:
        row = rows[job_ids[mailbox.email]]
        expected = "failed" if mailbox.deleted else "completed"
        if row["status"] != expected:
            problems.append(
                f"The job of {mailbox.email} is {row['status']}, not {expected}; "
                f"see `{command_name()} status {row['job_id']}` and the worker logs in "
                f"{demo.workers[0].log.parent}."
            )
        elif not mailbox.deleted and stored.get(mailbox.email, 0) < mailbox.messages:
            problems.append(
                f"{mailbox.email} holds {stored.get(mailbox.email, 0)} messages, "
                f"not all {mailbox.messages}."
            )
    at_once = chunks_at_once(conn, job_ids)
    problems.extend(
        f"{mailbox.email} had {at_once[mailbox.email]} chunks worked on at once, more than "
        f"its {mailbox.parallel}."
        for mailbox in SAMPLE_MAILBOXES
        if at_once.get(mailbox.email, 0) > mailbox.parallel
    )
    kill = demo.saboteur.kill
    if kill is None:
        problems.append(
            f"No worker was caught in the middle of a chunk of {VICTIM.email}, "
            "so there was no recovery to show."
        )
    elif not any(a["outcome"] == "completed" for a in _after_reaped(_history(conn, kill), kill)):
        problems.append(
            f"Chunk {kill.chunk_index} of {kill.store} was not reaped and completed after its "
            f"worker was killed; see `{command_name()} status {kill.job_id}`."
        )
    return problems


def chunks_at_once(conn: Connection, job_ids: Mapping[str, UUID]) -> dict[str, int]:
    """{email: the most chunks of its job that were worked on at one moment}."""
    emails = {job_id: email for email, job_id in job_ids.items()}
    rows = conn.execute(query("demo_chunks_at_once"), {"job_ids": list(job_ids.values())})
    return {emails[row["job_id"]]: row["most"] for row in rows.fetchall()}


def _show_parallel_chunks(conn: Connection, job_ids: Mapping[str, UUID]) -> None:
    at_once = chunks_at_once(conn, job_ids)
    shown = ", ".join(
        f"{mailbox.local_part} {at_once.get(mailbox.email, 0)} of {mailbox.parallel}"
        for mailbox in SAMPLE_MAILBOXES
    )
    output.message(
        f"Chunks of a job worked on at once, at most (of its --parallel): {shown}. A job's "
        "`synced through` in `syncctl status` is where its first unfinished chunk starts."
    )


def _show_throttling(server: FakeGraphServer) -> None:
    for mailbox in SAMPLE_MAILBOXES:
        if not mailbox.throttle_rate:
            continue
        asked = [r for r in server.requests if r.mailbox == mailbox.email]
        throttled = [r for r in asked if r.status == 429]
        output.message(
            f"{mailbox.email}: the server answered {len(throttled)} of its {len(asked)} "
            "requests with 429 Too Many Requests; each was retried after the Retry-After sent."
        )


def _show_recovery(conn: Connection, kill: Kill) -> None:
    typer.echo()
    output.table(
        _history(conn, kill),
        {
            "attempt": "attempt",
            "worker_id": "worker",
            "started_at": "started",
            "finished_at": "finished",
            "outcome": "outcome",
            "emails_synced": "messages",
            "error": "error",
        },
        title=f"Chunk {kill.chunk_index}/{kill.total_chunks} of {kill.store}, "
        f"whose worker was killed:",
    )


# -- keeping a store current ---------------------------------------------------

# The store the demo keeps current after the full sync.
KEPT_CURRENT = SAMPLE_MAILBOXES[1]


def keep_current(
    conn: Connection, target: DatabaseTarget, server: FakeGraphServer, log_dir: Path
) -> list[str]:
    """Two incremental rounds of one store after its full sync: the first (a full
    round of each folder, no delta state yet), then a few changes to the
    mailbox and a round that mirrors just them. Problems, one sentence each."""
    email = KEPT_CURRENT.email
    typer.echo()
    output.message(
        f"Keeping {email} current: `syncctl create {email} --type incremental`, one delta "
        "round per mail folder, then `syncctl run --drain`."
    )
    conn.execute(query("demo_forget_folder_state"), {"email": email})
    settings = GraphSettings(url=server.url, token=server.token)
    with closing(GraphMailSource(settings, slots=MailboxSlots(target))) as source:
        first = _incremental_round(conn, target, server, source, log_dir)
        output.message(
            f"  Round 1: {len(first.chunks)} folders, each read whole (no delta state yet): "
            f"{first.requests} requests; it wrote {first.written} rows (what the full job "
            "had not stored the same way)."
        )
        applied = server.apply_changes(email, add=5, edit=3, move=2, delete=2)
        second = _incremental_round(conn, target, server, source, log_dir)
    output.message(
        f"  Then in the mailbox: {len(applied['added'])} new, {len(applied['edited'])} edited, "
        f"{len(applied['moved'])} moved to another folder, {len(applied['deleted'])} deleted. "
        f"Round 2: {second.requests} requests (one per folder), {second.written} rows written; "
        "deleted ones are kept, marked with deleted_at."
    )
    return _mirror_problems(conn, applied)


@dataclass(frozen=True)
class _Round:
    chunks: list[Any]
    requests: int
    written: int


def _incremental_round(
    conn: Connection,
    target: DatabaseTarget,
    server: FakeGraphServer,
    source: GraphMailSource,
    log_dir: Path,
) -> _Round:
    before = len(server.requests)
    created = create_incremental_job(conn, source, store_ref=KEPT_CURRENT.email, force=True)
    workers = start_workers(target, server, log_dir / "incremental", count=1)
    try:
        workers[0].process.wait(DEADLINE)
    finally:
        stop_workers(workers)
    delta = [r for r in server.requests[before:] if r.path.endswith("/messages/delta")]
    written = conn.execute(query("demo_job_written"), {"job_id": created.job_id}).fetchone()
    return _Round(created.chunks, len(delta), int(written["written"]) if written else 0)


def _mirror_problems(conn: Connection, applied: Mapping[str, Any]) -> list[str]:
    rows = {
        row["provider_message_id"]: row
        for row in conn.execute(
            query("demo_rows_of"),
            {"email": KEPT_CURRENT.email, "ids": _changed_ids(applied)},
        ).fetchall()
    }
    problems = []
    if any(m not in rows or rows[m]["deleted_at"] is not None for m in applied["added"]):
        problems.append(f"New mail of {KEPT_CURRENT.email} was not mirrored by round 2.")
    if any(rows.get(m, {}).get("deleted_at") is None for m in applied["deleted"]):
        problems.append(f"Deleted mail of {KEPT_CURRENT.email} was not marked by round 2.")
    if any(rows.get(m["id"], {}).get("folder_id") != m["to"] for m in applied["moved"]):
        problems.append(f"Moved mail of {KEPT_CURRENT.email} is not in its new folder.")
    return problems


def _changed_ids(applied: Mapping[str, Any]) -> list[str]:
    return [
        *applied["added"],
        *applied["edited"],
        *applied["deleted"],
        *(m["id"] for m in applied["moved"]),
    ]


def _explain(target: DatabaseTarget, job_ids: Mapping[str, UUID], problems: Sequence[str]) -> None:
    """Where the data is and what to try next."""
    flag = ""
    if target.source != EMBEDDED or any(os.environ.get(name) for name in DATABASE_VARIABLES):
        shown = target.masked_url
        flag = " --database-url URL" if "***" in shown else f" --database-url '{shown}'"
    where = (
        f"the embedded PostgreSQL under {syncctl_home()}, which keeps running"
        if target.source == EMBEDDED
        else target.masked_url
    )
    victim_job = job_ids[VICTIM.email]
    deleted_job = next(job_ids[m.email] for m in SAMPLE_MAILBOXES if m.deleted)
    outcome = "The demo went as planned" if not problems else "The demo did not go as planned"
    output.message(f"\n{outcome}.")
    for problem in problems:
        output.message(f"  - {problem}")
    cmd = command_name()
    output.message(
        f"Its data stays in {where}; explore it with "
        f"`{cmd} status{flag}`, `{cmd} status {victim_job}{flag}` (the killed worker's "
        f"chunk: reaped, then completed), `{cmd} problem-stores{flag}`, "
        f"`{cmd} status {deleted_job}{flag}` (failed for good: the mailbox is gone), "
        f"`{cmd} list-stuck{flag}` and `{cmd} db status{flag}`. `{cmd} demo` runs it "
        f"again; `{cmd} demo --reset` first deletes the sample stores with their jobs and "
        f"mail (addresses ending in {DEMO_SUFFIX}), nothing else."
    )
