"""Where syncctl finds its database, and how a database URL is shown to a person."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from syncctl.errors import BadInput

EMBEDDED = "embedded"


@dataclass(frozen=True)
class DatabaseTarget:
    """A database to use and where that choice came from."""

    url: str = field(repr=False)
    source: str  # "--database-url", an environment variable's name, or EMBEDDED

    @property
    def masked_url(self) -> str:
        return mask_url(self.url)


def syncctl_home() -> Path:
    """The folder for syncctl's own state (the embedded database)."""
    configured = os.environ.get("SYNCCTL_HOME")
    if configured:
        return Path(configured).expanduser()
    return Path(platformdirs.user_data_dir("syncctl", appauthor=False))


def resolve_database(flag_url: str | None) -> DatabaseTarget:
    """Pick the database: the flag, then SYNCCTL_DATABASE_URL, then DATABASE_URL,
    else the embedded one (started on demand)."""
    if flag_url:
        return DatabaseTarget(_checked(flag_url, "--database-url"), "--database-url")
    for name in ("SYNCCTL_DATABASE_URL", "DATABASE_URL"):
        value = os.environ.get(name)
        if value:
            return DatabaseTarget(_checked(value, name), name)
    # Imported here: starting the embedded server is the slow path.
    from syncctl.embedded import embedded_database_url

    return DatabaseTarget(embedded_database_url(syncctl_home()), EMBEDDED)


def _checked(url: str, where: str) -> str:
    try:
        conninfo_to_dict(url)
    except Exception as exc:  # psycopg raises ProgrammingError for a malformed string
        raise BadInput(
            f"The database URL from {where} is not valid ({scrub_secrets(str(exc), url)}); "
            "write it as postgresql://user:password@host:port/dbname."
        ) from None
    return url


def mask_url(url: str) -> str:
    """The URL with any password replaced by ***, for showing to a person."""
    if "://" in url:
        # Edit the text rather than re-assemble it, so the URL keeps its exact form.
        url = re.sub(r"^([a-z]+://[^:/@?]*):[^@/?]+@", r"\1:***@", url)
        return re.sub(r"(?i)([?&]password=)[^&]*", r"\1***", url)
    try:
        params = conninfo_to_dict(url)
    except Exception:
        return "(unparsable connection string)"
    if "password" in params:
        params["password"] = "***"  # noqa: S105 - the mask itself, not a password
    return make_conninfo("", **params)


def scrub_secrets(text: str, url: str) -> str:
    """Remove the URL's password from a message that may quote it."""
    try:
        password = conninfo_to_dict(url).get("password")
    except Exception:
        # A URL psycopg cannot parse may still hold a password in its userinfo.
        found = re.match(r"^[a-z]+://[^:/@?]*:([^@/?]*)@", url)
        password = found.group(1) if found else None
    if password:
        text = text.replace(str(password), "***")
    return text
