"""Text PostgreSQL can store: no NUL characters, no lone surrogates.

Mailboxes hold both (a NUL in a body, half of an emoji's surrogate pair in a
subject). PostgreSQL's text and jsonb refuse them, and a message must never
fail its chunk for it: a NUL is dropped and a lone surrogate becomes U+FFFD,
the replacement character. Graph's JSON carries both as escapes (\\u0000,
\\ud83d), so a page is cleaned as bytes, before it is parsed.
"""

from __future__ import annotations

import re
from typing import Any

# A surrogate code point alone (JSON can escape one; UTF-8 cannot encode it).
_SURROGATE = re.compile("[\ud800-\udfff]")
# The JSON escapes to look at: NUL, and any surrogate (a pair is kept whole).
_ESCAPE = re.compile(rb"\\u(?:0000|[dD][89a-fA-F][0-9a-fA-F]{2})")
_LOW_SURROGATE = re.compile(rb"\\u[dD][c-fC-F][0-9a-fA-F]{2}")
_REPLACEMENT = rb"\ufffd"


def clean_text(value: str | None) -> str | None:
    """The text with each NUL dropped and each lone surrogate made U+FFFD."""
    if value is None:
        return None
    value = value.replace("\x00", "")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = _SURROGATE.sub("\ufffd", value)
    return value


def clean_json(value: Any) -> Any:
    """A JSON value with every string in it (keys too) cleaned as clean_text does."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, dict):
        return {clean_text(str(k)): clean_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_json(v) for v in value]
    return value


def clean_escapes(data: bytes) -> bytes:
    """JSON text with its \\u0000 escapes dropped and each escaped lone surrogate
    made \\ufffd; a valid surrogate pair is kept. Anything else is left as it is."""
    if b"\\u" not in data:
        return data
    pieces: list[bytes] = []
    kept_to = 0  # data[:kept_to] is dealt with
    for match in _ESCAPE.finditer(data):
        start, end = match.span()
        if start < kept_to or _escaped(data, start):
            continue  # the low half of a pair kept whole, or a backslash then "u0000"
        pieces.append(data[kept_to:start])
        kept_to = end
        code = int(match[0][2:], 16)
        if code == 0:
            continue
        if code <= 0xDBFF and _LOW_SURROGATE.match(data, end):
            pieces.append(data[start : end + 6])
            kept_to = end + 6
        else:
            pieces.append(_REPLACEMENT)
    if not pieces:
        return data
    pieces.append(data[kept_to:])
    return b"".join(pieces)


def _escaped(data: bytes, position: int) -> bool:
    """Whether the backslash at position is itself escaped (an odd run of backslashes before it)."""
    run = 0
    while position - run > 0 and data[position - run - 1] == 0x5C:
        run += 1
    return run % 2 == 1
