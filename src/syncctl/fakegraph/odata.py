"""Graph's wire conventions: reading OData query options, writing answers and error bodies."""

from __future__ import annotations

import base64
import json
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import orjson

API_PREFIX = "/v1.0"
DEFAULT_TOP = 10
MAX_TOP = 1000
JSON_TYPE = "application/json; odata.metadata=minimal; charset=utf-8"

DEFAULT_CODES = {
    400: "BadRequest",
    401: "InvalidAuthenticationToken",
    403: "ErrorAccessDenied",
    404: "ErrorItemNotFound",
    410: "syncStateNotFound",
    429: "TooManyRequests",
    500: "InternalServerError",
    502: "BadGateway",
    503: "ServiceUnavailable",
    504: "GatewayTimeout",
}
NOT_FOUND_MESSAGE = "The specified object was not found in the store."

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class Answer:
    """What the server answers one request with."""

    status: int
    body: bytes
    content_type: str = JSON_TYPE
    headers: dict[str, str] = field(default_factory=dict)
    error_code: str | None = None
    message_count: int = 0
    hang: bool = False


class BadQuery(Exception):
    """A request Graph would refuse: answered with status, code and this message."""

    def __init__(
        self, code: str, message: str, *, status: int = 400, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.headers = headers or {}

    def answer(self) -> Answer:
        return error(self.status, self.code, str(self), headers=self.headers)


def not_found() -> BadQuery:
    """Graph's refusal of an id the mailbox does not have (a folder here)."""
    return BadQuery("ErrorItemNotFound", NOT_FOUND_MESSAGE, status=404)


def error(status: int, code: str, message: str, *, headers: dict[str, str] | None = None) -> Answer:
    """An answer with Graph's error body."""
    request_id = str(uuid.uuid4())
    body = {
        "error": {
            "code": code,
            "message": message,
            "innerError": {
                "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"),
                "request-id": request_id,
                "client-request-id": request_id,
            },
        }
    }
    return Answer(status, json_bytes(body), headers=headers or {}, error_code=code)


def json_bytes(document: Any) -> bytes:
    """The document as Graph sends it: compact UTF-8 JSON, a lone surrogate escaped."""
    try:
        return orjson.dumps(document)
    except orjson.JSONEncodeError:  # a lone surrogate, which orjson refuses
        pass
    text = json.dumps(document, ensure_ascii=False, separators=(",", ":"))
    # Graph sends a lone surrogate escaped; raw, it could not be UTF-8.
    text = _LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    return text.encode("utf-8")


def seconds(value: float) -> str:
    """A Retry-After value: whole seconds as an integer, else as few digits as needed."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def integer(query: dict[str, str], name: str, default: int) -> int:
    """A non-negative integer query option."""
    value = query.get(name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise BadQuery("BadRequest", f"Invalid value '{value}' for {name}.") from None
    if number < 0:
        raise BadQuery("BadRequest", f"Invalid value '{value}' for {name}.")
    return number


def top(query: dict[str, str]) -> int:
    """The page size a listing asks for with $top (1 to MAX_TOP, DEFAULT_TOP when not given)."""
    number = integer(query, "$top", DEFAULT_TOP)
    if not 1 <= number <= MAX_TOP:
        raise BadQuery(
            "ErrorInvalidArgument", f"The value of $top must be between 1 and {MAX_TOP}."
        )
    return number


def parse_select(value: str | None, properties: Iterable[str], type_name: str) -> list[str] | None:
    """The property names of a $select (None: every property)."""
    if value is None or not value.strip():
        return None
    known = {"id", *properties}
    names = [name.strip() for name in value.split(",") if name.strip()]
    for name in names:
        if name not in known:
            raise BadQuery(
                "RequestBroker--ParseUri",
                f"Could not find a property named '{name}' on type 'microsoft.graph.{type_name}'.",
            )
    return names


def project(item: dict[str, Any], select: list[str] | None) -> dict[str, Any]:
    """The item with only the selected properties, its id and its etag."""
    if select is None:
        return item
    keep = {"@odata.etag", "id", *select}
    return {k: v for k, v in item.items() if k in keep}


def encode_query(params: dict[str, str]) -> str:
    return "&".join(f"{k}={quote(v, safe='')}" for k, v in params.items())


def skiptoken(generation: int) -> str:
    """An opaque page token naming the generation of links it belongs to."""
    return base64.urlsafe_b64encode(f"links:{generation}".encode()).decode().rstrip("=")


def link_generation_of(token: str) -> int | None:
    """The generation a $skiptoken was handed out in; None if it is not one of ours."""
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        kind, _, number = text.partition(":")
        return int(number) if kind == "links" else None
    except ValueError:  # not base64, not UTF-8, or no number
        return None


def check_page_link(query: dict[str, str], generation: int) -> None:
    """Refuse a next link handed out before expire_links() (400, as an expired page token)."""
    token = query.get("$skiptoken")
    if token is not None and link_generation_of(token) != generation:
        raise BadQuery(
            "BadRequest", "The page token is no longer valid; start again from the first page."
        )
