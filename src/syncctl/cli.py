"""The syncctl command line.

Each command parses its flags, calls one service function and renders the
result: data on stdout (a table, or one JSON document with --json), messages
on stderr. Every error becomes one sentence and an exit code in one place,
_exit_code_for, which the root group's invoke calls; so the installed
`syncctl` and an in-process CliRunner behave the same.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import traceback
from collections.abc import Iterator, Mapping
from contextlib import closing, contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from types import ModuleType
from typing import TYPE_CHECKING, Annotated, Any
from uuid import UUID

import typer
from typer.core import TyperGroup

from syncctl import __version__, output
from syncctl.durations import format_duration, parse_date, parse_duration
from syncctl.errors import (
    BadInput,
    CheckFailed,
    DatabaseUnavailable,
    MailSourceUnavailable,
    SyncctlError,
)
from syncctl.invocation import command_name
from syncctl.mailsource import (
    MAILBOX_CONCURRENCY,
    DeltaPage,
    DeltaSource,
    Folder,
    FolderCount,
    MailSource,
    MailSourceError,
    Page,
    Window,
)

if TYPE_CHECKING:
    from syncctl.config import DatabaseTarget
    from syncctl.db import Connection
    from syncctl.incremental import CreatedIncrementalJob, Enqueued
    from syncctl.jobs import CreatedJob
    from syncctl.verify import FolderProof, StoreProof, Verification


class _Later(ModuleType):
    """A module imported at its first use: `syncctl --help` and `--version`, and
    commands that never touch the database, do not pay for psycopg and the rest."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._module: ModuleType | None = None

    def __getattr__(self, attribute: str) -> Any:
        if attribute.startswith("__"):
            # Probes by tools walking the namespace (`__file__`, `__path__`) import nothing.
            raise AttributeError(attribute)
        if self._module is None:
            self._module = importlib.import_module(self.__name__)
        return getattr(self._module, attribute)


if TYPE_CHECKING:
    from syncctl import config, db, incremental, jobs, migrate, operations, progress, queue, reports
    from syncctl import verify as verification
else:
    config = _Later("syncctl.config")
    db = _Later("syncctl.db")
    incremental = _Later("syncctl.incremental")
    jobs = _Later("syncctl.jobs")
    migrate = _Later("syncctl.migrate")
    operations = _Later("syncctl.operations")
    progress = _Later("syncctl.progress")
    queue = _Later("syncctl.queue")
    reports = _Later("syncctl.reports")
    verification = _Later("syncctl.verify")

log = logging.getLogger(__name__)

_VERBOSE = "syncctl.verbose"
_MIN_LEASE = timedelta(seconds=5)
_RECOMMENDED_LEASE = timedelta(seconds=15)  # docs/operations.md, "Sizing leases"
_WATCH_INTERVAL = 1.0
# The URL of the database this invocation uses, so an error quoting it can be scrubbed.
_database_url: ContextVar[str | None] = ContextVar("syncctl_database_url", default=None)


class _SyncctlGroup(TyperGroup):
    """The root group: where every error of every command becomes an exit code."""

    # ctx is typed Any: the Context class of typer's bundled click is private.
    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            # Usage errors, Exit and Abort are the framework's own to report.
            if type(exc).__module__.startswith(("typer", "click")) or isinstance(
                exc, BrokenPipeError
            ):
                raise
            raise typer.Exit(_exit_code_for(exc, verbose=bool(ctx.meta.get(_VERBOSE)))) from None


def _exit_code_for(exc: Exception, *, verbose: bool) -> int:
    """Say what went wrong in one sentence on stderr; return the exit code."""
    url = _database_url.get()

    def scrub(text: str) -> str:
        return config.scrub_secrets(text, url) if url else text

    from syncctl.mailsource import MailboxNotFound

    if isinstance(exc, SyncctlError):
        _error(scrub(exc.message))
        return exc.exit_code
    if isinstance(exc, MailboxNotFound):
        # A mailbox Graph does not know is bad input (the store's address), not Graph failing.
        _error(scrub(_first_line(str(exc))))
        return BadInput.exit_code
    if isinstance(exc, MailSourceError):
        _error(f"The mail service failed: {scrub(_first_line(str(exc)))}")
        return MailSourceUnavailable.exit_code
    # A database error can only come from a command that loaded psycopg.
    psycopg = sys.modules.get("psycopg")
    if psycopg is not None and isinstance(
        exc, psycopg.errors.UndefinedTable | psycopg.errors.UndefinedFunction
    ):
        _error(
            f"The database has no syncctl schema ({scrub(_first_line(str(exc)))}); "
            "run `syncctl db migrate` first."
        )
        return DatabaseUnavailable.exit_code
    if psycopg is not None and isinstance(exc, psycopg.Error):
        _error(f"The database refused the request: {scrub(_first_line(str(exc)))}")
        return DatabaseUnavailable.exit_code
    if verbose:
        sys.stderr.write(scrub("".join(traceback.format_exception(exc))))
    _error(
        f"internal error: {type(exc).__name__}: {scrub(_first_line(str(exc)))}"
        + ("" if verbose else " (run with -v for the traceback)")
    )
    return 1


def _count(number: int, noun: str) -> str:
    """ "1 chunk", "3 chunks"."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _error(text: str) -> None:
    # One line whatever the message holds: database drivers end theirs with newlines.
    output.message("syncctl: " + " ".join(text.split()))


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "no reason given"


app = typer.Typer(
    name="syncctl",
    cls=_SyncctlGroup,
    help="Run and repair chunked mailbox synchronisation.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    # Plain help: flags listed without a type, and no rich to import for it.
    rich_markup_mode=None,
)
db_app = typer.Typer(
    help="The database: apply migrations, show which one is in use.", rich_markup_mode=None
)
store_app = typer.Typer(help="The mailboxes syncctl syncs.", rich_markup_mode=None)
dev_app = typer.Typer(help="Tools for development, tests and load runs.", rich_markup_mode=None)
app.add_typer(db_app, name="db")
app.add_typer(store_app, name="store")
app.add_typer(dev_app, name="dev")


class LogFormat(StrEnum):
    text = "text"
    json = "json"


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"syncctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    verbose: Annotated[
        bool, typer.Option("-v", "--verbose", help="Debug logging; tracebacks for internal errors.")
    ] = False,
    log_format: Annotated[
        LogFormat, typer.Option("--log-format", help="Log lines on stderr as text or JSON.")
    ] = LogFormat.text,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_show_version, is_eager=True, help="Show the version and exit."
        ),
    ] = False,
) -> None:
    """Run and repair chunked mailbox synchronisation."""
    ctx.meta[_VERBOSE] = verbose
    _database_url.set(None)
    _configure_logging(verbose=verbose, log_format=log_format)


class _StderrHandler(logging.Handler):
    """Writes to sys.stderr as it is when a record arrives (tests replace it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


# What the worker attaches (logging's `extra`) to every line about a chunk.
_CHUNK_LOG_KEYS = ("job_id", "chunk_index", "total_chunks", "store", "worker_id")


class _JsonLogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        # Keys of their own, so log shippers can filter by job, chunk, store or worker.
        line.update({key: getattr(record, key) for key in _CHUNK_LOG_KEYS if hasattr(record, key)})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def _configure_logging(*, verbose: bool, log_format: LogFormat) -> None:
    from syncctl.worker import ChunkContextFilter

    handler = _StderrHandler()
    handler.addFilter(ChunkContextFilter())
    handler.setFormatter(
        _JsonLogFormatter()
        if log_format is LogFormat.json
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    # Replace only our own handler: one per process, whatever else is attached.
    for previous in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(previous)
    root.addHandler(handler)
    logging.getLogger("syncctl").setLevel(logging.DEBUG if verbose else logging.INFO)


# Options shared by many commands.
DatabaseUrl = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        help="PostgreSQL URL. Default: SYNCCTL_DATABASE_URL, then DATABASE_URL, "
        "else an embedded database under SYNCCTL_HOME.",
        show_default=False,
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON document instead of tables.")]
JobArgument = Annotated[
    str,
    typer.Argument(help="The job's id, or a unique prefix of it (see `syncctl status`)."),
]


def _target(database_url: str | None) -> DatabaseTarget:
    target = config.resolve_database(database_url)
    _database_url.set(target.url)
    log.debug("database %s (from %s)", target.masked_url, target.source)
    return target


@contextmanager
def _connect(database_url: str | None, *, check: bool = True) -> Iterator[Connection]:
    """A connection to the database; with check, refused (exit 3) unless its schema
    is exactly the one this syncctl ships."""
    target = _target(database_url)
    with db.connection(target) as conn:
        if check:
            migrate.check_schema(conn, target.masked_url)
        yield conn


def _mail_source(target: DatabaseTarget, *, worker: bool = False) -> MailSource:
    """The mail service for counting and syncing (Microsoft Graph). worker: for
    `run`, which waits out refused connections instead of failing at once."""
    # Imported here so only commands that talk to Graph load the client.
    from syncctl.graph import open_mail_source

    return open_mail_source(target, worker=worker)


def _close(source: MailSource) -> None:
    # The protocol has no close(); the Graph client has one (its HTTP connections).
    close = getattr(source, "close", None)
    if callable(close):
        close()


class _MailSourceOnDemand:
    """Opens the mail source at first use, so bad input is refused before credentials are needed."""

    def __init__(self, target: DatabaseTarget) -> None:
        self._target = target
        self._source: MailSource | None = None

    def _opened(self) -> MailSource:
        if self._source is None:
            self._source = _mail_source(self._target)
        return self._source

    def close(self) -> None:
        if self._source is not None:
            _close(self._source)

    def count(self, mailbox: str, window: Window) -> int:
        return self._opened().count(mailbox, window)

    def interrupt(self) -> None:
        if self._source is not None:
            self._source.interrupt()

    def received_at(self, mailbox: str, window: Window, position: int) -> datetime | None:
        return self._opened().received_at(mailbox, window, position)

    def fetch_page(
        self,
        mailbox: str,
        window: Window,
        *,
        skip: int,
        top: int,
        next_link: str | None = None,
    ) -> Page:
        return self._opened().fetch_page(mailbox, window, skip=skip, top=top, next_link=next_link)

    def _delta(self) -> DeltaSource:
        source = self._opened()
        if not isinstance(source, DeltaSource):
            raise BadInput("This mail source has no folders or delta queries.")
        return source

    def folders(self, mailbox: str) -> list[Folder]:
        return self._delta().folders(mailbox)

    def folder_total(self, mailbox: str, folder_id: str) -> int:
        return self._delta().folder_total(mailbox, folder_id)

    def folder_count(self, mailbox: str, folder_id: str, window: Window) -> int:
        source = self._opened()
        if not isinstance(source, FolderCount):
            raise BadInput("This mail source cannot count a folder's messages.")
        return source.folder_count(mailbox, folder_id, window)

    def delta_page(self, mailbox: str, folder_id: str, link: str | None) -> DeltaPage:
        return self._delta().delta_page(mailbox, folder_id, link)


def _job_id(text: str) -> UUID | str:
    """A job id or a unique prefix of one, as typed (checked before connecting);
    _resolved_job finds the job."""
    return operations.job_reference(text)


def _resolved_job(conn: Connection, reference: UUID | str) -> UUID:
    """The job a _job_id names: a prefix must match exactly one (else bad input that
    lists the candidates)."""
    return operations.resolve_job(conn, reference)


def _confirm(question: str, *, flag_hint: str) -> bool:
    """Ask before changing anything; with nobody to answer, refuse (nothing changed)."""
    refusal = BadInput(f"Nothing changed: no answer to {question!r}; {flag_hint}.")
    if sys.stdin is None or sys.stdin.closed:
        raise refusal
    try:
        return typer.confirm(question, default=False, err=True)
    except typer.Abort:
        raise refusal from None


# db


@db_app.command("migrate")
def db_migrate(database_url: DatabaseUrl = None, as_json: AsJson = False) -> None:
    """Create or upgrade syncctl's tables and functions (safe to run on every deploy)."""
    with _connect(database_url, check=False) as conn:
        applied = migrate.migrate(conn)
    if as_json:
        output.emit_json({"applied": applied})
    elif applied:
        for name in applied:
            typer.echo(name)
        output.message(f"Applied {len(applied)} migration(s).")
    else:
        output.message("The database is up to date.")


@db_app.command("status")
def db_status(database_url: DatabaseUrl = None, as_json: AsJson = False) -> None:
    """Show which database is in use (password masked) and its migrations."""
    target = _target(database_url)
    with db.connection(target) as conn:
        status = reports.database_status(conn, target)
    if as_json:
        output.emit_json(status)
        return
    output.details(
        {
            "database": status.database,
            "url": status.url,
            "chosen by": status.source,
            "user": status.user,
            "server": f"PostgreSQL {status.server_version}",
            "pending": ", ".join(status.pending) or "none (up to date)",
        }
    )
    if not status.applied:
        output.message("No migration applied yet; `syncctl db migrate` applies them.")
        return
    output.table(
        [{"name": m.name, "applied_at": m.applied_at} for m in status.applied],
        {"name": "migration", "applied_at": "applied"},
    )


@db_app.command("stop")
def db_stop(as_json: AsJson = False) -> None:
    """Stop the embedded PostgreSQL (under SYNCCTL_HOME); the next command that needs it
    starts it again."""
    from syncctl.config import syncctl_home
    from syncctl.embedded import stop_embedded

    home = syncctl_home()
    pid = stop_embedded(home)
    if as_json:
        output.emit_json({"home": str(home), "was_running": pid is not None, "pid": pid})
    elif pid is None:
        output.message(f"The embedded PostgreSQL under {home} is not running; nothing to stop.")
    else:
        output.message(
            f"Stopped the embedded PostgreSQL under {home} (pid {pid}). The next command "
            "that needs it starts it again."
        )
    configured = [name for name in ("SYNCCTL_DATABASE_URL", "DATABASE_URL") if os.environ.get(name)]
    if configured:
        output.message(
            f"{configured[0]} is set, so other commands here use that database, which "
            "`syncctl db stop` never touches."
        )


# store


@store_app.command("add")
def store_add(
    *,
    name: Annotated[str, typer.Option("--name", help="A name for people to read.")],
    email: Annotated[
        str, typer.Option("--email", help="The mailbox: its Graph user id or address.")
    ],
    business: Annotated[
        str | None, typer.Option("--business", help="The business id (a UUID) it belongs to.")
    ] = None,
    no_check: Annotated[
        bool,
        typer.Option(
            "--no-check",
            help="Register it without asking Graph whether the mailbox exists (offline, or "
            "before Graph access is configured). Default: ask, and refuse an unknown mailbox.",
        ),
    ] = False,
    database_url: DatabaseUrl = None,
    as_json: AsJson = False,
) -> None:
    """Register a mailbox to sync, once Graph says it exists (one request)."""
    from syncctl.mailsource import MailboxCheck

    business_id = None
    if business is not None:
        try:
            business_id = UUID(business.strip())
        except ValueError:
            raise BadInput(f"--business takes a UUID, not {business!r}.") from None
    target = _target(database_url)
    opened: list[MailSource] = []

    def ask_graph(mailbox: str) -> None:
        # Opened only once the input is valid: bad input needs no credentials.
        try:
            source = _mail_source(target)
        except BadInput as exc:
            raise BadInput(
                f"{exc.message.rstrip('.')}; or pass --no-check to register {mailbox} "
                "without asking Graph whether it exists."
            ) from None
        opened.append(source)
        if not isinstance(source, MailboxCheck):
            raise BadInput("This mail source cannot look a mailbox up; pass --no-check.")
        source.check_mailbox(mailbox)

    with db.connection(target) as conn:
        migrate.check_schema(conn, target.masked_url)
        try:
            store = jobs.add_store(
                conn,
                name=name,
                email=email,
                business_id=business_id,
                check_mailbox=None if no_check else ask_graph,
            )
        finally:
            for source in opened:
                _close(source)
    if as_json:
        output.emit_json(store)
    else:
        output.details(store)


Limit = Annotated[
    int | None,
    typer.Option(
        "--limit",
        help=f"Show at most this many, newest first (default {output.DEFAULT_LIMIT}).",
        show_default=False,
    ),
]


def _limit(limit: int | None) -> int:
    if limit is None:
        return output.DEFAULT_LIMIT
    if limit < 1:
        raise BadInput(f"--limit must be at least 1, not {limit}.")
    return limit


def _showing(shown: int, total: int) -> None:
    if shown < total:
        output.message(f"showing {shown} of {total}; --limit to see more")


@store_app.command("list")
def store_list(
    search: Annotated[
        str | None,
        typer.Option("--search", help="Only stores whose email or name holds this (any case)."),
    ] = None,
    since: Annotated[
        str | None, typer.Option("--since", help="Only stores added within this, e.g. 7d.")
    ] = None,
    limit: Limit = None,
    database_url: DatabaseUrl = None,
    as_json: AsJson = False,
) -> None:
    """List the registered mailboxes, newest first, and their active job."""
    search = search or None
    added_within = parse_duration(since, option="--since") if since is not None else None
    shown = _limit(limit)
    with _connect(database_url) as conn:
        page = reports.stores(conn, search=search, since=added_within, limit=shown)
    if as_json:
        output.emit_json({"stores": page.rows, "total": page.total, "limit": page.limit})
        return
    if not page.rows:
        if search is None and since is None:
            output.message("No stores yet; add one with `syncctl store add`.")
        else:
            given = {"--search": search, "--since": since}
            output.message(
                "No store matches "
                + " and ".join(f"{flag} {value!r}" for flag, value in given.items() if value)
                + "."
            )
        return
    output.table(
        page.rows,
        {
            "id": "id",
            "name": "name",
            "email": "email",
            "business_id": "business",
            "active_job_id": "active job",
        },
    )
    _showing(len(page.rows), page.total)


# jobs


@app.command()
def create(
    *,
    store: Annotated[
        str | None,
        typer.Argument(help="The store's id or email (or --all).", show_default=False),
    ] = None,
    every_store: Annotated[
        bool,
        typer.Option("--all", help="A job for every idle store that is due (for cron)."),
    ] = False,
    older_than: Annotated[
        str | None,
        typer.Option(
            "--older-than",
            help="With --all: only stores with no job of this type completed within this "
            "long (e.g. 15m).",
            show_default=False,
        ),
    ] = None,
    received_from: Annotated[
        str | None,
        typer.Option("--from", help="Sync mail received from this date (ISO 8601; naive is UTC)."),
    ] = None,
    received_to: Annotated[
        str | None,
        typer.Option("--to", help="Sync mail received before this date. Default: now."),
    ] = None,
    chunk_size: Annotated[
        int | None,
        typer.Option("--chunk-size", help="Messages per chunk. Default: adapts to the mailbox."),
    ] = None,
    parallel: Annotated[
        int,
        typer.Option(
            "--parallel",
            help="Chunks of this job that may run at once, 1 to 4 (1: one after another).",
        ),
    ] = MAILBOX_CONCURRENCY,
    sync_type: Annotated[
        str,
        typer.Option(
            "--type",
            help="incremental: a delta round per mail folder (keeps a synced store current); "
            "any other word labels a full job.",
        ),
    ] = "manual",
    priority: Annotated[int, typer.Option("--priority", help="Higher runs first across jobs.")] = 1,
    max_attempts: Annotated[
        int, typer.Option("--max-attempts", help="Tries per chunk before it fails.")
    ] = 3,
    force: Annotated[
        bool, typer.Option("--force", help="Cancel the store's active job and replace it.")
    ] = False,
    database_url: DatabaseUrl = None,
    as_json: AsJson = False,
) -> None:
    """Count a mailbox and create a sync job with its chunk plan; or, with --type
    incremental, a job of one delta round per mail folder."""
    # An empty value ("--from $UNSET") is refused, not read as no --from (the whole mailbox).
    window_from = None if received_from is None else parse_date(received_from, option="--from")
    window_to = None if received_to is None else parse_date(received_to, option="--to")
    sync_type = sync_type.strip()
    if not sync_type:
        raise BadInput("--type is empty; leave it out for a manual sync.")
    is_incremental = sync_type == incremental.INCREMENTAL
    if is_incremental:
        for option, given in (
            ("--from", received_from),
            ("--to", received_to),
            ("--chunk-size", chunk_size),
        ):
            if given is not None:
                raise BadInput(
                    f"{option} is for full jobs; an incremental job reads what changed in "
                    "each folder. Leave it out, or drop --type incremental."
                )
    if every_store == (store is not None):
        raise BadInput("Name one store, or pass --all (not both).")
    if older_than is not None and not every_store:
        raise BadInput("--older-than goes with --all; leave it out when naming a store.")
    due_within = parse_duration(older_than, option="--older-than") if older_than else None
    options: dict[str, Any] = {
        "priority": priority,
        "max_attempts": max_attempts,
        "parallel": parallel,
        "force": force,
    }
    target = _target(database_url)
    with db.connection(target) as conn, closing(_MailSourceOnDemand(target)) as source:
        migrate.check_schema(conn, target.masked_url)
        if every_store:
            enqueued = _create_for_due_stores(
                conn,
                source,
                sync_type=sync_type,
                older_than=due_within or timedelta(0),
                window=(window_from, window_to, chunk_size),
                options=options,
            )
        elif is_incremental:
            assert store is not None
            created_incremental = incremental.create_incremental_job(
                conn, source, store_ref=store, **options
            )
        else:
            assert store is not None
            created = jobs.create_job(
                conn,
                source,
                store_ref=store,
                received_from=window_from,
                received_to=window_to,
                chunk_size=chunk_size,
                sync_type=sync_type,
                **options,
            )
    if every_store:
        _show_enqueued(enqueued, sync_type=sync_type, older_than=older_than, as_json=as_json)
    elif is_incremental:
        _show_incremental_job(created_incremental, as_json=as_json)
    else:
        _show_full_job(created, as_json=as_json)


def _create_for_due_stores(
    conn: Connection,
    source: _MailSourceOnDemand,
    *,
    sync_type: str,
    older_than: timedelta,
    window: tuple[datetime | None, datetime | None, int | None],
    options: dict[str, Any],
) -> list[Enqueued]:
    received_from, received_to, chunk_size = window

    def create_one(store_id: str) -> tuple[UUID, int]:
        if sync_type == incremental.INCREMENTAL:
            made = incremental.create_incremental_job(conn, source, store_ref=store_id, **options)
            return made.job_id, len(made.chunks)
        full = jobs.create_job(
            conn,
            source,
            store_ref=store_id,
            received_from=received_from,
            received_to=received_to,
            chunk_size=chunk_size,
            sync_type=sync_type,
            **options,
        )
        return full.job_id, len(full.chunks)

    stores = incremental.due_stores(conn, sync_type=sync_type, older_than=older_than)
    return incremental.enqueue_due(conn, stores, create_one)


def _show_enqueued(
    enqueued: list[Enqueued], *, sync_type: str, older_than: str | None, as_json: bool
) -> None:
    failed = [e for e in enqueued if e.error]
    if as_json:
        output.emit_json(
            {
                "sync_type": sync_type,
                "older_than": older_than,
                "enqueued": [
                    {"store": e.store, "job_id": e.job_id, "chunks": e.chunks}
                    for e in enqueued
                    if e.job_id
                ],
                "failed": [{"store": e.store, "error": e.error} for e in failed],
            }
        )
    elif not enqueued:
        due = f" (each has a job running or a {sync_type} job completed within {older_than})"
        output.message(f"No store is due{due if older_than else ''}; nothing enqueued.")
    else:
        output.table(
            [
                {
                    "store": e.store.email,
                    "job": e.job_id or "-",
                    "chunks": e.chunks if e.job_id else "-",
                    "problem": e.error or "",
                }
                for e in enqueued
            ],
            {"store": "store", "job": "job", "chunks": "chunks", "problem": "problem"},
        )
        output.message(
            f"Enqueued {len(enqueued) - len(failed)} {sync_type} job(s)"
            + (f"; {len(failed)} store(s) could not be enqueued." if failed else ".")
        )
    if failed:
        raise typer.Exit(1)


def _show_incremental_job(created: CreatedIncrementalJob, *, as_json: bool) -> None:
    if created.cancelled_job_id:
        output.message(f"Cancelled job {created.cancelled_job_id}, replaced by this one.")
    if as_json:
        output.emit_json(
            {
                "job_id": created.job_id,
                "type": incremental.INCREMENTAL,
                "store": created.store,
                "parallel": created.parallel,
                "chunks": created.chunks,
                "folders_gone": created.folders_gone,
                "rows_marked_deleted": created.rows_marked_deleted,
                "cancelled_job_id": created.cancelled_job_id,
            }
        )
        return
    full = sum(c.round == "full" for c in created.chunks)
    output.details(
        {
            "job": created.job_id,
            "type": incremental.INCREMENTAL,
            "store": f"{created.store.email} ({created.store.id})",
            "folders": len(created.chunks),
            "full rounds": f"{full} (folders with no delta state yet)" if full else 0,
            "at once": created.parallel,
        }
    )
    if created.folders_gone or created.rows_marked_deleted:
        output.message(
            f"{created.folders_gone} folder(s) are gone from the mailbox; "
            f"{created.rows_marked_deleted} of their messages were marked deleted."
        )
    output.table(
        [vars(chunk) for chunk in created.chunks],
        {"chunk_index": "chunk", "folder": "folder", "messages": "messages", "round": "round"},
    )


def _show_full_job(created: CreatedJob, *, as_json: bool) -> None:
    if created.cancelled_job_id:
        output.message(f"Cancelled job {created.cancelled_job_id}, replaced by this one.")
    if as_json:
        output.emit_json(
            {
                "job_id": created.job_id,
                "store": created.store,
                "window": {
                    "from": created.window.received_from,
                    "to": created.window.received_to,
                },
                "estimated_emails": created.estimated_emails,
                "chunk_size": created.chunk_size,
                "parallel": created.parallel,
                "chunks": created.chunks,
                "cancelled_job_id": created.cancelled_job_id,
            }
        )
        return
    output.details(
        {
            "job": created.job_id,
            "store": f"{created.store.email} ({created.store.id})",
            "from": created.window.received_from or "the first message",
            "to": created.window.received_to,
            "messages": created.estimated_emails,
            "chunk size": created.chunk_size,
            "chunks": len(created.chunks),
            "at once": created.parallel,
        }
    )
    output.table(
        [_with_window(vars(chunk)) for chunk in created.chunks],
        {
            "chunk_index": "chunk",
            "received_from": "received from",
            "received_to": "received before",
            "estimated_emails": "messages",
        },
    )


def _with_window(chunk: Mapping[str, Any]) -> dict[str, Any]:
    """A chunk row with its window as shown: the first chunk of an open window
    starts at the first message."""
    return {
        **chunk,
        "received_from": chunk["window_start"] or "the first message",
        "received_to": chunk["window_end"],
    }


def run(
    *,
    concurrency: Annotated[
        int, typer.Option("--concurrency", help="Chunks this process works on at once.")
    ] = 1,
    drain: Annotated[
        bool, typer.Option("--drain", help="Exit (0) when nothing is left to claim.")
    ] = False,
    lease: Annotated[
        str, typer.Option("--lease", help="How long a claim lasts without a heartbeat.")
    ] = "60s",
    worker_id: Annotated[
        str | None,
        typer.Option(
            "--worker-id", help="Name this worker. Default: host, pid and a random suffix."
        ),
    ] = None,
    poll_only: Annotated[
        bool, typer.Option("--poll-only", help="Poll for work instead of LISTEN/NOTIFY.")
    ] = False,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port",
            help="Serve Prometheus metrics at http://0.0.0.0:PORT/metrics (every interface).",
            show_default=False,
        ),
    ] = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Run a worker: claim chunks and sync them into the emails table."""
    if concurrency < 1:
        raise BadInput(f"--concurrency must be at least 1, not {concurrency}.")
    if metrics_port is not None and not 1 <= metrics_port <= 65535:
        raise BadInput(f"--metrics-port must be from 1 to 65535, not {metrics_port}.")
    lease_for = parse_duration(lease, option="--lease")
    if lease_for < _MIN_LEASE:
        raise BadInput(
            f"--lease must be at least {format_duration(_MIN_LEASE)}, not {lease}: "
            "shorter leases expire between heartbeats."
        )
    if lease_for < _RECOMMENDED_LEASE:
        log.warning(
            "--lease %s is below the %s docs/operations.md recommends: a database that "
            "stalls for a third of it costs this worker its chunks",
            lease,
            format_duration(_RECOMMENDED_LEASE),
        )
    if worker_id is not None and not worker_id.strip():
        raise BadInput("--worker-id is empty; leave it out for one made of the host name and pid.")
    target = _target(database_url)
    with db.connection(target) as conn:
        # A worker of another release would break the rules this schema's functions keep.
        migrate.check_schema(conn, target.masked_url)
    source = _mail_source(target, worker=True)
    # Imported here: the worker loads only for `run`.
    from syncctl.worker import WorkerOptions, run_worker, tune_garbage_collector

    tune_garbage_collector()
    options = WorkerOptions(
        concurrency=concurrency,
        lease=lease_for,
        worker_id=worker_id.strip() if worker_id else None,
        drain=drain,
        poll_only=poll_only,
        metrics_port=metrics_port,
    )
    try:
        code = run_worker(target, source, options)
    finally:
        _close(source)
    if code:
        raise typer.Exit(code)


app.command("run")(run)
app.command("run-worker", help="Same as `run` (the name the original system used).")(run)


@app.command()
def reap(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would be reaped; change nothing.")
    ] = False,
    database_url: DatabaseUrl = None,
    as_json: AsJson = False,
) -> None:
    """Expire lost leases: their chunks go back to pending, or fail with no attempts left."""
    with _connect(database_url) as conn:
        reaped = queue.reap(conn, dry_run=dry_run)
    if as_json:
        output.emit_json({"dry_run": dry_run, "chunks": reaped})
        return
    if not reaped:
        output.message("No lease has expired.")
        return
    _reaped_table(reaped)
    verb = "Would reap" if dry_run else "Reaped"
    output.message(f"{verb} {_count(len(reaped), 'chunk')}.")


def _reaped_table(reaped: list[queue.ReapedChunk], *, err: bool = False) -> None:
    output.table(
        [vars(chunk) for chunk in reaped],
        {
            "job_id": "job",
            "chunk_index": "chunk",
            "worker_id": "worker",
            "started_at": "started",
            "lease_expires_at": "lease until",
            "new_status": "becomes",
        },
        err=err,
    )


@app.command()
def status(
    *,
    job: Annotated[
        str | None,
        typer.Argument(
            help="A job's id (or its first hex digits), for its chunks and their attempts."
        ),
    ] = None,
    watch: Annotated[
        bool, typer.Option("--watch", help="Show live progress bars until the jobs finish.")
    ] = False,
    state: Annotated[
        list[str] | None,
        typer.Option(
            "--state",
            help="Only jobs in this state: pending, processing, completed, failed or "
            "cancelled (repeat it, or give a comma list).",
            show_default=False,
            metavar="STATE",
        ),
    ] = None,
    store: Annotated[
        str | None, typer.Option("--store", help="Only the jobs of this store (id or email).")
    ] = None,
    since: Annotated[
        str | None, typer.Option("--since", help="Only jobs created within this, e.g. 24h.")
    ] = None,
    limit: Limit = None,
    database_url: DatabaseUrl = None,
    as_json: AsJson = False,
) -> None:
    """Show how many jobs are in each state, the ones that need attention and the newest
    jobs; or one job with its chunks and their attempts."""
    reference = _job_id(job) if job is not None else None
    if watch and as_json:
        raise BadInput("--watch draws progress bars; leave it out to get --json.")
    listing = {"--state": state, "--store": store, "--since": since, "--limit": limit}
    given = [flag for flag, value in listing.items() if value is not None]
    if given and (watch or reference is not None):
        raise BadInput(
            f"{given[0]} narrows the list of jobs; leave it out with "
            f"{'--watch' if watch else 'a job id'}."
        )
    states = _states(state or [])
    created_within = parse_duration(since, option="--since") if since is not None else None
    shown = _limit(limit)
    with _connect(database_url) as conn:
        job_id = _resolved_job(conn, reference) if reference is not None else None
        if watch:
            progress.watch(conn, job_id=job_id, interval=_WATCH_INTERVAL)
        elif job_id is None:
            of_store = jobs.find_store(conn, store) if store is not None else None
            selection = reports.JobFilter(states, of_store.id if of_store else None, created_within)
            _show_jobs(
                reports.job_overview(conn, selection, limit=shown),
                reports.stores_kept_current(conn, store_id=selection.store_id, limit=shown),
                scope=_job_scope(of_store.email if of_store else None, since),
                as_json=as_json,
            )
        else:
            _show_job(reports.job_report(conn, job_id), as_json=as_json)


def _states(given: list[str]) -> tuple[str, ...]:
    """--state values, each one state or a comma list, checked; in the order given."""
    states: list[str] = []
    for part in (p.strip().lower() for text in given for p in text.split(",")):
        if part not in reports.JOB_STATES:
            raise BadInput(
                f"--state takes {', '.join(reports.JOB_STATES)} (or a comma list), not {part!r}."
            )
        if part not in states:
            states.append(part)
    return tuple(states)


def _job_scope(store_email: str | None, since: str | None) -> str:
    """How the summary line names the jobs it counts: "", " of a@x created within 1h"."""
    return (f" of {store_email}" if store_email else "") + (
        f" created within {since.strip()}" if since else ""
    )


# What a narrow terminal goes without first (job, store, status and created stay).
_JOB_COLUMNS_LEFT_OUT_FIRST = (
    "synced_through",
    "chunks_failed",
    "sync_type",
    "messages",
    "last_error",
    "chunks",
)
_ATTENTION_COLUMNS = {
    "job_id": "job",
    "store_email": "store",
    "status": "status",
    "stuck_chunks": "stuck chunks",
    "created_at": "created",
    "last_error": "last error",
}


def _show_jobs(
    overview: reports.JobOverview,
    currency: reports.Page,
    *,
    scope: str = "",
    as_json: bool,
) -> None:
    in_scope = sum(overview.by_state.values())
    if as_json:
        output.emit_json(
            {
                "jobs": overview.jobs,
                "stores_kept_current": currency.rows,
                "summary": {
                    "by_state": overview.by_state,
                    "total": in_scope,
                    "needs_attention": overview.attention,
                    "needs_attention_total": overview.attention_total,
                    "jobs_with_stuck_chunks": overview.stuck_jobs,
                },
                "total": overview.total,
                "limit": overview.limit,
                "stores_kept_current_total": currency.total,
            }
        )
        return
    if not in_scope and not scope:
        output.message("No jobs yet; create one with `syncctl create`.")
    else:
        _show_job_summary(overview, scope=scope, in_scope=in_scope)
    if overview.jobs:
        typer.echo()
        failed = any(row["status"] == "failed" for row in overview.jobs)
        output.table(
            [
                {
                    **row,
                    "chunks": f"{row['chunks_done']}/{row['total_chunks']}",
                    "messages": f"{row['emails_synced']}/{row['estimated_emails'] or 0}",
                }
                for row in overview.jobs
            ],
            {
                "job_id": "job",
                "store_email": "store",
                "sync_type": "type",
                "status": "status",
                "chunks": "chunks done",
                "chunks_failed": "failed",
                "messages": "messages",
                "synced_through": "synced through",
                "created_at": "created",
                **({"last_error": "last error"} if failed else {}),
            },
            title="Jobs, newest first",
            optional=_JOB_COLUMNS_LEFT_OUT_FIRST,
        )
        _showing(len(overview.jobs), overview.total)
    elif in_scope:
        output.message("No job matches --state.")
    if currency.rows:
        typer.echo()
        output.table(
            [
                {
                    **store,
                    "behind": format_duration(store["behind"]) if store["behind"] else "",
                }
                for store in currency.rows
            ],
            {
                "email": "store",
                "folders": "folders",
                "folders_never_synced": "never synced",
                "oldest_round_at": "oldest folder round",
                "behind": "behind",
                "newest_round_at": "newest folder round",
            },
            title="Stores kept current (incremental rounds), furthest behind first",
        )
        _showing(len(currency.rows), currency.total)


def _show_job_summary(overview: reports.JobOverview, *, scope: str, in_scope: int) -> None:
    """The jobs by state, then the ones that need attention (on stdout: they are data)."""
    counts = ", ".join(f"{n} {state}" for state, n in overview.by_state.items())
    output.line(f"Jobs{scope}: {counts} ({in_scope} in all).")
    if not overview.attention:
        output.line("Nothing needs attention: no job failed, no chunk is stuck.")
        return
    typer.echo()
    output.table(
        overview.attention,
        _ATTENTION_COLUMNS,
        optional=("created_at", "stuck_chunks"),
        title=(
            f"Needs attention: {overview.attention_total - overview.stuck_jobs} failed, "
            f"{overview.stuck_jobs} with stuck chunks"
        ),
    )
    if len(overview.attention) < overview.attention_total:
        output.message(
            f"showing {len(overview.attention)} of {overview.attention_total} that need "
            "attention; `syncctl status --state failed` lists the failed jobs"
        )


def _show_job(report: reports.JobReport, *, as_json: bool) -> None:
    if as_json:
        output.emit_json({"job": report.job, "chunks": report.chunks})
        return
    # No sync_from: the window starts at the mailbox's first message, as `create` says.
    output.details({**report.job, "sync_from": report.job["sync_from"] or "the first message"})
    typer.echo()
    # Incremental jobs have a chunk per folder; jobs created before time
    # windows have offset chunks.
    by_folder = any(chunk["folder_id"] for chunk in report.chunks)
    by_window = any(chunk["window_end"] for chunk in report.chunks)
    if by_folder:
        where = {"folder_name": "folder", "round": "round", "last_round_at": "folder's last round"}
    elif by_window:
        where = {"received_from": "received from", "received_to": "received before"}
    else:
        where = {"start_offset": "from offset", "end_offset": "to offset"}
    output.table(
        [
            {
                **(_with_window(chunk) if by_window else chunk),
                "tries": f"{chunk['attempts']}/{chunk['max_attempts']}",
                "messages": f"{chunk['emails_synced']}/{chunk['estimated_emails']}",
            }
            for chunk in report.chunks
        ],
        {
            "chunk_index": "chunk",
            "status": "status",
            **where,
            "messages": "messages",
            "tries": "attempts",
            "worker_id": "worker",
            "last_error": "last error",
        },
        title="Chunks",
    )
    for chunk in report.chunks:
        if chunk["full_round_reason"]:
            output.message(
                f"Chunk {chunk['chunk_index']} ({chunk['folder_name']}) ran a full round: "
                f"{chunk['full_round_reason']}"
            )
    attempts = [attempt for chunk in report.chunks for attempt in chunk["history"]]
    if attempts:
        typer.echo()
        output.table(
            [{**attempt, "duration": _seconds(attempt["duration_ms"])} for attempt in attempts],
            {
                "chunk_index": "chunk",
                "attempt": "attempt",
                "worker_id": "worker",
                "started_at": "started",
                "finished_at": "finished",
                "outcome": "outcome",
                "duration": "duration",
                "error": "error",
            },
            title="Attempts",
        )


def _seconds(milliseconds: int | None) -> str:
    return "" if milliseconds is None else f"{milliseconds / 1000:.1f}s"


# runbook: stuck chunks


OlderThanStuck = Annotated[
    str, typer.Option("--older-than", help="Processing for longer than this is stuck.")
]


@app.command("list-stuck")
def list_stuck(
    older_than: OlderThanStuck = "5m",
    check: Annotated[
        bool, typer.Option("--check", help="Exit 1 when a chunk is stuck (for monitoring).")
    ] = False,
    database_url: DatabaseUrl = None,
    as_json: AsJson = False,
) -> None:
    """List chunks processing for longer than --older-than or past their lease."""
    older = parse_duration(older_than, option="--older-than")
    with _connect(database_url) as conn:
        stuck = reports.stuck_chunks(conn, older_than=older)
    if as_json:
        output.emit_json({"older_than": older_than, "chunks": stuck})
    elif stuck:
        output.table(
            [
                {
                    **chunk,
                    "chunk": f"{chunk['chunk_index']}/{chunk['total_chunks']}",
                    "tries": f"{chunk['attempts']}/{chunk['max_attempts']}",
                }
                for chunk in stuck
            ],
            {
                "job_id": "job",
                "store_email": "store",
                "chunk": "chunk",
                "tries": "attempts",
                "worker_id": "worker",
                "started_at": "started",
                "lease_expires_at": "lease expires",
                "reason": "why",
            },
        )
    else:
        output.message(f"No chunk is stuck (processing for over {older_than}, or past its lease).")
    if check and stuck:
        expired = sum(chunk["reason"] == "lease expired" for chunk in stuck)
        cmd = command_name()
        if expired == len(stuck):
            # Past their lease: what the reaper is for, and nothing to decide.
            hint = f"`{cmd} reap` puts them back (workers and cron do it by themselves)"
        elif expired:
            hint = (
                f"`{cmd} reap` puts back the {expired} past their lease, and "
                f"`{cmd} reset-stuck --older-than {older_than}` the others"
            )
        else:
            hint = f"`{cmd} reset-stuck --older-than {older_than}` puts them back"
        raise CheckFailed(f"{_count(len(stuck), 'chunk')} stuck; {hint}.")


@app.command("reset-stuck")
def reset_stuck(
    older_than: OlderThanStuck = "5m",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would be reset; change nothing.")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Reset without asking.")] = False,
    database_url: DatabaseUrl = None,
    as_json: AsJson = False,
) -> None:
    """Put stuck chunks back to pending (or failed when out of attempts)."""
    older = parse_duration(older_than, option="--older-than")
    with _connect(database_url) as conn:
        cutoff = operations.stuck_cutoff(conn, older)
        stuck = operations.reset_stuck(conn, started_before=cutoff, dry_run=True)
        changed = False
        if stuck and not dry_run:
            if not yes:
                _reaped_table(stuck, err=True)
                if not _confirm(
                    f"Reset {'this chunk' if len(stuck) == 1 else f'these {len(stuck)} chunks'}?",
                    flag_hint="pass --yes to reset them, or --dry-run to only look",
                ):
                    output.message("Nothing changed.")
                    return
            stuck = operations.reset_stuck(conn, started_before=cutoff, dry_run=False)
            changed = True
    if as_json:
        output.emit_json({"dry_run": dry_run, "changed": changed, "chunks": stuck})
    elif stuck:
        _reaped_table(stuck)
    if not stuck:
        output.message(f"No chunk is stuck (processing for over {older_than}, or past its lease).")
    elif changed:
        output.message(f"Reset {_count(len(stuck), 'chunk')}.")
    else:
        output.message(f"Dry run: would reset {_count(len(stuck), 'chunk')}; nothing changed.")


# jobs: retry and cancel


@app.command()
def retry(
    job: JobArgument,
    chunk: Annotated[
        int | None, typer.Option("--chunk", help="Retry only this chunk (its index).")
    ] = None,
    database_url: DatabaseUrl = None,
    as_json: AsJson = False,
) -> None:
    """Requeue a job's failed (and cancelled) chunks with fresh attempts."""
    reference = _job_id(job)
    with _connect(database_url) as conn:
        job_id = _resolved_job(conn, reference)
        retried = operations.retry_job(conn, job_id, chunk_index=chunk)
    if as_json:
        output.emit_json(retried)
        return
    chunks = ", ".join(str(i) for i in retried.chunk_indexes)
    which = "chunk" if len(retried.chunk_indexes) == 1 else "chunks"
    output.message(f"Requeued {which} {chunks} of job {job_id}; the job is {retried.status}.")


@app.command()
def cancel(job: JobArgument, database_url: DatabaseUrl = None, as_json: AsJson = False) -> None:
    """Cancel a job; a worker running one of its chunks is stopped at its next page."""
    reference = _job_id(job)
    with _connect(database_url) as conn:
        job_id = _resolved_job(conn, reference)
        cancelled = operations.cancel_job(conn, job_id, reason="cancelled by operator")
    if as_json:
        output.emit_json({"job_id": job_id, "cancelled_chunks": cancelled})
        return
    output.message(f"Cancelled job {job_id} ({_count(cancelled, 'unfinished chunk')}).")


# maintenance


Since = Annotated[str, typer.Option("--since", help="Look at chunks created this long ago.")]


@app.command("success-rate")
def success_rate(
    since: Since = "24h",
    check: Annotated[
        bool, typer.Option("--check", help="Exit 1 when the success rate is below --min-rate.")
    ] = False,
    min_rate: Annotated[
        float | None,
        typer.Option(
            "--min-rate",
            help="With --check: the lowest acceptable percentage of finished chunks completed.",
        ),
    ] = None,
    database_url: DatabaseUrl = None,
    as_json: AsJson = False,
) -> None:
    """Count chunks by status; the success rate is completed / (completed + failed)."""
    period = parse_duration(since, option="--since")
    if check and min_rate is None:
        raise BadInput("--check needs --min-rate PCT, e.g. --check --min-rate 95.")
    if min_rate is not None and not check:
        raise BadInput("--min-rate applies only with --check.")
    if min_rate is not None and not 0 <= min_rate <= 100:
        raise BadInput(f"--min-rate is a percentage from 0 to 100, not {min_rate}.")
    with _connect(database_url) as conn:
        result = reports.success_rate(conn, since=period)
    below = check and result.rate is not None and min_rate is not None and result.rate < min_rate
    if as_json:
        output.emit_json(
            {
                "since": since,
                "statuses": result.statuses,
                "completed": result.completed,
                "failed": result.failed,
                "success_rate": result.rate,
                "min_rate": min_rate,
            }
        )
    elif result.statuses:
        output.table(
            result.statuses,
            {"status": "status", "count": "count", "percentage": "% of finished"},
        )
    if result.rate is None:
        output.message(f"No chunk created in the last {since} has finished yet.")
    else:
        others = sum(int(row["count"]) for row in result.statuses) - (
            result.completed + result.failed
        )
        finished = _count(result.completed + result.failed, "finished chunk")
        output.message(
            f"Success rate: {result.rate:.2f}% of the {finished} created in the last "
            f"{since} completed (completed / (completed + failed))"
            + (
                f"; {_count(others, 'other chunk')} (pending, processing or cancelled) "
                f"{'is' if others == 1 else 'are'} not counted."
                if others
                else "."
            )
        )
    if below:
        raise CheckFailed(f"The success rate {result.rate:.2f}% is below {min_rate:g}%.")


@app.command("problem-stores")
def problem_stores(
    since: Since = "24h",
    stale_after: Annotated[
        str | None,
        typer.Option(
            "--stale-after",
            help="Also flag stores kept current whose oldest folder round is older than "
            "this (e.g. 1h).",
            show_default=False,
        ),
    ] = None,
    check: Annotated[bool, typer.Option("--check", help="Exit 1 when a store is flagged.")] = False,
    database_url: DatabaseUrl = None,
    as_json: AsJson = False,
) -> None:
    """List stores with failed chunks, worst first, and (--stale-after) stores
    whose incremental rounds have fallen behind."""
    period = parse_duration(since, option="--since")
    stale = parse_duration(stale_after, option="--stale-after") if stale_after else None
    with _connect(database_url) as conn:
        stores = reports.problem_stores(conn, since=period, stale_after=stale)
    if as_json:
        output.emit_json({"since": since, "stale_after": stale_after, "stores": stores})
    elif stores:
        output.table(
            [
                {**store, "behind": format_duration(store["behind"]) if store["behind"] else ""}
                for store in stores
            ],
            {
                "name": "store",
                "email": "email",
                "failed_chunks": "failed",
                "total_chunks": "chunks",
                "behind": "behind",
                "last_error": "last error",
            },
        )
    else:
        stale_text = f", and none is over {stale_after} behind" if stale_after else ""
        output.message(f"No store has a failed chunk created in the last {since}{stale_text}.")
    if check and stores:
        raise CheckFailed(f"{len(stores)} store(s) have failed chunks or are behind.")


@app.command()
def cleanup(
    older_than: Annotated[
        str, typer.Option("--older-than", help="Delete finished jobs created this long ago.")
    ] = "7d",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would be deleted; change nothing.")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Delete without asking.")] = False,
    database_url: DatabaseUrl = None,
    as_json: AsJson = False,
) -> None:
    """Delete finished jobs (completed, failed, cancelled) with their chunks; emails stay."""
    older = parse_duration(older_than, option="--older-than")
    with _connect(database_url) as conn:
        finished = operations.cleanup(conn, older_than=older, dry_run=True)
        changed = False
        if finished and not dry_run:
            if not yes:
                _finished_jobs_table(finished, err=True)
                if not _confirm(
                    f"Delete these {len(finished)} job(s)?",
                    flag_hint="pass --yes to delete them, or --dry-run to only look",
                ):
                    output.message("Nothing changed.")
                    return
            finished = operations.cleanup(
                conn, older_than=older, only={job["job_id"] for job in finished}
            )
            changed = True
    if as_json:
        output.emit_json({"dry_run": dry_run, "changed": changed, "jobs": finished})
    elif finished:
        _finished_jobs_table(finished)
    if not finished:
        output.message(f"No finished job is older than {older_than}.")
    elif changed:
        output.message(f"Deleted {len(finished)} job(s) with their chunks; emails stay.")
    else:
        output.message(f"Dry run: would delete {len(finished)} job(s); nothing changed.")


def _finished_jobs_table(rows: list[dict[str, Any]], *, err: bool = False) -> None:
    columns: Mapping[str, str] = {
        "job_id": "job",
        "store_email": "store",
        "status": "status",
        "created_at": "created",
        "completed_at": "finished",
        "chunks": "chunks",
    }
    output.table(rows, columns, err=err)


# proving a copy


@app.command()
def verify(
    *,
    store: Annotated[
        str | None,
        typer.Argument(help="The store's id or email (or --all).", show_default=False),
    ] = None,
    every_store: Annotated[bool, typer.Option("--all", help="Every store, in one table.")] = False,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Exit 1 when a folder differs (for cron and probes); differences a round "
            "in flight or newer mail explains do not count.",
        ),
    ] = False,
    repair: Annotated[
        bool,
        typer.Option(
            "--repair",
            help="For each store that differs, enqueue an incremental job whose chunks for "
            "the folders that differ run a full round (and so reconcile them).",
        ),
    ] = False,
    database_url: DatabaseUrl = None,
    as_json: AsJson = False,
) -> None:
    """Prove a copy: each folder's message count in Graph against the store's rows."""
    if every_store == (store is not None):
        raise BadInput("Name one store, or pass --all (not both).")
    target = _target(database_url)
    with db.connection(target) as conn, closing(_MailSourceOnDemand(target)) as source:
        migrate.check_schema(conn, target.masked_url)
        result = verification.verify(conn, source, store_ref=store, repair=repair)
    _show_verification(result, as_json=as_json)
    if check and result.failed:
        differ = [s.store.email for s in result.failed if s.verdict == verification.DIFFERS]
        unproved = [s.store.email for s in result.failed if s.verdict != verification.DIFFERS]
        problems = []
        if differ:
            copies = "store's copy differs" if len(differ) == 1 else "stores' copies differ"
            problems.append(f"{len(differ)} {copies} from Graph: {', '.join(differ)}")
        if unproved:
            problems.append(
                f"{_count(len(unproved), 'store')} could not be verified: {', '.join(unproved)}"
            )
        raise CheckFailed("; ".join(problems) + ".")


def _show_verification(result: Verification, *, as_json: bool) -> None:
    if as_json:
        output.emit_json(
            {
                "stores": [_store_proof_json(proof) for proof in result.stores],
                "totals": result.totals(),
                "repairs": [
                    {
                        "store": repair.store,
                        "job_id": repair.job_id,
                        "full_rounds": repair.full_rounds,
                        "skipped": repair.skipped,
                    }
                    for repair in result.repairs
                ],
            }
        )
    elif not result.stores:
        output.message("No stores yet; add one with `syncctl store add`.")
        return
    else:
        output.table(
            [row for proof in result.stores for row in _proof_rows(proof)],
            {
                "store": "store",
                "folder": "folder",
                "graph": "Graph",
                "rows": "rows",
                "difference": "difference",
                "last_round_at": "last round ended",
                "verdict": "verdict",
            },
            optional=("last_round_at",),
        )
        totals = result.totals()
        counts = ", ".join(
            f"{totals['verdicts'][verdict]} {verdict}"
            for verdict in verification.FOLDER_VERDICTS
            if verdict in totals["verdicts"]
        )
        output.message(
            f"{_count(totals['folders'], 'folder')} of {_count(totals['stores'], 'store')}"
            + (f": {counts}." if counts else ".")
        )
    for repair in result.repairs:
        if repair.job_id is not None:
            rounds = ", ".join(repair.full_rounds)
            rounds = f": a full round of {rounds}" if rounds else ""
            output.message(
                f"Enqueued job {repair.job_id} for {repair.store.email}{rounds}; the workers "
                "(`syncctl run`) run it."
            )
        else:
            output.message(f"Did not repair {repair.store.email}: {repair.skipped}.")
    repaired = {repair.store.id for repair in result.repairs}
    for proof in result.stores:
        if proof.verdict == verification.DIFFERS and proof.store.id not in repaired:
            output.message(
                f"{proof.store.email} differs from Graph; `{command_name()} verify "
                f"{proof.store.email} --repair` runs a full round of the folders that differ."
            )


def _store_proof_json(proof: StoreProof) -> dict[str, Any]:
    window = proof.window
    return {
        "store": proof.store,
        "mode": proof.mode,
        "verdict": proof.verdict,
        "problem": proof.problem,
        "window": None
        if window is None
        else {"from": window.received_from, "to": window.received_to},
        "full_job_id": proof.full_job_id,
        "active_job_id": proof.active_job_id,
        "folders": [
            {
                "folder_id": folder.folder_id,
                "folder": folder.folder,
                "graph": folder.graph,
                "rows": folder.rows,
                "difference": folder.difference,
                "last_round_started_at": folder.last_round_started_at,
                "last_round_at": folder.last_round_at,
                "verdict": folder.verdict,
                "newer_since_last_round": folder.newer,
            }
            for folder in proof.folders
        ],
    }


def _proof_rows(proof: StoreProof) -> list[dict[str, Any]]:
    """A store's lines of the verify table: one per folder (or its window), or one
    saying why there is nothing to compare."""
    if not proof.folders:
        why = {
            verification.NOT_VERIFIED: f"not verified: {proof.problem}",
            verification.JOB_IN_FLIGHT: "job in flight (its first sync)",
            verification.NEVER_SYNCED: "never synced (no job completed)",
        }
        return [{"store": proof.store.email, "verdict": why.get(proof.verdict, proof.verdict)}]
    return [
        {
            "store": proof.store.email,
            "folder": folder.folder,
            "graph": folder.graph,
            "rows": folder.rows,
            "difference": f"{folder.difference:+d}" if folder.difference else "0",
            "last_round_at": folder.last_round_at,
            "verdict": _verdict_text(folder),
        }
        for folder in proof.folders
    ]


def _verdict_text(folder: FolderProof) -> str:
    if folder.verdict == verification.NEWER:
        return f"{folder.verdict} ({folder.newer} received since it started)"
    if folder.verdict == verification.DIFFERS:
        if folder.difference > 0:
            return f"differs: {folder.difference} missing from the copy"
        return f"differs: {-folder.difference} rows not in the mailbox"
    return folder.verdict


@dev_app.command("fake-graph")
def dev_fake_graph(
    *,
    mailbox: Annotated[
        list[str] | None,
        typer.Option(
            "--mailbox",
            help="A mailbox to serve, EMAIL=COUNT; repeat for more.",
            show_default=False,
        ),
    ] = None,
    port: Annotated[
        int, typer.Option("--port", help="Port on 127.0.0.1 (0: any free one).")
    ] = 8085,
    seed: Annotated[int, typer.Option("--seed", help="Changes every generated message.")] = 0,
    token: Annotated[
        str | None,
        typer.Option("--token", help="The bearer token to accept (default: a random one)."),
    ] = None,
    throttle_rate: Annotated[
        float, typer.Option("--throttle-rate", help="Share of requests answered 429.")
    ] = 0.0,
    retry_after: Annotated[
        float, typer.Option("--retry-after", help="Retry-After seconds sent with a 429.")
    ] = 1.0,
    error_rate: Annotated[
        float, typer.Option("--error-rate", help="Share of requests answered 5xx.")
    ] = 0.0,
    latency: Annotated[
        float, typer.Option("--latency", help="Seconds added to every request.")
    ] = 0.0,
    hang: Annotated[float, typer.Option("--hang", help="Share of requests never answered.")] = 0.0,
    max_in_flight: Annotated[
        int,
        typer.Option(
            "--max-in-flight",
            help="Requests in flight per mailbox before 429 MailboxConcurrency (0: no limit).",
        ),
    ] = 4,
    folders: Annotated[
        int | None,
        typer.Option(
            "--folders",
            help="Mail folders per mailbox, the first the Inbox (default: Inbox with a child "
            "Receipts, Sent Items, Archive, Deleted Items).",
            show_default=False,
        ),
    ] = None,
    churn: Annotated[
        float,
        typer.Option(
            "--churn",
            help="Random changes a second per mailbox while serving (new mail, edits, moves, "
            "deletes).",
        ),
    ] = 0.0,
) -> None:
    """Serve a local Graph-compatible mail server for tests, staging and load runs.

    Its control endpoint (announced at startup) changes mailboxes while it runs."""
    from syncctl.fakegraph import FakeGraphServer, parse_mailboxes, serve

    for name, rate in (
        ("--throttle-rate", throttle_rate),
        ("--error-rate", error_rate),
        ("--hang", hang),
    ):
        if not 0.0 <= rate <= 1.0:
            raise BadInput(f"{name} is a share of requests from 0 to 1, not {rate}.")
    if not 0 <= port <= 65535:
        raise BadInput(f"--port must be from 0 to 65535, not {port}.")
    if retry_after < 0 or latency < 0 or max_in_flight < 0 or churn < 0:
        raise BadInput("--retry-after, --latency, --max-in-flight and --churn cannot be negative.")
    if folders is not None and not 1 <= folders <= 1000:
        raise BadInput(f"--folders must be from 1 (the Inbox alone) to 1000, not {folders}.")
    server = FakeGraphServer(
        parse_mailboxes(mailbox or []),
        port=port,
        seed=seed,
        token=token,
        throttle_rate=throttle_rate,
        retry_after=retry_after,
        error_rate=error_rate,
        latency=latency,
        hang=hang,
        enforce_concurrency=max_in_flight or None,
        folders=folders,
        churn=churn,
    )
    try:
        serve(server, announce=typer.echo)
    except OSError as exc:
        raise BadInput(
            f"Cannot listen on 127.0.0.1:{port} ({exc.strerror}); pick another --port."
        ) from None


@app.command()
def demo(
    *,
    reset: Annotated[
        bool,
        typer.Option(
            "--reset",
            help="First delete the demo's sample stores with their jobs and mail (nothing else).",
        ),
    ] = False,
    keep_running: Annotated[
        bool,
        typer.Option(
            "--keep-running", help="After the report, keep the sample server up until Ctrl-C."
        ),
    ] = False,
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url",
            help="Run the demo in this database. Default: the embedded one under SYNCCTL_HOME, "
            "never SYNCCTL_DATABASE_URL or DATABASE_URL.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """The whole system on this machine: a database, sample mailboxes, workers, progress, report."""
    # Imported here: only the demo needs the sample server and worker processes.
    from syncctl import demo as tour

    target = tour.demo_database(database_url)
    _database_url.set(target.url)
    tour.run_demo(target, reset=reset, keep_running=keep_running, show_reports=_demo_reports)


def _demo_reports(target: DatabaseTarget, since: str) -> None:
    """The demo's closing report: what `status`, `success-rate` and `problem-stores` print."""
    reports_shown: list[tuple[str, Any]] = [
        ("status", lambda: status(database_url=target.url)),
        (
            f"success-rate --since {since}",
            lambda: success_rate(since=since, database_url=target.url),
        ),
        (
            f"problem-stores --since {since}",
            lambda: problem_stores(since=since, database_url=target.url),
        ),
    ]
    for command, show in reports_shown:
        output.message(f"\n$ {command_name()} {command}")
        show()


def main() -> None:
    """The `syncctl` console script."""
    from syncctl.argv import normalize

    groups = {name for name, group in _groups().items() if group}
    app(args=normalize(sys.argv[1:], groups), prog_name="syncctl")


def _groups() -> dict[str, bool]:
    """{command name: whether it takes a subcommand} of the root."""
    named = {g.name: True for g in app.registered_groups if g.name}
    for command in app.registered_commands:
        name = command.name or (command.callback.__name__ if command.callback else None)
        if name:
            named.setdefault(name.replace("_", "-"), False)
    return named
