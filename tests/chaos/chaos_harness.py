"""A seeded chaos run: mailboxes on the local Graph server, `syncctl run`
worker processes behind a PostgreSQL proxy, and faults at random moments.

Faults: workers SIGKILLed and replaced, database connections cut and
blackholed mid-transaction, Graph answering 429 with Retry-After, 5xx and
hanging, next links expiring, a token Graph rejects as expired, a malformed
page, old mail deleted and new mail arriving while the jobs run. The run
ends when every job has finished (or at its deadline), then checks what must
hold whatever happened.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import psycopg
from chaos_proxy import PgProxy
from psycopg.rows import dict_row

from commandline import environment, syncctl
from syncctl.fakegraph import FakeGraphServer

LEASE_SECONDS = 5
# Workers reap every half lease; a sample that finds a chunk processing this
# long past its lease is a chunk the reaping missed (sampling and a worker's
# restart add to it, so a little over one reap interval is allowed).
REAP_INTERVAL = LEASE_SECONDS / 2
OVERDUE_ALLOWED = REAP_INTERVAL + 5.0
MALFORMED = "syncctl-chaos-malformed-page"  # marks the injected page in the server's record


@dataclass(frozen=True)
class ChaosPlan:
    seed: int
    mailboxes: int = 4
    smallest: int = 5_000
    largest: int = 20_000
    workers: int = 3
    concurrency: int = 2
    chunk_size: int = 2_000
    latency: float = 0.1  # seconds the Graph server adds to each request
    max_attempts: int = 25
    kill_every: tuple[float, float] = (2.0, 5.0)  # seconds between SIGKILLs
    deadline: float = 240.0  # seconds the jobs may take, faults and all
    # Incremental rounds after the full jobs, each after changes to every
    # mailbox (new, edited, moved, deleted mail), under the same chaos.
    incremental_rounds: int = 0


@dataclass
class ChaosReport:
    seed: int
    seconds: float = 0.0
    kills: int = 0
    database_crashes: int = 0
    restarts: int = 0
    workers_started: int = 0
    connections_cut: int = 0
    blackholes: int = 0
    links_expired: int = 0
    deleted: int = 0
    arrived: int = 0
    throttled: int = 0
    server_errors: int = 0
    hung: int = 0
    token_faults_queued: int = 0
    tokens_expired: int = 0  # served, as are the counts below
    malformed_pages: int = 0
    malformed_recorded: int = 0  # attempts that ended on a malformed page
    messages_checked: int = 0
    incremental_rounds: int = 0
    changes_applied: int = 0
    most_overdue: float = 0.0
    # Seconds the database was down for a crash: no lease can be reaped meanwhile.
    database_down: float = 0.0
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"chaos seed {self.seed}: {self.seconds:.0f}s, {self.workers_started} workers started, "
            f"{self.kills} killed, {self.restarts} restarted after exiting, "
            f"{self.database_crashes} database crashes ({self.database_down:.1f}s down), "
            f"{self.connections_cut} database connections cut, "
            f"{self.blackholes} blackholes, {self.links_expired} link expiries, "
            f"{self.throttled} 429s, {self.server_errors} 5xx, {self.hung} hung requests, "
            f"{self.tokens_expired} tokens expired, {self.malformed_pages} malformed pages "
            f"({self.malformed_recorded} recorded as the attempt's error), "
            f"{self.deleted} messages deleted and {self.arrived} arrived mid-run, "
            f"{self.incremental_rounds} incremental rounds after {self.changes_applied} changes, "
            f"{self.messages_checked} messages checked, most overdue lease "
            f"{self.most_overdue:.1f}s; {len(self.problems)} problem(s)"
        )


class _Workers:
    def __init__(self, env: dict[str, str], plan: ChaosPlan, report: ChaosReport) -> None:
        self.env = env
        self.plan = plan
        self.report = report
        self.running: list[subprocess.Popen[bytes]] = []
        self.logs: list[Any] = []
        self.crashes: list[str] = []
        self.replaced: set[int] = set()

    def start(self) -> None:
        log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop_all()
        self.logs.append(log)
        self.running.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "syncctl",
                    "run",
                    "--lease",
                    f"{LEASE_SECONDS}s",
                    "--concurrency",
                    str(self.plan.concurrency),
                ],
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        )
        self.report.workers_started += 1

    def kill_one(self, rng: random.Random) -> None:
        alive = [w for w in self.running if w.poll() is None]
        if not alive:
            return
        victim = rng.choice(alive)
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        self.replaced.add(self.running.index(victim))
        self.report.kills += 1

    def restart_exited(self) -> None:
        """Start a replacement for each worker that exited by itself, as systemd's
        Restart=on-failure does: one that could not reach the database at its
        start exits 3 (here: a connection cut or blackholed as it started)."""
        for number, worker in enumerate(self.running):
            if worker.poll() is None or number in self.replaced:
                continue
            self.replaced.add(number)
            if worker.returncode == -signal.SIGKILL:
                continue  # killed by the run, replaced when killed
            self.report.restarts += 1
            if worker.returncode != 3:
                self.crashes.append(self._describe(number))
            self.start()

    def crashed(self) -> list[str]:
        """Workers that exited by themselves (not killed) with a code a database
        outage does not explain: their last log lines."""
        return [
            self._describe(number)
            for number, worker in enumerate(self.running)
            if worker.returncode not in (None, 0, 3, -signal.SIGKILL, -signal.SIGTERM)
            and number not in self.replaced
        ]

    def _describe(self, number: int) -> str:
        log = self.logs[number]
        log.seek(0)
        tail = log.read().decode("utf-8", "replace").strip().splitlines()[-5:]
        return f"worker exited {self.running[number].returncode}: {' | '.join(tail)}"

    def stop_all(self) -> None:
        for worker in self.running:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
        for worker in self.running:
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        self.crashes += self.crashed()
        for log in self.logs:
            log.close()


def run_chaos(
    plan: ChaosPlan,
    *,
    database_url: str,
    pg_host: str,
    pg_port: int,
    crash_database: Callable[[], None] | None = None,
) -> ChaosReport:
    """One seeded run against the database at database_url (migrated, empty).
    crash_database, when given, crashes PostgreSQL and starts it again (only
    for a server the test owns); it is called once, mid-run."""
    rng = random.Random(plan.seed)
    report = ChaosReport(plan.seed)
    sizes = {
        f"chaos{n}@contoso.test": rng.randint(plan.smallest, plan.largest)
        for n in range(plan.mailboxes)
    }
    dbname = psycopg.conninfo.conninfo_to_dict(database_url)["dbname"]
    observer = _Observer(database_url)
    with (
        FakeGraphServer(
            sizes,
            seed=plan.seed,
            throttle_rate=0.03,
            retry_after=0.3,
            error_rate=0.03,
            latency=plan.latency,
        ) as server,
        PgProxy(pg_host, pg_port) as proxy,
        observer,
    ):
        direct = environment(database_url, server)
        for email in sizes:
            syncctl("store", "add", "--name", email.partition("@")[0], "--email", email, env=direct)
            # A reaped attempt counts (a chunk that kills its worker must not loop
            # for ever), and this run kills workers every few seconds: enough
            # attempts that only a real failure can use them all.
            syncctl(
                "create",
                email,
                "--chunk-size",
                str(plan.chunk_size),
                "--max-attempts",
                str(plan.max_attempts),
                env=direct,
            )
        ever = {email: set(server.message_ids(email)) for email in sizes}
        # Mail that arrives after the job began, in a window a chunk may already
        # have read: a full job need not store it (the next job, or an
        # incremental round, does), but must not store it twice.
        arrived: dict[str, set[str]] = {email: set() for email in sizes}

        workers = _Workers(environment(proxy.url(str(dbname)), server), plan, report)
        for _ in range(plan.workers):
            workers.start()
        started = time.monotonic()
        faults = _fault_schedule(rng, plan)
        if crash_database is not None:
            faults = sorted([*faults, (rng.uniform(5, 10), "crash")])
        next_kill = started + rng.uniform(*plan.kill_every)
        try:
            while time.monotonic() - started < plan.deadline:
                now = time.monotonic()
                if now >= next_kill:
                    workers.kill_one(rng)
                    workers.start()
                    next_kill = now + rng.uniform(*plan.kill_every)
                while faults and now - started >= faults[0][0]:
                    _, fault = faults.pop(0)
                    if fault == "crash" and crash_database is not None:
                        down = time.monotonic()
                        crash_database()
                        report.database_down = time.monotonic() - down
                        report.database_crashes += 1
                        continue
                    _inject(
                        fault,
                        rng,
                        server=server,
                        proxy=proxy,
                        sizes=sizes,
                        ever=ever,
                        arrived=arrived,
                        report=report,
                    )
                workers.restart_exited()
                report.most_overdue = max(report.most_overdue, _most_overdue(observer))
                if _all_finished(observer):
                    if report.incremental_rounds >= plan.incremental_rounds:
                        break
                    _next_incremental_round(
                        rng,
                        server=server,
                        sizes=sizes,
                        ever=ever,
                        plan=plan,
                        report=report,
                        env=direct,
                    )
                time.sleep(0.25)
        finally:
            report.seconds = time.monotonic() - started
            workers.stop_all()
        report.connections_cut = proxy.connections_cut
        report.blackholes = proxy.blackholes
        report.problems += workers.crashes
        _count_graph_faults(server, report)
        _check(
            observer,
            server=server,
            sizes=sizes,
            ever=ever,
            arrived=arrived,
            plan=plan,
            report=report,
        )
        if report.incremental_rounds:
            _check_mirrored(observer, server=server, sizes=sizes, report=report)
    return report


def _next_incremental_round(
    rng: random.Random,
    *,
    server: FakeGraphServer,
    sizes: dict[str, int],
    ever: dict[str, set[str]],
    plan: ChaosPlan,
    report: ChaosReport,
    env: dict[str, str],
) -> None:
    """Change every mailbox, then enqueue an incremental job for each store."""
    for email in sorted(sizes):
        applied = server.apply_changes(
            email,
            add=rng.randint(10, 40),
            edit=rng.randint(10, 40),
            move=rng.randint(10, 40),
            delete=rng.randint(10, 40),
        )
        ever[email] |= set(applied["added"])
        report.changes_applied += sum(
            len(applied[k]) for k in ("added", "edited", "moved", "deleted")
        )
        syncctl(
            "create",
            email,
            "--type",
            "incremental",
            "--max-attempts",
            str(plan.max_attempts),
            env=env,
        )
    report.incremental_rounds += 1


class _Observer:
    """The run's own view of the database, connecting again after a crash."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.conn: psycopg.Connection[dict[str, Any]] | None = None

    def __enter__(self) -> _Observer:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.conn is not None:
            self.conn.close()

    def execute(self, sql: Any, params: Any = None) -> psycopg.Cursor[dict[str, Any]]:
        deadline = time.monotonic() + 60
        while True:
            try:
                if self.conn is None or self.conn.closed:
                    self.conn = psycopg.connect(self.url, autocommit=True, row_factory=dict_row)
                return self.conn.execute(sql, params)
            except psycopg.OperationalError:
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


def _fault_schedule(rng: random.Random, plan: ChaosPlan) -> list[tuple[float, str]]:
    """(seconds into the run, fault), in time order; the run may end before the last."""
    faults = [
        (rng.uniform(1, 4), "cut"),
        (rng.uniform(2, 6), "retention"),
        (rng.uniform(3, 8), "arrivals"),
        (rng.uniform(4, 10), "expire_links"),
        (rng.uniform(5, 12), "blackhole"),
        (rng.uniform(6, 14), "hang"),
        (rng.uniform(8, 16), "cut"),
        (rng.uniform(10, 20), "retention"),
        (rng.uniform(3, 15), "token"),
        (rng.uniform(12, 25), "token"),
        (rng.uniform(4, 18), "malformed"),
    ]
    return sorted(faults)


def _inject(
    fault: str,
    rng: random.Random,
    *,
    server: FakeGraphServer,
    proxy: PgProxy,
    sizes: dict[str, int],
    ever: dict[str, set[str]],
    arrived: dict[str, set[str]],
    report: ChaosReport,
) -> None:
    email = rng.choice(sorted(sizes))
    if fault == "cut":
        proxy.cut_all()
    elif fault == "blackhole":
        proxy.blackhole(rng.uniform(2.0, 4.0))
    elif fault == "expire_links":
        server.expire_links()
        report.links_expired += 1
    elif fault == "hang":
        server.fail_next(hang=True, count=2)
        report.hung += 2
    elif fault == "token":
        # Graph's answer to a token past its lifetime. The worker renews the
        # token and sends the request again, which Graph then serves. Not while
        # an earlier one waits to be served: both would answer one request
        # (refused twice is a credential Graph will not take, a permanent fault).
        served = sum(r.status == 401 and r.authorized for r in server.requests)
        if report.token_faults_queued <= served:
            server.fail_next(401, code="InvalidAuthenticationToken", body=_TOKEN_EXPIRED)
            report.token_faults_queued += 1
    elif fault == "malformed":
        # A 200 whose body is cut short: nothing of it may be written, and the
        # chunk's next attempt reads the page again.
        server.fail_next(200, code=MALFORMED, body=b'{"value": [{"id": "AAMk-cut-sh')
    elif fault == "retention":
        report.deleted += len(server.delete_oldest(email, rng.randint(50, 200)))
    elif fault == "arrivals":
        # New mail inside the jobs' windows: at times among the old messages.
        times = [
            server.received_at(email, rng.randrange(sizes[email])) + timedelta(seconds=1)
            for _ in range(rng.randint(20, 80))
        ]
        added = set(server.add_messages(email, times))
        ever[email] |= added
        arrived[email] |= added
        report.arrived += len(times)


_TOKEN_EXPIRED = (
    b'{"error": {"code": "InvalidAuthenticationToken", "message": "Lifetime validation'
    b' failed, the token is expired."}}'
)


def _most_overdue(conn: _Observer) -> float:
    row = conn.execute(
        "SELECT coalesce(max(extract(epoch FROM now() - lease_expires_at)), 0)::float AS s"
        "  FROM chunked_sync_jobs WHERE status = 'processing'"
    ).fetchone()
    return float(row["s"]) if row else 0.0


def _all_finished(conn: _Observer) -> bool:
    row = conn.execute(
        "SELECT count(*) FILTER (WHERE status IN ('pending', 'processing')) AS open FROM sync_queue"
    ).fetchone()
    return row is not None and row["open"] == 0


def _count_graph_faults(server: FakeGraphServer, report: ChaosReport) -> None:
    for request in server.requests:
        if request.status == 429:
            report.throttled += 1
        elif request.status >= 500:
            report.server_errors += 1
        elif request.status == 401 and request.authorized:
            report.tokens_expired += 1
        elif request.error_code == MALFORMED:
            report.malformed_pages += 1


def _check(
    conn: _Observer,
    *,
    server: FakeGraphServer,
    sizes: dict[str, int],
    ever: dict[str, set[str]],
    arrived: dict[str, set[str]],
    plan: ChaosPlan,
    report: ChaosReport,
) -> None:
    problems = report.problems
    if not _all_finished(conn):
        problems.append(f"jobs still open after the {plan.deadline:.0f}s deadline")
    for email in sizes:
        rows = conn.execute(
            "SELECT e.provider_message_id AS id FROM emails e JOIN stores s ON s.id = e.store_id"
            " WHERE s.email = %s",
            [email],
        ).fetchall()
        stored = [row["id"] for row in rows]
        held = set(server.message_ids(email)) - arrived[email]
        report.messages_checked += len(held)
        if len(stored) != len(set(stored)):
            problems.append(f"{email}: {len(stored) - len(set(stored))} messages stored twice")
        if missing := held - set(stored):
            problems.append(f"{email}: {len(missing)} messages in the mailbox never stored")
        if strangers := set(stored) - ever[email]:
            problems.append(f"{email}: {len(strangers)} stored messages the mailbox never had")
    statuses = conn.execute(
        "SELECT status, count(*) AS n FROM chunked_sync_jobs GROUP BY status"
    ).fetchall()
    if {row["status"] for row in statuses} != {"completed"}:
        problems.append(f"chunks not all completed: {statuses}")
        for row in conn.execute(
            "SELECT chunk_index, status, attempts, last_error FROM chunked_sync_jobs"
            " WHERE status <> 'completed'"
        ).fetchall():
            problems.append(f"chunk {row['chunk_index']} {row['status']}: {row['last_error']}")
    jobs = conn.execute("SELECT status, count(*) AS n FROM sync_queue GROUP BY status").fetchall()
    if {row["status"] for row in jobs} != {"completed"}:
        problems.append(f"jobs not all rolled up completed: {jobs}")
    _check_attempts(conn, report)
    # While the database is down nothing can be reaped: a lease that ran out
    # then is reaped once the database and the workers' connections are back.
    allowed = OVERDUE_ALLOWED + report.database_down
    if report.most_overdue > allowed:
        problems.append(
            f"a chunk stayed processing {report.most_overdue:.1f}s past its lease "
            f"(allowed: {allowed:.1f}s)"
        )


def _check_mirrored(
    conn: _Observer, *, server: FakeGraphServer, sizes: dict[str, int], report: ChaosReport
) -> None:
    """After incremental rounds the copy mirrors the mailbox: every message it
    holds stored in its folder and not marked deleted; every other row marked."""
    for email in sizes:
        held = {
            message_id: folder["id"]
            for folder in server.folders(email)
            for message_id in server.message_ids(email, folder=folder["id"])
        }
        rows = conn.execute(
            "SELECT e.provider_message_id AS id, e.folder_id, e.deleted_at IS NULL AS present"
            " FROM emails e JOIN stores s ON s.id = e.store_id WHERE s.email = %s",
            [email],
        ).fetchall()
        stored = {row["id"]: row for row in rows}
        if missing := [m for m in held if m not in stored or not stored[m]["present"]]:
            report.problems.append(
                f"{email}: {len(missing)} messages in the mailbox missing or marked deleted"
            )
        if misplaced := [m for m, f in held.items() if m in stored and stored[m]["folder_id"] != f]:
            report.problems.append(f"{email}: {len(misplaced)} messages in the wrong folder")
        if unmarked := [m for m, row in stored.items() if m not in held and row["present"]]:
            report.problems.append(
                f"{email}: {len(unmarked)} messages gone from the mailbox not marked deleted"
            )


def _check_attempts(conn: _Observer, report: ChaosReport) -> None:
    problems = report.problems
    unrecorded = conn.execute(
        "SELECT count(*) AS n FROM chunked_sync_jobs c WHERE NOT EXISTS ("
        "  SELECT 1 FROM chunk_attempts a WHERE a.chunk_id = c.id AND a.outcome = 'completed')"
    ).fetchone()
    if unrecorded and unrecorded["n"]:
        problems.append(f"{unrecorded['n']} chunks have no completed attempt recorded")
    running = conn.execute(
        "SELECT count(*) AS n FROM chunk_attempts WHERE outcome = 'running'"
    ).fetchone()
    if running and running["n"]:
        problems.append(f"{running['n']} attempts still recorded as running")
    refused = conn.execute(
        "SELECT count(*) AS n FROM chunk_attempts WHERE error LIKE '%credentials were refused%'"
    ).fetchone()
    if refused and refused["n"]:
        problems.append(f"{refused['n']} attempts lost to a token the worker should have renewed")
    # Not a problem when 0: the worker that read the page may have been killed,
    # or its connection cut, before it could say so (the attempt is then reaped).
    malformed = conn.execute(
        "SELECT count(*) AS n FROM chunk_attempts WHERE error LIKE '%not valid Graph JSON%'"
    ).fetchone()
    report.malformed_recorded = malformed["n"] if malformed else 0
