from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncctl.durations import format_duration, parse_date, parse_duration
from syncctl.errors import BadInput


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", timedelta(seconds=90)),
        ("5m", timedelta(minutes=5)),
        ("2h", timedelta(hours=2)),
        ("7d", timedelta(days=7)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        (" 24H ", timedelta(hours=24)),
        ("0s", timedelta()),
    ],
)
def test_parse_duration_reads_the_documented_units(text: str, expected: timedelta) -> None:
    assert parse_duration(text, option="--since") == expected


@pytest.mark.parametrize("text", ["", "5", "5 minutes", "-5m", "1.5h", "5w", "m5", "5m junk"])
def test_parse_duration_refuses_anything_else_naming_the_flag(text: str) -> None:
    with pytest.raises(BadInput, match="--older-than takes a duration like 90s"):
        parse_duration(text, option="--older-than")


@pytest.mark.parametrize("text", ["36501d", "99999999999999999999d"])
def test_parse_duration_refuses_durations_postgresql_cannot_subtract(text: str) -> None:
    with pytest.raises(BadInput, match="too long"):
        parse_duration(text, option="--since")


@given(st.integers(min_value=0, max_value=36_500 * 86_400))
def test_format_duration_is_read_back_by_parse_duration(seconds: int) -> None:
    value = timedelta(seconds=seconds)
    assert parse_duration(format_duration(value), option="--since") == value


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-01-31", datetime(2024, 1, 31, tzinfo=UTC)),
        ("2024-01-31T12:00:00Z", datetime(2024, 1, 31, 12, tzinfo=UTC)),
        ("2024-01-31T12:00:00", datetime(2024, 1, 31, 12, tzinfo=UTC)),
        (
            "2024-01-31T12:00:00+02:00",
            datetime(2024, 1, 31, 12, tzinfo=timezone(timedelta(hours=2))),
        ),
    ],
)
def test_parse_date_reads_iso_8601_and_takes_naive_as_utc(text: str, expected: datetime) -> None:
    parsed = parse_date(text, option="--from")
    assert parsed == expected
    assert parsed.tzinfo is not None


@pytest.mark.parametrize("text", ["", "yesterday", "2024-02-30", "31/01/2024", "2024-01-31T25:00"])
def test_parse_date_refuses_other_text_naming_the_flag(text: str) -> None:
    with pytest.raises(BadInput, match="--to takes a date like 2024-01-31"):
        parse_date(text, option="--to")
