"""Where Graph is and how to reach it: endpoint, credentials, patience."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from syncctl.errors import BadInput

DEFAULT_GRAPH_URL = "https://graph.microsoft.com/v1.0"
DEFAULT_AUTHORITY_HOST = "https://login.microsoftonline.com"
CREDENTIALS_HINT = (
    "check SYNCCTL_GRAPH_TOKEN, or SYNCCTL_TENANT_ID, SYNCCTL_CLIENT_ID and "
    "SYNCCTL_CLIENT_SECRET and the app's Mail.Read application permission"
)


@dataclass(frozen=True)
class GraphSettings:
    """Where Graph is, how to authenticate, and how patient to be with it."""

    url: str = DEFAULT_GRAPH_URL
    token: str | None = field(default=None, repr=False)
    tenant_id: str | None = None
    client_id: str | None = None
    client_secret: str | None = field(default=None, repr=False)
    authority_host: str = DEFAULT_AUTHORITY_HOST
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    # A response still arriving after this long is abandoned (a server trickling bytes).
    request_deadline: float = 120.0
    # A request with no complete answer after this long is logged once (it still
    # waits, until the read timeout or the deadline ends it); 0: never.
    slow_request_notice: float = 10.0
    # A refused connection (nothing listening, no such host): tried again with
    # backoff like a 5xx (workers: a Graph outage or a proxy restart must not
    # use up attempts), or failed at once (commands a person waits on).
    retry_refused_connections: bool = False
    # Tries per request (one page, one count) before the attempt fails.
    max_tries: int = 6
    # Longest wait a Retry-After is allowed to impose.
    retry_after_cap: float = 120.0
    backoff_base: float = 1.0
    backoff_cap: float = 30.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> GraphSettings:
        """Settings from SYNCCTL_GRAPH_URL, SYNCCTL_GRAPH_TOKEN, SYNCCTL_TENANT_ID,
        SYNCCTL_CLIENT_ID, SYNCCTL_CLIENT_SECRET and SYNCCTL_AUTHORITY_HOST."""
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        settings = cls(
            url=_graph_url(get("SYNCCTL_GRAPH_URL") or DEFAULT_GRAPH_URL),
            token=get("SYNCCTL_GRAPH_TOKEN"),
            tenant_id=get("SYNCCTL_TENANT_ID"),
            client_id=get("SYNCCTL_CLIENT_ID"),
            client_secret=get("SYNCCTL_CLIENT_SECRET"),
            authority_host=_authority_host(get("SYNCCTL_AUTHORITY_HOST") or DEFAULT_AUTHORITY_HOST),
        )
        settings.check_credentials()
        return settings

    def check_credentials(self) -> None:
        """Raise BadInput unless a token or a complete set of app credentials is given."""
        if self.token:
            return
        app = {
            "SYNCCTL_TENANT_ID": self.tenant_id,
            "SYNCCTL_CLIENT_ID": self.client_id,
            "SYNCCTL_CLIENT_SECRET": self.client_secret,
        }
        missing = [name for name, value in app.items() if not value]
        if len(missing) == len(app):
            raise BadInput(
                "No Graph credentials: set SYNCCTL_GRAPH_TOKEN, or SYNCCTL_TENANT_ID, "
                "SYNCCTL_CLIENT_ID and SYNCCTL_CLIENT_SECRET for an app registration."
            )
        if missing:
            raise BadInput(
                f"Graph app credentials are incomplete: set {', '.join(missing)} as well."
            )

    @property
    def graph_root(self) -> str:
        """The scheme and host of the Graph URL, e.g. https://graph.microsoft.com."""
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}"

    @property
    def scope(self) -> str:
        """The app-only scope: every application permission granted for this Graph."""
        return f"{self.graph_root}/.default"

    @property
    def authority(self) -> str:
        return f"{self.authority_host}/{self.tenant_id}"

    @property
    def longest_request(self) -> float:
        """The most seconds one request can take: waiting for a connection,
        connecting, the deadline, and the one read that may overrun it."""
        return 2 * self.connect_timeout + self.request_deadline + self.read_timeout

    @property
    def secrets(self) -> tuple[str, ...]:
        return tuple(s for s in (self.token, self.client_secret) if s)


def _graph_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise BadInput(
            f"SYNCCTL_GRAPH_URL {url!r} is not an http(s) URL; the default is {DEFAULT_GRAPH_URL}."
        )
    return url.rstrip("/")


def _authority_host(host: str) -> str:
    # National clouds are often given as a bare host name.
    return (host if "://" in host else f"https://{host}").rstrip("/")
