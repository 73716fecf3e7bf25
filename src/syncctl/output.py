"""Showing results: tables (rich on a terminal, plain otherwise), JSON, messages.

Data goes to stdout, messages to stderr, so `syncctl ... --json | jq` and
`syncctl ... > file` get data only.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from enum import Enum
from typing import TYPE_CHECKING, Any, TextIO
from uuid import UUID

import typer

from syncctl.durations import format_time

if TYPE_CHECKING:
    from rich.console import Console

# rich and tabulate are imported where a table is drawn: most runs of a
# command that prints none (--help, --version, --json) never load them.

# How many rows a listing shows unless --limit says otherwise.
DEFAULT_LIMIT = 50

# A column list: row keys, or key -> header.
Columns = Sequence[str] | Mapping[str, str]
# An id cut short to fit a terminal keeps this many hex digits at least, as git's commits.
SHORT_ID = 8


# How values that json cannot write are written; datetime before date, its base class.
_JSON_FORMS: tuple[tuple[type | tuple[type, ...], Callable[[Any], Any]], ...] = (
    (datetime, lambda v: (v.astimezone(UTC) if v.tzinfo else v).isoformat()),
    (date, date.isoformat),
    (timedelta, timedelta.total_seconds),
    (Decimal, float),
    (UUID, str),
    (Enum, lambda v: v.value),
    ((set, frozenset), sorted),
)


def _json_default(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    for kind, form in _JSON_FORMS:
        if isinstance(value, kind):
            return form(value)
    raise TypeError(f"{type(value).__name__} cannot be written as JSON")


def emit_json(document: Any) -> None:
    """Print one JSON document on stdout: datetimes as ISO 8601 in UTC, UUIDs as strings."""
    typer.echo(json.dumps(document, default=_json_default, indent=2, ensure_ascii=False))


def message(text: str) -> None:
    """A line for the person running the command, on stderr."""
    typer.echo(text, err=True)


def cell(value: Any) -> str:
    """How one value reads in a table."""
    if value is None:
        return ""
    if isinstance(value, datetime):
        return format_time(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Decimal | float):
        return f"{value:.2f}"
    if isinstance(value, list | tuple):
        return ", ".join(cell(v) for v in value)
    return str(value)


def table(
    rows: Sequence[Mapping[str, Any]],
    columns: Columns,
    *,
    title: str | None = None,
    err: bool = False,
    optional: Sequence[str] = (),
) -> None:
    """Print rows as a table: rich on a terminal, plain text otherwise (pipes, files).
    optional: keys of columns a terminal too narrow for the table may go without, the
    first left out first."""
    headers = dict(columns) if isinstance(columns, Mapping) else {c: c for c in columns}
    stream: TextIO = sys.stderr if err else sys.stdout
    cells = [[cell(row.get(key)) for key in headers] for row in rows]
    if stream.isatty():
        _rich_table(stream, rows, headers, cells, title=title, optional=optional)
        return
    if title:
        typer.echo(title, err=err)
    from tabulate import tabulate

    typer.echo(tabulate(cells, headers=list(headers.values()), disable_numparse=True), err=err)


def _rich_table(
    stream: TextIO,
    rows: Sequence[Mapping[str, Any]],
    headers: dict[str, str],
    cells: list[list[str]],
    *,
    title: str | None,
    optional: Sequence[str],
) -> None:
    from rich.table import Table
    from rich.text import Text

    console = _console(stream)
    shown = _Shown(rows, headers, cells)
    # Ids stay on one line, always: operators copy them into the next command. When the
    # table with whole ids does not fit the terminal, the ids are cut to their first hex
    # digits (8, more where two would read the same), as git shows commits; then the
    # optional columns are left out until it fits; and if it still does not, the other
    # columns fold. The caption says what was cut.
    cut = []
    if any(shown.ids) and not shown.fits(console.width):
        shown.shorten_ids(rows)
        cut.append("ids cut short")
    left_out = []
    for key in optional:
        if shown.fits(console.width):
            break
        left_out += shown.leave_out(key)
    if left_out:
        cut.append(f"{', '.join(left_out)} left out")
    caption = None
    if cut:
        caption = (
            f"{' and '.join(cut).capitalize()} to fit {console.width} columns; "
            + ("a job's short id works wherever a job id is taken; " if any(shown.ids) else "")
            + "--json shows everything."
        )
    widths = shown.widths(console.width)
    needed = shown.needed()
    rich_table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    for i, (name, is_id) in enumerate(zip(shown.names, shown.ids, strict=True)):
        # Headers may wrap ("job (short)"); ids never, other values fold where too long.
        header = Text(name, no_wrap=False)
        if is_id:
            width = needed[i]
            rich_table.add_column(header, no_wrap=True, min_width=width, max_width=width)
        else:
            rich_table.add_column(header, overflow="fold", width=widths[i] if widths else None)
    for line in shown.cells:
        # Text, not str: values such as "[Errno 111]" must not be read as markup.
        rich_table.add_row(*(Text(value) for value in line))
    console.print(rich_table)


class _Shown:
    """The columns of a table as a terminal shows them: keys, headers, which hold ids
    (UUIDs), and the cells, row by row."""

    def __init__(
        self, rows: Sequence[Mapping[str, Any]], headers: dict[str, str], cells: list[list[str]]
    ) -> None:
        self.keys = list(headers)
        self.names = list(headers.values())
        self.ids = [any(isinstance(row.get(key), UUID) for row in rows) for key in self.keys]
        self.cells = cells

    def needed(self) -> list[int]:
        """The width each column needs to read well: ids whole, other values up to 20
        characters, no header word broken."""
        return [
            max(_width(self.cells, i, is_id), *(len(word) for word in name.split()))
            for i, (name, is_id) in enumerate(zip(self.names, self.ids, strict=True))
        ]

    def fits(self, width: int) -> bool:
        # A column takes its width plus 3 (padding and a rule), the table one more.
        return sum(w + 3 for w in self.needed()) + 1 <= width

    def widths(self, width: int) -> list[int] | None:
        """Column widths for a table `width` wide, when it fits: what each needs, and what
        is left over to the columns whose values are longer, then to those whose headers
        are, left to right."""
        if not self.fits(width):
            return None
        widths = self.needed()
        spare = width - (sum(w + 3 for w in widths) + 1)
        values = [max((len(line[i]) for line in self.cells), default=0) for i in range(len(widths))]
        for longest in (values, [max(v, len(n)) for v, n in zip(values, self.names, strict=True)]):
            for i, wanted in enumerate(longest):
                more = 0 if self.ids[i] else min(spare, max(wanted - widths[i], 0))
                widths[i] += more
                spare -= more
        return widths

    def shorten_ids(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Every id cut to its short form; the headers say so."""
        for i, key in enumerate(self.keys):
            if not self.ids[i]:
                continue
            short = _short_ids([row.get(key) for row in rows])
            for line, row in zip(self.cells, rows, strict=True):
                value = row.get(key)
                if isinstance(value, UUID):
                    line[i] = short[value]
            self.names[i] = f"{self.names[i]} (short)"

    def leave_out(self, key: str) -> list[str]:
        """Drop the column of key, if shown and not the last; its header, if dropped."""
        if key not in self.keys or len(self.keys) == 1:
            return []
        i = self.keys.index(key)
        name = self.names[i]
        del self.keys[i], self.names[i], self.ids[i]
        for line in self.cells:
            del line[i]
        return [name]


def _width(cells: list[list[str]], i: int, is_id: bool) -> int:
    """The width column i needs to read well: ids whole, other values up to 20 characters."""
    longest = max((len(line[i]) for line in cells), default=0)
    return longest if is_id else min(longest, 20)


def _short_ids(values: Sequence[Any]) -> dict[UUID, str]:
    """Each UUID among values as its first SHORT_ID hex digits, or as many more as it takes
    to tell apart the ones shown."""
    uuids = {value for value in values if isinstance(value, UUID)}
    length = SHORT_ID
    while len({u.hex[:length] for u in uuids}) < len(uuids):
        length += 1
    return {u: u.hex[:length] for u in uuids}


def line(text: str) -> None:
    """A line of data on stdout; on a terminal, wrapped between words to fit it."""
    if sys.stdout.isatty():
        from rich.text import Text

        _console(sys.stdout).print(Text(text))
    else:
        typer.echo(text)


def details(pairs: Mapping[str, Any], *, err: bool = False) -> None:
    """Print one record as aligned "name: value" lines."""
    width = max((len(name) for name in pairs), default=0)
    for name, value in pairs.items():
        typer.echo(f"{name + ':':<{width + 1}} {cell(value)}", err=err)


def _console(stream: TextIO) -> Console:
    from rich.console import Console

    # NO_COLOR (https://no-color.org): present and not empty turns colour off.
    return Console(file=stream, no_color=bool(os.environ.get("NO_COLOR")), highlight=False)
