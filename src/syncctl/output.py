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
from typing import Any, TextIO
from uuid import UUID

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from tabulate import tabulate

from syncctl.durations import format_time

# A column list: row keys, or key -> header.
Columns = Sequence[str] | Mapping[str, str]


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
) -> None:
    """Print rows as a table: rich on a terminal, plain text otherwise (pipes, files)."""
    headers = dict(columns) if isinstance(columns, Mapping) else {c: c for c in columns}
    stream: TextIO = sys.stderr if err else sys.stdout
    cells = [[cell(row.get(key)) for key in headers] for row in rows]
    if stream.isatty():
        _rich_table(stream, rows, headers, cells, title)
        return
    if title:
        typer.echo(title, err=err)
    typer.echo(tabulate(cells, headers=list(headers.values()), disable_numparse=True), err=err)


def _rich_table(
    stream: TextIO,
    rows: Sequence[Mapping[str, Any]],
    headers: dict[str, str],
    cells: list[list[str]],
    title: str | None,
) -> None:
    console = _console(stream)
    ids = [any(isinstance(row.get(key), UUID) for row in rows) for key in headers]
    # Ids stay whole (operators copy them into the next command), short values such as
    # statuses and times too, when the table fits the terminal; else every column folds.
    widths = [
        36 if is_id else min(max((len(line[i]) for line in cells), default=0), 20)
        for i, is_id in enumerate(ids)
    ]
    needed = [
        max(width, *(len(word) for word in header.split()))
        for width, header in zip(widths, headers.values(), strict=True)
    ]
    fits = sum(width + 3 for width in needed) + 1 <= console.width
    rich_table = Table(title=title, title_justify="left")
    for header, is_id, width in zip(headers.values(), ids, widths, strict=True):
        if fits:
            rich_table.add_column(header, no_wrap=is_id, min_width=width)
        else:
            rich_table.add_column(header, overflow="fold")
    for line in cells:
        # Text, not str: values such as "[Errno 111]" must not be read as markup.
        rich_table.add_row(*(Text(value) for value in line))
    console.print(rich_table)


def details(pairs: Mapping[str, Any], *, err: bool = False) -> None:
    """Print one record as aligned "name: value" lines."""
    width = max((len(name) for name in pairs), default=0)
    for name, value in pairs.items():
        typer.echo(f"{name + ':':<{width + 1}} {cell(value)}", err=err)


def _console(stream: TextIO) -> Console:
    # NO_COLOR (https://no-color.org): present and not empty turns colour off.
    return Console(file=stream, no_color=bool(os.environ.get("NO_COLOR")), highlight=False)
