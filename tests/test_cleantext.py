"""Text PostgreSQL can store, cleaned as strings and as JSON bytes."""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncctl.cleantext import clean_escapes, clean_json, clean_text

# Every code point, surrogates and NUL included, with the troublesome ones often.
any_text = st.text(
    alphabet=st.one_of(
        st.characters(codec=None, exclude_categories=()),
        st.sampled_from(["\x00", "\ud83d", "\ude00", "\\", "u", "0", "d", "\U0001f600"]),
    )
)


def test_clean_text_keeps_good_text_and_repairs_bad() -> None:
    assert clean_text(None) is None
    assert clean_text("naïve 🎉 日本") == "naïve 🎉 日本"
    assert clean_text("a\x00b") == "ab"
    assert clean_text("x\udfffy") == "x\ufffdy"
    assert clean_json({"a\x00": [1, None, "b\x00", {"c": "\ud800"}]}) == {
        "a": [1, None, "b", {"c": "\ufffd"}]
    }


@pytest.mark.parametrize(
    ("escaped", "cleaned"),
    [
        (rb'"a\u0000b"', "ab"),
        (rb'"\u0000\u0000"', ""),
        (rb'"half \ud83d of a pair"', "half \ufffd of a pair"),
        (rb'"low \ude00 alone"', "low \ufffd alone"),
        (rb'"\ud83d\ud83d\ude00"', "\ufffd\U0001f600"),
        (rb'"a pair \ud83d\ude00 kept"', "a pair \U0001f600 kept"),
        (rb'"\uD83D\uDE00 upper case"', "\U0001f600 upper case"),
        # A backslash then the letters: text, not an escape.
        (rb'"a backslash \\u0000 and \\ud83d"', "a backslash \\u0000 and \\ud83d"),
        (rb'"two \\\u0000"', "two \\"),
        (rb'"ends high \ud83d"', "ends high \ufffd"),
    ],
)
def test_escapes_are_cleaned(escaped: bytes, cleaned: str) -> None:
    assert orjson.loads(clean_escapes(escaped)) == cleaned


def test_json_without_escapes_is_returned_as_is() -> None:
    data = '{"subject": "naïve 🎉", "n": 1}'.encode()
    assert clean_escapes(data) is data


@given(any_text)
def test_cleaned_json_parses_to_the_cleaned_text(text: str) -> None:
    # json escapes every NUL and surrogate (ensure_ascii); orjson refuses a lone surrogate.
    data = json.dumps({"subject": text, text: [text]}).encode()
    # In JSON a high surrogate's escape then a low one's is one character.
    paired = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")
    cleaned = clean_text(paired)
    assert orjson.loads(clean_escapes(data)) == {"subject": cleaned, cleaned: [cleaned]}
