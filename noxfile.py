"""Sessions: tests and lint run against the installed package, never the source tree."""

from __future__ import annotations

import logging

import nox


class _QuietAboutUv(logging.Filter):
    """nox says "uv binary not found." on every run without uv, which reads as
    an error; nothing here needs uv (the bench session uses it when present)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "uv binary not found."


logging.getLogger("nox").addFilter(_QuietAboutUv())

nox.options.sessions = ["tests", "lint"]
nox.options.default_venv_backend = "venv"


@nox.session(python=False)
def dev(session: nox.Session) -> None:
    """Nothing to run: how to get a development environment."""
    session.log("python3 -m venv .venv && .venv/bin/pip install -e '.[test,lint]'")


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite against real PostgreSQL (local server, else embedded)."""
    # A regular (not editable) install, so a file missing from the package fails here.
    session.install(".[test]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff and mypy --strict, with the settings in pyproject.toml."""
    session.install(".[test,lint]")
    session.run("ruff", "check", "src", "tests", "noxfile.py")
    session.run("ruff", "format", "--check", "src", "tests", "noxfile.py")
    session.run("mypy")


# uv, when installed, makes the environment in seconds rather than most of a minute.
@nox.session(venv_backend="uv|venv")
def bench(session: nox.Session) -> None:
    """Benchmarks: tables and ratios against peers and limits (`-- --quick`: under 2 minutes)."""
    # The peers are installed here only: they are what syncctl is measured against.
    session.install(".", "procrastinate>=3.10,<4", "pgqueuer>=1.6,<2", "asyncpg>=0.29")
    session.run("python", "-m", "bench.run", *session.posargs)


@nox.session
def soak(session: nox.Session) -> None:
    """Chaos runs back to back: `nox -s soak -- --minutes 20 --seed 1` (seeds count up)."""
    args = dict(zip(session.posargs[::2], session.posargs[1::2], strict=False))
    unknown = set(args) - {"--minutes", "--seed"}
    if unknown or len(session.posargs) % 2:
        session.error("usage: nox -s soak -- [--minutes N] [--seed S]")
    session.install(".[test]")
    session.run(
        "pytest",
        "tests/chaos/test_chaos.py::test_soak",
        "-s",
        env={
            "SYNCCTL_SOAK_MINUTES": args.get("--minutes", "20"),
            "SYNCCTL_SOAK_SEED": args.get("--seed", "1"),
        },
    )
