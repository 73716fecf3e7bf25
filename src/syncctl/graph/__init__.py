"""Microsoft Graph: settings, tokens, request slots, the HTTP client with
throttling, message listing, folders and delta rounds, and the mail source
that puts them together. What the rest of syncctl uses is named here."""

from syncctl.graph.auth import (
    ClientCredentialsApp,
    MsalTokens,
    StaticToken,
    TokenError,
    TokenProvider,
    msal_app_factory,
    token_provider,
)
from syncctl.graph.client import IMMUTABLE_IDS, GraphClient
from syncctl.graph.delta import parse_delta_page
from syncctl.graph.messages import SELECT_FIELDS, message_from_graph, parse_page, window_filter
from syncctl.graph.settings import DEFAULT_AUTHORITY_HOST, DEFAULT_GRAPH_URL, GraphSettings
from syncctl.graph.slots import MailboxSlots
from syncctl.graph.source import GraphMailSource, open_mail_source

__all__ = [
    "DEFAULT_AUTHORITY_HOST",
    "DEFAULT_GRAPH_URL",
    "IMMUTABLE_IDS",
    "SELECT_FIELDS",
    "ClientCredentialsApp",
    "GraphClient",
    "GraphMailSource",
    "GraphSettings",
    "MailboxSlots",
    "MsalTokens",
    "StaticToken",
    "TokenError",
    "TokenProvider",
    "message_from_graph",
    "msal_app_factory",
    "open_mail_source",
    "parse_delta_page",
    "parse_page",
    "token_provider",
    "window_filter",
]
