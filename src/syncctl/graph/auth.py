"""Bearer tokens for Graph: a static one, or app-only tokens from msal."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from syncctl import __version__
from syncctl.graph.settings import GraphSettings

log = logging.getLogger(__name__)


class TokenError(Exception):
    """No token could be had. refused: the identity platform said no (not a network fault)."""

    def __init__(self, message: str, *, refused: bool) -> None:
        super().__init__(message)
        self.refused = refused


class TokenProvider(Protocol):
    # Whether refresh can give a token other than the one Graph refused.
    renewable: bool

    def token(self) -> str:
        """A bearer token that is valid now."""
        ...

    def refresh(self, rejected: str) -> str:
        """A new token after Graph rejected `rejected` with 401."""
        ...


class StaticToken:
    """SYNCCTL_GRAPH_TOKEN, used as is: it cannot be renewed."""

    renewable = False

    def __init__(self, token: str) -> None:
        self._token = token

    def __repr__(self) -> str:
        return "StaticToken(***)"

    def token(self) -> str:
        return self._token

    def refresh(self, rejected: str) -> str:
        return self._token


class ClientCredentialsApp(Protocol):
    """The part of msal.ConfidentialClientApplication syncctl uses."""

    def acquire_token_for_client(self, scopes: list[str]) -> dict[str, Any]: ...


class MsalTokens:
    """App-only tokens from msal, kept until `margin` seconds before they expire.

    A 401 means Graph no longer accepts the token it has (revoked, rotated
    keys): `refresh` then starts a new app, so msal's own cache cannot hand
    the same token back.
    """

    renewable = True

    def __init__(
        self,
        app_factory: Callable[[], ClientCredentialsApp],
        scope: str,
        *,
        margin: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._app_factory = app_factory
        self._scope = scope
        self._margin = margin
        self._clock = clock
        self._lock = threading.Lock()
        self._app: ClientCredentialsApp | None = None
        self._token: str | None = None
        self._expires_at = 0.0

    def __repr__(self) -> str:
        return f"MsalTokens(scope={self._scope!r})"

    def token(self) -> str:
        with self._lock:
            if self._token is not None and self._clock() < self._expires_at - self._margin:
                return self._token
            return self._acquire()

    def refresh(self, rejected: str) -> str:
        with self._lock:
            if self._token is not None and self._token != rejected:
                return self._token  # another thread renewed it already
            self._app = None
            self._token = None
            return self._acquire()

    def _acquire(self) -> str:
        try:
            if self._app is None:
                self._app = self._app_factory()
            result = self._app.acquire_token_for_client(scopes=[self._scope])
        except ValueError as exc:
            # msal raises ValueError for an authority (tenant) it cannot use.
            self._app = None
            raise TokenError(
                f"the identity platform refused the tenant: {exc}", refused=True
            ) from None
        except Exception as exc:
            self._app = None
            raise TokenError(
                f"could not reach the identity platform ({type(exc).__name__}: {exc})",
                refused=False,
            ) from None
        token = result.get("access_token")
        if not token:
            error = result.get("error", "no token")
            description = str(result.get("error_description", "")).splitlines()
            reason = f"{error}: {description[0]}" if description else str(error)
            # Throttled or unavailable identity platform is worth retrying; anything else is a no.
            transient = error in ("temporarily_unavailable", "server_error", "slow_down")
            raise TokenError(f"the identity platform answered {reason}", refused=not transient)
        self._token = str(token)
        self._expires_at = self._clock() + float(result.get("expires_in", 3600))
        return self._token


def msal_app_factory(settings: GraphSettings) -> Callable[[], ClientCredentialsApp]:
    """Builds msal confidential clients for the settings' tenant and app."""

    def build() -> ClientCredentialsApp:
        # Imported on first use: only app-only auth needs it.
        import msal

        app: ClientCredentialsApp = msal.ConfidentialClientApplication(
            settings.client_id,
            client_credential=settings.client_secret,
            authority=settings.authority,
            token_cache=msal.TokenCache(),
            timeout=settings.connect_timeout + settings.read_timeout,
            app_name="syncctl",
            app_version=__version__,
        )
        return app

    return build


def token_provider(settings: GraphSettings) -> TokenProvider:
    """The token source the settings call for: the static token first, else msal."""
    settings.check_credentials()
    if settings.token:
        return StaticToken(settings.token)
    return MsalTokens(msal_app_factory(settings), settings.scope)
