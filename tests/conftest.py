"""Fixtures: a real PostgreSQL for every test, a fresh database each.

The server is the one at 127.0.0.1:5432 when it answers (as on developer
machines and CI), otherwise an embedded one started with pgserver, so the
suite passes on a machine with no PostgreSQL at all. Set
SYNCCTL_TEST_EMBEDDED=1 to force the embedded one.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from pytest_postgresql.janitor import DatabaseJanitor

from syncctl.config import DatabaseTarget
from syncctl.db import Connection, connect
from syncctl.migrate import migrate


@dataclass(frozen=True)
class PgServer:
    host: str
    port: int
    user: str

    def url(self, dbname: str) -> str:
        if self.host.startswith("/"):
            return f"postgresql://{self.user}@/{dbname}?host={self.host}&port={self.port}"
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname}"


def _local_server_answers() -> bool:
    try:
        psycopg.connect(
            "host=127.0.0.1 port=5432 user=postgres dbname=postgres", connect_timeout=3
        ).close()
    except psycopg.Error:
        return False
    return True


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgServer]:
    if not os.environ.get("SYNCCTL_TEST_EMBEDDED") and _local_server_answers():
        yield PgServer("127.0.0.1", 5432, "postgres")
        return
    import pgserver

    server = pgserver.get_server(tmp_path_factory.mktemp("pg") / "data", cleanup_mode="stop")
    host = psycopg.conninfo.conninfo_to_dict(server.get_uri())["host"]
    yield PgServer(str(host), 5432, "postgres")
    server.cleanup()


_names = itertools.count()


def _fresh_name(kind: str) -> str:
    return f"syncctl_{kind}_{os.getpid()}_{next(_names)}_{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="session")
def migrated_template(pg_server: PgServer) -> Iterator[str]:
    """A database migrated once, cloned for each test that wants the schema."""
    name = _fresh_name("template")
    janitor = DatabaseJanitor(
        user=pg_server.user, host=pg_server.host, port=pg_server.port, dbname=name
    )
    janitor.init()
    with connect(DatabaseTarget(pg_server.url(name), "test")) as conn:
        migrate(conn)
    yield name
    janitor.drop()


@pytest.fixture
def empty_database_url(pg_server: PgServer) -> Iterator[str]:
    """A fresh database with nothing in it."""
    name = _fresh_name("empty")
    with DatabaseJanitor(
        user=pg_server.user, host=pg_server.host, port=pg_server.port, dbname=name
    ):
        yield pg_server.url(name)


@pytest.fixture
def database_url(pg_server: PgServer, migrated_template: str) -> Iterator[str]:
    """A fresh database with syncctl's schema."""
    name = _fresh_name("test")
    with DatabaseJanitor(
        user=pg_server.user,
        host=pg_server.host,
        port=pg_server.port,
        dbname=name,
        template_dbname=migrated_template,
    ):
        yield pg_server.url(name)


@pytest.fixture
def target(database_url: str) -> DatabaseTarget:
    return DatabaseTarget(database_url, "test")


@pytest.fixture
def conn(target: DatabaseTarget) -> Iterator[Connection]:
    connection = connect(target)
    yield connection
    connection.close()


@pytest.fixture
def make_conn(target: DatabaseTarget) -> Iterator[Any]:
    """Open extra connections (one per simulated worker); all closed afterwards."""
    opened: list[Connection] = []

    def factory() -> Connection:
        c = connect(target)
        opened.append(c)
        return c

    yield factory
    for c in opened:
        c.close()


@pytest.fixture
def db(database_url: str) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    """An autocommit connection to the test database, rows as dicts: for
    looking at what a syncctl process wrote."""
    with raw_connect(database_url) as connection:
        yield connection


def raw_connect(url: str) -> psycopg.Connection[dict[str, Any]]:
    return psycopg.connect(url, autocommit=True, row_factory=dict_row)
