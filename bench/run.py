"""Run the benchmarks and print every table with its ratios and targets.

    python -m bench.run [--quick] [--only 1 3] [--markdown FILE]

Each benchmark makes its own databases on the PostgreSQL server the tests
use (127.0.0.1:5432 when it answers, else an embedded one) and drops them.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from bench import (
    claim_cost,
    graph_efficiency,
    incremental,
    ingest_throughput,
    queue_throughput,
    scale_out,
    startup,
)
from bench.common import PgServer, Section, pg_server
from bench.mail import CachedGraphServer


def machine(server: PgServer) -> list[str]:
    """What the figures were measured on."""
    memory_kib = 0
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                memory_kib = int(line.split()[1])

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return [
        f"- CPUs: {os.cpu_count()} (`nproc`), memory: {memory_kib / 1024 / 1024:.1f} GiB",
        f"- {platform.platform()}, Python {platform.python_version()}",
        f"- PostgreSQL {server.version()} ({server.host}:{server.port}), default settings",
        f"- syncctl {installed('syncctl')}, procrastinate {installed('procrastinate')}, "
        f"pgqueuer {installed('pgqueuer')}, psycopg {installed('psycopg')}, "
        f"asyncpg {installed('asyncpg')}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (under 2 minutes)")
    parser.add_argument(
        "--only", type=int, nargs="+", choices=range(1, 8), help="run only these benchmarks"
    )
    parser.add_argument("--markdown", type=Path, help="also write the report to this file")
    args = parser.parse_args(argv)
    chosen = set(args.only or range(1, 8))
    started = time.perf_counter()
    sections: list[Section] = []
    with ExitStack() as stack:
        server = stack.enter_context(
            pg_server(Path(stack.enter_context(tempfile.TemporaryDirectory())))
        )
        header = [
            f"# syncctl benchmarks{' (--quick)' if args.quick else ''}",
            "",
            f"Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC with `{_command(argv)}` on:",
            "",
            *machine(server),
            "",
        ]
        print("\n".join(header), flush=True)
        graph: CachedGraphServer | None = None
        if chosen & {3, 4, 5}:
            (large, large_size), (small, small_size) = ingest_throughput.mailboxes(quick=args.quick)
            graph = CachedGraphServer({large: large_size, small: small_size})
            stack.enter_context(graph)
        steps: list[tuple[int, Callable[[], Section]]] = [
            (1, lambda: queue_throughput.run(server, quick=args.quick)),
            (2, lambda: claim_cost.run(server, quick=args.quick)),
            (6, lambda: incremental.run(server, quick=args.quick)),
            (7, lambda: startup.run(server, quick=args.quick)),
        ]
        if graph is not None:
            mail = graph
            steps += [
                (3, lambda: ingest_throughput.run(server, mail, quick=args.quick)),
                (4, lambda: graph_efficiency.run(server, mail, quick=args.quick)),
                (5, lambda: scale_out.run(server, mail, quick=args.quick)),
            ]
        for number, step in sorted(steps, key=lambda numbered: numbered[0]):
            if number not in chosen:
                continue
            began = time.perf_counter()
            section = step()
            section.seconds = time.perf_counter() - began
            sections.append(section)
            print(section.markdown(), flush=True)
    targets = [target for section in sections for target in section.targets]
    met = sum(target.met for target in targets)
    summary = (
        f"**{met} of {len(targets)} targets met**; all benchmarks took "
        f"{time.perf_counter() - started:.0f} s."
    )
    print(summary, flush=True)
    if args.markdown:
        body = "\n".join([*header, *(s.markdown() for s in sections), summary, ""])
        args.markdown.write_text(body, encoding="utf-8")
    return 0


def _command(argv: list[str] | None) -> str:
    """The nox command that runs these benchmarks with these arguments (less --markdown)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--markdown" in args:
        at = args.index("--markdown")
        del args[at : at + 2]
    return "nox -s bench" + (" -- " + " ".join(args) if args else "")


if __name__ == "__main__":
    sys.exit(main())
