"""Benchmark 7: how long a command takes before it does anything.

`syncctl --version` and `syncctl --help` import only the command line; a
command imports what it uses when it runs. Each is timed as a whole process
(median of several runs), against a process that imports every module a
command could need (the command line, the worker, the Graph client, the
reports, psycopg, rich, tabulate): what every command paid before imports
were deferred.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

from bench.common import PgServer, Section, Target, ratio

RUNS = 15
EAGER = (
    "import syncctl.cli, syncctl.worker, syncctl.graph, syncctl.reports, syncctl.progress, "
    "syncctl.operations, syncctl.incremental, psycopg, rich.console, rich.table, tabulate"
)


def _median_seconds(argv: list[str], runs: int) -> float:
    timings = []
    for _ in range(runs):
        began = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)  # noqa: S603 - fixed arguments
        timings.append(time.perf_counter() - began)
    return statistics.median(timings)


def run(server: PgServer, *, quick: bool) -> Section:
    del server  # no database: start-up is what is measured
    runs = 5 if quick else RUNS
    python = sys.executable
    bare = _median_seconds([python, "-c", "pass"], runs)
    eager = _median_seconds([python, "-c", EAGER], runs)
    version = _median_seconds([python, "-m", "syncctl", "--version"], runs)
    help_ = _median_seconds([python, "-m", "syncctl", "--help"], runs)
    section = Section(
        7,
        "Start-up",
        f"Wall time of a whole process, median of {runs} runs: Python doing nothing, Python "
        "importing every module a command could need (what each command paid when the "
        "command line imported everything up front), and `syncctl --version` and "
        "`syncctl --help` as run now.",
    )
    section.table(
        "",
        ["process", "seconds", "× importing everything"],
        [
            ["python -c pass", f"{bare:.3f}", f"{ratio(bare, eager):.2f}"],
            ["importing everything", f"{eager:.3f}", "1.00"],
            ["syncctl --version", f"{version:.3f}", f"{ratio(version, eager):.2f}"],
            ["syncctl --help", f"{help_:.3f}", f"{ratio(help_, eager):.2f}"],
        ],
    )
    section.targets += [
        Target("--version against importing everything", ratio(version, eager), 0.5, False),
        Target("--help against importing everything", ratio(help_, eager), 0.5, False),
    ]
    return section
