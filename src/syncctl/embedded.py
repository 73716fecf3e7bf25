"""The embedded PostgreSQL used when no database is configured.

It lives under SYNCCTL_HOME, is started by the first command that needs it,
and is left running so later commands reuse it; `syncctl db stop` stops it.
"""

from __future__ import annotations

import logging
import os
import subprocess
import warnings
from pathlib import Path

from syncctl.errors import DatabaseUnavailable

log = logging.getLogger(__name__)


def embedded_database_url(home: Path) -> str:
    """Start (or find running) the embedded server under home; return its URL."""
    try:
        with warnings.catch_warnings():
            # pgserver asks platformdirs for a runtime folder it does not need here.
            warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
            import pgserver
    except ImportError:  # pragma: no cover - pgserver is a dependency
        raise DatabaseUnavailable(
            "No database is configured and the embedded one is not installed; "
            "set SYNCCTL_DATABASE_URL or install syncctl with its dependencies."
        ) from None
    pgdata = home / "pgdata"
    try:
        pgdata.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
            # cleanup_mode=None: keep the server running after this process exits.
            server = pgserver.get_server(pgdata, cleanup_mode=None)
    except Exception as exc:
        raise DatabaseUnavailable(
            f"Could not start the embedded PostgreSQL in {pgdata} ({exc}); "
            "set SYNCCTL_DATABASE_URL to use another database."
        ) from None
    url: str = server.get_uri()
    log.debug("embedded PostgreSQL at %s", url)
    return url


def stop_embedded(home: Path) -> int | None:
    """Stop the embedded server under home (a fast shutdown: sessions are ended,
    nothing is lost); the pid it ran as, or None when it was not running."""
    pgdata = home / "pgdata"
    try:
        pid = int((pgdata / "postmaster.pid").read_text(encoding="ascii").split()[0])
    except (OSError, ValueError, IndexError):
        return None  # no pid file, or an unreadable one
    if not process_running(pid):
        return None  # a server long gone (crashed, or the machine restarted)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
        from pgserver import pg_ctl
    # Run as root, pgserver starts PostgreSQL as its own system user.
    user = "pgserver" if os.geteuid() == 0 else None
    try:
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user)
    except (subprocess.CalledProcessError, OSError) as exc:
        raise DatabaseUnavailable(
            f"Could not stop the embedded PostgreSQL in {pgdata} ({exc}); its log is "
            f"{pgdata / 'log'}."
        ) from None
    return pid


def process_running(pid: int) -> bool:
    """Whether the process exists and has not exited (a zombie has)."""
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return True  # no /proc: the signal said it exists
