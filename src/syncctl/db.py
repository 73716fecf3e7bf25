"""Connections, named SQL queries, and turning database errors into ours.

SQL lives in ``sql/queries/*.sql`` as named blocks::

    -- claim_chunk --
    -- One line saying what it does.
    SELECT ...

and is loaded once, by name: ``query("claim_chunk")``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, LiteralString

import psycopg
from psycopg.rows import dict_row

from syncctl.config import DatabaseTarget, mask_url, scrub_secrets
from syncctl.errors import DatabaseUnavailable

Connection = psycopg.Connection[dict[str, Any]]

_QUERY_HEADER = re.compile(r"^-- ([a-z_][a-z0-9_]*) --$", re.MULTILINE)

# A peer that vanishes (a host powered off, a cable pulled, a firewall that
# drops the flow) is noticed in about a minute instead of the system's two
# hours: by this side through libpq's keepalives, by the server through its
# own. A session left idle inside a transaction is ended by the server, so a
# lock it holds cannot stall the queue for longer than that.
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 30, 10, 3
IDLE_IN_TRANSACTION_TIMEOUT = "60s"


def sql_dir() -> Traversable:
    """The sql/ folder shipped inside the package; in an editable install of a
    checkout, which ships no copy, the checkout's own."""
    packaged = files("syncctl") / "sql"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "sql"


def load_queries(folder: Traversable) -> dict[str, str]:
    """Every named block of the .sql files in folder, by name."""
    found: dict[str, str] = {}
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        if not path.name.endswith(".sql"):
            continue
        parts = _QUERY_HEADER.split(path.read_text(encoding="utf-8"))
        # parts: [preamble, name1, body1, name2, body2, ...]
        for name, body in zip(parts[1::2], parts[2::2], strict=True):
            if name in found:
                raise RuntimeError(f"query {name} is defined twice in {folder}")
            found[name] = body.strip()
    return found


@cache
def _queries() -> dict[str, str]:
    return load_queries(sql_dir().joinpath("queries"))


def query(name: str) -> LiteralString:
    """The text of a named query from sql/queries."""
    # The files are ours and shipped with the package; values are always parameters.
    return _queries()[name]


def connect(target: DatabaseTarget, *, autocommit: bool = True) -> Connection:
    """Open a connection, or raise DatabaseUnavailable with the password masked.

    Connections autocommit: work that must be atomic runs inside
    ``with conn.transaction():``, so a transaction never stays open by accident.
    """
    try:
        conn = psycopg.connect(
            target.url,
            autocommit=autocommit,
            row_factory=dict_row,
            connect_timeout=10,
            application_name="syncctl",
            keepalives=1,
            keepalives_idle=KEEPALIVE_IDLE,
            keepalives_interval=KEEPALIVE_INTERVAL,
            keepalives_count=KEEPALIVE_COUNT,
        )
        # Set per session rather than as startup options, which poolers such as
        # PgBouncer refuse.
        conn.execute(
            query("session_timeouts"),
            {
                "idle": IDLE_IN_TRANSACTION_TIMEOUT,
                "keepalive_idle": str(KEEPALIVE_IDLE),
                "keepalive_interval": str(KEEPALIVE_INTERVAL),
                "keepalive_count": str(KEEPALIVE_COUNT),
            },
        )
        if not autocommit:
            conn.commit()
    except psycopg.Error as exc:
        raise DatabaseUnavailable(
            f"Could not connect to the database at {target.masked_url}: "
            f"{_first_line(scrub_secrets(str(exc), target.url))}"
        ) from None
    return conn


@contextmanager
def connection(target: DatabaseTarget, *, autocommit: bool = True) -> Iterator[Connection]:
    """A connection that is closed afterwards; a failure midway becomes DatabaseUnavailable."""
    conn = connect(target, autocommit=autocommit)
    try:
        with conn:
            yield conn
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(
            f"Lost the database at {mask_url(target.url)}: "
            f"{_first_line(scrub_secrets(str(exc), target.url))}"
        ) from None


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "no reason given"
