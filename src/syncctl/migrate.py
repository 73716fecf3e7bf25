"""Applies sql/migrations in order, once each, under an advisory lock."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import psycopg

from syncctl import __version__
from syncctl.db import Connection, query, sql_dir
from syncctl.errors import DatabaseUnavailable, SyncctlError

# Any fixed number works; it only has to be the same on every host.
MIGRATION_LOCK_KEY = 7_411_902_113


class MigrationFailed(SyncctlError):
    """A migration could not be applied; the database is left as it was before it."""

    # The database refused the change, as with any other refused request.
    exit_code = DatabaseUnavailable.exit_code


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
            try:
                with conn.transaction():
                    # Our own shipped file, several statements, no parameters.
                    conn.execute(text)
                    conn.execute(query("record_migration"), {"name": name})
            except psycopg.Error as exc:
                if conn.closed:
                    raise  # the database is gone, not the migration at fault
                raise MigrationFailed(
                    f"Migration {name} failed and was rolled back: "
                    f"{exc.diag.message_primary or exc}"
                ) from exc
            applied.append(name)
        return applied
    finally:
        if not conn.closed:
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


def check_schema(conn: Connection, where: str) -> None:
    """Refuse a database whose schema is not the one this syncctl was built for:
    missing migrations (run `db migrate`), or migrations this syncctl does not
    know (a newer release migrated it). DatabaseUnavailable (exit 3) naming it."""
    applied = [m.name for m in applied_migrations(conn)]
    shipped = [name for name, _ in migration_files()]
    unknown = [name for name in applied if name not in set(shipped)]
    if unknown:
        raise DatabaseUnavailable(
            f"The database at {where} has migration {unknown[-1]}, which this syncctl "
            f"({__version__}) does not know: a newer syncctl upgraded it. Install that "
            "release here before running against this database."
        )
    missing = [name for name in shipped if name not in set(applied)]
    if missing:
        raise DatabaseUnavailable(
            f"The database at {where} lacks {len(missing)} migration(s) this syncctl needs "
            f"(first: {missing[0]}); run `syncctl db migrate`."
        )


def pending_migrations(conn: Connection) -> list[str]:
    """The shipped migrations this database has not had yet, in order."""
    done = {m.name for m in applied_migrations(conn)}
    return [name for name, _ in migration_files() if name not in done]
