"""What every benchmark shares: the PostgreSQL server, fresh databases, the
bench's named SQL, child processes, and how results and targets are printed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, LiteralString

import psycopg
from psycopg import sql
from tabulate import tabulate

from syncctl.config import DatabaseTarget
from syncctl.db import Connection, connect, load_queries
from syncctl.migrate import migrate

BENCH_DIR = Path(__file__).resolve().parent


# -- the server and its databases ------------------------------------------------


@dataclass(frozen=True)
class PgServer:
    """A PostgreSQL server the benchmarks may create and drop databases on."""

    host: str
    port: int
    user: str

    def url(self, dbname: str) -> str:
        if self.host.startswith("/"):
            return f"postgresql://{self.user}@/{dbname}?host={self.host}&port={self.port}"
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname}"

    def version(self) -> str:
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            row = conn.execute("SHOW server_version").fetchone()
        return str(row[0]) if row else "unknown"


def _local_server_answers() -> bool:
    try:
        psycopg.connect(
            "host=127.0.0.1 port=5432 user=postgres dbname=postgres", connect_timeout=3
        ).close()
    except psycopg.Error:
        return False
    return True


@contextmanager
def pg_server(workdir: Path) -> Iterator[PgServer]:
    """The server at 127.0.0.1:5432 when it answers (as the tests find it), else
    an embedded one under workdir, stopped afterwards."""
    if not os.environ.get("SYNCCTL_TEST_EMBEDDED") and _local_server_answers():
        yield PgServer("127.0.0.1", 5432, "postgres")
        return
    import pgserver

    server = pgserver.get_server(workdir / "pgdata", cleanup_mode="stop")
    host = psycopg.conninfo.conninfo_to_dict(server.get_uri())["host"]
    try:
        yield PgServer(str(host), 5432, "postgres")
    finally:
        server.cleanup()


@contextmanager
def fresh_database(server: PgServer, label: str, *, migrated: bool = True) -> Iterator[str]:
    """A database of its own for one benchmark (with syncctl's schema unless
    migrated=False), dropped afterwards; yields its URL."""
    name = f"syncctl_bench_{label}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(server.url("postgres"), autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        url = server.url(name)
        if migrated:
            with connect(DatabaseTarget(url, "bench")) as conn:
                migrate(conn)
        yield url
    finally:
        with psycopg.connect(server.url("postgres"), autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def bench_connect(url: str) -> Connection:
    """A syncctl connection (autocommit, dict rows) to a bench database."""
    return connect(DatabaseTarget(url, "bench"))


# -- the bench's own SQL ----------------------------------------------------------


@cache
def _bench_queries() -> dict[str, str]:
    return load_queries(BENCH_DIR / "sql")


def bench_query(name: str) -> LiteralString:
    """A named statement from bench/sql/*.sql (same format as sql/queries)."""
    # Our own files, shipped beside this module; values are always parameters.
    return _bench_queries()[name]


# -- child processes ----------------------------------------------------------------


def run_child(module: str, *args: str, timeout: float = 900) -> dict[str, Any]:
    """Run `python -m module args` (a measurement in a process of its own) and
    return the JSON document it prints last on stdout."""
    result = subprocess.run(  # noqa: S603 - our own modules, fixed arguments
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=BENCH_DIR.parent,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{module} {' '.join(args)} exited {result.returncode}:\n{result.stderr[-4000:]}"
        )
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    if not lines:
        raise RuntimeError(f"{module} printed nothing:\n{result.stderr[-4000:]}")
    document: dict[str, Any] = json.loads(lines[-1])
    return document


def print_child_result(document: dict[str, Any]) -> None:
    """How a child hands its result to run_child: one JSON line on stdout."""
    sys.stdout.write(json.dumps(document) + "\n")
    sys.stdout.flush()


# -- figures --------------------------------------------------------------------------


def percentile(values: Sequence[float], fraction: float) -> float:
    """The value below which `fraction` of the values fall (nearest rank)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(0, min(len(ordered) - 1, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[rank]


class Stopwatch:
    """Wall time of a block, in seconds."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __enter__(self) -> Stopwatch:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start


# -- results ------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One target of the issue: a measured ratio against its bound."""

    what: str
    measured: float
    bound: float
    at_least: bool  # True: measured >= bound passes; False: measured <= bound passes
    unit: str = "×"

    @property
    def met(self) -> bool:
        return self.measured >= self.bound if self.at_least else self.measured <= self.bound

    def row(self) -> list[str]:
        sign = "≥" if self.at_least else "≤"
        return [
            self.what,
            f"{self.measured:.2f}{self.unit}",
            f"{sign} {self.bound:g}{self.unit}",
            "PASS" if self.met else "MISS",
        ]


@dataclass
class Section:
    """One benchmark's output: tables, ratios checked against targets, notes."""

    number: int
    title: str
    setup: str
    tables: list[tuple[str, list[str], list[list[Any]]]] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    blocks: list[str] = field(default_factory=list)  # preformatted text, e.g. query plans
    seconds: float = 0.0

    def table(self, caption: str, headers: list[str], rows: list[list[Any]]) -> None:
        self.tables.append((caption, headers, rows))

    def markdown(self) -> str:
        lines = [f"## {self.number}. {self.title}", "", self.setup, ""]
        for caption, headers, rows in self.tables:
            if caption:
                lines += [f"**{caption}**", ""]
            lines += [tabulate(rows, headers, tablefmt="github", disable_numparse=True), ""]
        if self.targets:
            lines += [
                tabulate(
                    [t.row() for t in self.targets],
                    ["target", "measured", "bound", "result"],
                    tablefmt="github",
                    disable_numparse=True,
                ),
                "",
            ]
        lines += [f"- {note}" for note in self.notes]
        if self.notes:
            lines.append("")
        for block in self.blocks:
            lines += ["```", block, "```", ""]
        lines += [f"_took {self.seconds:.0f} s_", ""]
        return "\n".join(lines)


def rate(count: float, seconds: float) -> str:
    """A per-second figure as printed in the tables."""
    return f"{count / seconds:,.0f}" if seconds > 0 else "n/a"


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("inf")
