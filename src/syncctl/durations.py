"""Durations (`90s`, `5m`, `2h`, `7d`) and dates (ISO 8601) as operators write them."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from syncctl.errors import BadInput

_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
_PART = re.compile(r"(\d+)([smhd])")
_DURATION = re.compile(r"(?:\d+[smhd])+")
# Far beyond any sensible queue age, and well inside what PostgreSQL can subtract from now().
_LONGEST = timedelta(days=36_500)


def parse_duration(text: str, *, option: str) -> timedelta:
    """A duration such as 90s, 5m, 2h, 7d or 1h30m; option names the flag in the error."""
    cleaned = text.strip().lower()
    if not _DURATION.fullmatch(cleaned):
        raise BadInput(f"{option} takes a duration like 90s, 5m, 2h or 7d, not {text!r}.")
    total = timedelta()
    for amount, unit in _PART.findall(cleaned):
        if len(amount) > 9:  # keeps timedelta from overflowing before the range check
            raise BadInput(f"{option} {text!r} is too long; give at most {_LONGEST.days}d.")
        total += timedelta(**{_UNITS[unit]: int(amount)})
    if total > _LONGEST:
        raise BadInput(f"{option} {text!r} is too long; give at most {_LONGEST.days}d.")
    return total


def format_duration(value: timedelta) -> str:
    """The shortest way to write value in the units parse_duration reads (1d2h, 90s, 0s)."""
    seconds = int(value.total_seconds())
    if seconds <= 0:
        return "0s"
    parts = []
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def parse_date(text: str, *, option: str) -> datetime:
    """An ISO 8601 date or date-time (2024-01-31, 2024-01-31T12:00:00Z); naive means UTC."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise BadInput(
            f"{option} takes a date like 2024-01-31 or 2024-01-31T12:00:00Z, not {text!r}."
        ) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value


def format_time(moment: datetime) -> str:
    """A time as syncctl shows it: UTC, to the second, 2024-01-31 12:00:00Z (naive: as is)."""
    shown = moment.astimezone(UTC) if moment.tzinfo else moment
    return shown.strftime("%Y-%m-%d %H:%M:%S") + ("Z" if moment.tzinfo else "")
