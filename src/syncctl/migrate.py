"""Applies sql/migrations in order, once each, under an advisory lock."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import LiteralString, cast

from syncctl.db import Connection, query, sql_dir

# Any fixed number works; it only has to be the same on every host.
MIGRATION_LOCK_KEY = 7_411_902_113


@dataclass(frozen=True)
class AppliedMigration:
    name: str
    applied_at: datetime


def migration_files() -> list[tuple[str, str]]:
    """(name, SQL) of every migration shipped with syncctl, in order."""
    folder = sql_dir().joinpath("migrations")
    names = sorted(p.name for p in folder.iterdir() if p.name.endswith(".sql"))
    return [(name, folder.joinpath(name).read_text(encoding="utf-8")) for name in names]


def migrate(conn: Connection) -> list[str]:
    """Apply the migrations this database lacks; return their names.

    Two hosts migrating at once is safe: the second waits for the lock, then
    finds nothing left to do. Each migration runs in its own transaction.
    """
    conn.autocommit = True
    conn.execute(query("lock_migrations"), {"key": MIGRATION_LOCK_KEY})
    try:
        conn.execute(query("create_schema_migrations"))
        done = {row["name"] for row in conn.execute(query("list_migrations"))}
        applied = []
        for name, text in migration_files():
            if name in done:
                continue
            with conn.transaction():
                conn.execute(cast(LiteralString, text))  # our own shipped file, several statements
                conn.execute(query("record_migration"), {"name": name})
            applied.append(name)
        return applied
    finally:
        conn.execute(query("unlock_migrations"), {"key": MIGRATION_LOCK_KEY})


def applied_migrations(conn: Connection) -> list[AppliedMigration]:
    """The migrations recorded in schema_migrations, oldest first (none if it is missing)."""
    exists = conn.execute(query("schema_migrations_exists")).fetchone()
    if not exists or not exists["present"]:
        return []
    return [
        AppliedMigration(row["name"], row["applied_at"])
        for row in conn.execute(query("list_migrations"))
    ]


def pending_migrations(conn: Connection) -> list[str]:
    done = {m.name for m in applied_migrations(conn)}
    return [name for name, _ in migration_files() if name not in done]
