"""Properties over hostile input, against real PostgreSQL and real HTTP.

The command line: whatever an operator or a script passes as a date, a
duration, a number, a job id, a store or an address, a value that is not valid
exits 2 with one sentence on stderr and changes no row.

Graph: a page with missing or mistyped fields, huge bodies, NUL and lone
surrogate escapes, or bytes that are not UTF-8 is either stored whole, each
message once and its text cleaned, or refused whole as not valid Graph JSON;
and a next page link to another origin is refused before any request is sent
there with the token.
"""

from __future__ import annotations

import builtins
import itertools
import json
import math
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from enum import Enum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from uuid import UUID

import httpx
import psycopg.errors
import pytest
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from helpers import quick_graph_settings
from syncctl import cli, jobs, queue
from syncctl.config import DatabaseTarget
from syncctl.db import Connection
from syncctl.fakegraph import FakeGraphServer
from syncctl.graph import GraphMailSource
from syncctl.ingest import write_page
from syncctl.mailsource import MailSourceError, Message, Window
from test_cli import new_job, one_line_error, snapshot
from test_ingest import LEASE, T0, claimed_chunk

# Deterministic for CI, no example database left in the checkout, and fixtures
# that are set up once per test rather than per example (a fresh database each).
_SETTINGS: dict[str, Any] = {
    "deadline": None,
    "derandomize": True,
    "database": None,
    "suppress_health_check": [
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
}

# -- the command line -----------------------------------------------------------

PG_INTEGER = 2**31 - 1  # the largest PostgreSQL integer (chunk size, attempts, priority)
LONGEST_SECONDS = 36_500 * 86_400  # the longest duration syncctl takes
STORES = ("a@example.com", "b@example.com", "c@example.com")


class Job(Enum):
    """A job of the seeded database, named in a command line before its id is known."""

    ACTIVE = "active"  # a@example.com: processing, 3 chunks, one of them stuck
    DONE = "done"  # b@example.com: completed eight days ago


@dataclass(frozen=True)
class Case:
    """One command line that must be refused, and what its one sentence must say."""

    command: tuple[str, ...]
    options: tuple[str, ...] = ()
    arguments: tuple[str | Job, ...] = ()  # positional, after `--`
    complaint: str = ""


Refuse = Callable[[Case], None]


@pytest.fixture
def world(conn: Connection) -> dict[Job, UUID]:
    """Rows that a command given valid input would change: an active job with a
    stuck chunk and stored mail, an old finished job, a store without a job."""
    active = new_job(conn, "a@example.com")
    done = new_job(conn, "b@example.com", messages=0)
    jobs.add_store(conn, name="c", email="c@example.com")
    chunk = queue.claim_chunk(conn, worker_id="w1", lease=LEASE)
    assert chunk is not None
    assert chunk.parent_sync_job_id == active
    mail = [Message(f"seeded-{n}", T0, subject=f"seeded {n}") for n in range(2)]
    write_page(conn, chunk, mail, checkpoint={"read": 2}, lease=LEASE)
    conn.execute(
        "UPDATE chunked_sync_jobs SET started_at = now() - interval '10 minutes' WHERE id = %s",
        [chunk.id],
    )
    conn.execute(
        "UPDATE sync_queue SET created_at = now() - interval '8 days' WHERE id = %s", [done]
    )
    return {Job.ACTIVE: active, Job.DONE: done}


@pytest.fixture
def unconfigured(monkeypatch: pytest.MonkeyPatch) -> None:
    """No syncctl configuration in the environment, and no mail service to open."""
    for name in [n for n in os.environ if n.startswith("SYNCCTL_")]:
        monkeypatch.delenv(name)
    for name in ("DATABASE_URL", "NO_COLOR"):
        monkeypatch.delenv(name, raising=False)

    def no_mail(target: DatabaseTarget, **_: object) -> None:
        raise AssertionError("bad input must be refused before the mail service is opened")

    monkeypatch.setattr(cli, "_mail_source", no_mail)


@pytest.fixture
def refused(
    database_url: str, conn: Connection, world: dict[Job, UUID], unconfigured: None
) -> Refuse:
    """Check that a command line exits 2 with one sentence and changes no row."""
    runner = CliRunner()

    def check(case: Case) -> None:
        arguments = [str(world[a]) if isinstance(a, Job) else a for a in case.arguments]
        argv = [*case.command, *case.options, f"--database-url={database_url}"]
        if arguments:
            argv += ["--", *arguments]
        before = snapshot(conn)

        result = runner.invoke(cli.app, argv)

        assert result.exit_code == 2, (argv, result.output)
        line = one_line_error(result)
        assert case.complaint in line, (argv, line)
        assert line.endswith("."), line
        values = [option.partition("=")[2] for option in case.options] + arguments
        assert not _EXCEPTION_NAME.search(_without(line, values)), line
        assert result.stdout == ""
        assert snapshot(conn) == before
        event(f"{' '.join(case.command)}: {case.complaint}")

    return check


# Names of exception classes, which a sentence for a person never shows.
_EXCEPTION_NAMES = {
    name
    for module in (builtins, psycopg.errors, httpx)
    for name, value in vars(module).items()
    if isinstance(value, type) and issubclass(value, BaseException)
} | {"Traceback", "BadInput", "SyncctlError", "MailSourceError", "Abort", "Exit"}
_EXCEPTION_NAME = re.compile(r"\b(?:" + "|".join(sorted(_EXCEPTION_NAMES)) + r")\b")


def _without(line: str, values: list[str]) -> str:
    """The line without the values it quotes (which may say anything), as syncctl
    shows them: quoted or not, stripped, whitespace runs made one space."""
    for value in sorted(values, key=len, reverse=True):
        for form in (repr(value), repr(value.strip()), value.strip(), value):
            shown = " ".join(form.split())
            if shown:
                line = line.replace(shown, "")
    return line


# Hostile text: quotes, SQL, format strings, RTL and emoji, control characters
# (no NUL: a command line cannot hold one), long runs, numbers, blanks.
_NO_NUL = st.characters(codec="utf-8", exclude_characters="\x00")
_FRAGMENTS = (
    "'",
    '"',
    "`",
    ";",
    "';--",
    "'); DROP TABLE stores; --",
    "1; DELETE FROM sync_queue",
    "' OR '1'='1",
    "$$; TRUNCATE emails; $$",
    "\\",
    "%s",
    "%(email)s",
    "{}",
    "{0!r}",
    "$(id)",
    "\u202eevil\u202c",
    "\u200f\u05e9\u05dc\u05d5\u05dd",
    "\u0645\u0631\u062d\u0628\u0627",
    "\U0001f600",
    "\U0001f469\u200d\U0001f469\u200d\U0001f467",
    "\ufeff",
    "\u200b",
    "\x1b[31m",
    "\x07",
    "\x7f",
    "\r\n",
    "\t",
    "-",
    "--",
    "--help",
    "-v",
    "@",
    "0",
    "-1",
    "1e309",
    "NaN",
    "\u0663",
    "\u216b",
)
_BLANKS = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u2028\u2029\u202f\u205f\u3000"
blank = st.text(st.sampled_from(_BLANKS), max_size=5)
_piece = st.one_of(st.text(_NO_NUL, max_size=20), st.sampled_from(_FRAGMENTS))
words = st.one_of(
    st.lists(_piece, max_size=4).map("".join),
    # Long: up to 4000 characters.
    st.tuples(
        st.one_of(st.sampled_from(_FRAGMENTS), st.text(_NO_NUL, min_size=1, max_size=6)),
        st.integers(100, 3000),
    ).map(lambda t: (t[0] * t[1])[:4000]),
    blank,
)
numbers = st.one_of(
    st.integers().map(str),
    st.integers(min_value=10**15, max_value=10**60).map(str),
    st.integers(min_value=10**15, max_value=10**60).map(lambda n: f"-{n}"),
    st.floats().map(repr),
)
hostile = st.one_of(words, numbers)


def _is_uuid(text: str) -> bool:
    try:
        UUID(text.strip())
    except ValueError:
        return False
    return True


def _duration_seconds(text: str) -> int | None:
    """Seconds of a duration as the README writes them (90s, 5m, 2h, 7d, 1h30m); None if none."""
    cleaned = text.strip().lower()
    if not re.fullmatch(r"(?:\d+[smhd])+", cleaned):
        return None
    unit = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
    return sum(int(n) * unit[u] for n, u in re.findall(r"(\d+)([smhd])", cleaned))


def _bad_duration(text: str) -> bool:
    seconds = _duration_seconds(text)
    return seconds is None or seconds > LONGEST_SECONDS


def _is_date(text: str) -> bool:
    try:
        datetime.fromisoformat(text.strip())
    except ValueError:
        return False
    return True


too_long = st.one_of(
    st.integers(36_501, 10**12).map(lambda n: f"{n}d"),
    st.integers(LONGEST_SECONDS + 1, 10**15).map(lambda n: f"{n}s"),
    st.integers(1, 10**6).map(lambda n: f"36500d{n}s"),
    st.integers(36_500 * 24 + 1, 10**8).map(lambda n: f" {n}H "),
)
bad_duration = st.one_of(hostile.filter(_bad_duration), too_long)
# Valid durations, but shorter than a lease may be.
too_short_lease = st.lists(
    st.tuples(st.integers(0, 1), st.sampled_from("sS")), min_size=1, max_size=4
).map(lambda parts: "".join(f"{n}{u}" for n, u in parts))

_DURATION_OPTIONS = (
    (("list-stuck",), "--older-than"),
    (("list-stuck", "--check"), "--older-than"),
    (("reset-stuck", "--yes"), "--older-than"),
    (("cleanup", "--yes"), "--older-than"),
    (("success-rate",), "--since"),
    (("problem-stores", "--check"), "--since"),
    (("run", "--drain"), "--lease"),
    (("run-worker",), "--lease"),
)


@st.composite
def duration_cases(draw: st.DrawFn) -> Case:
    command, option = draw(st.sampled_from(_DURATION_OPTIONS))
    value = draw(bad_duration if option != "--lease" else bad_duration | too_short_lease)
    return Case(command, (f"{option}={value}",), complaint=option)


@settings(max_examples=45, **_SETTINGS)
@given(case=duration_cases())
def test_a_bad_duration_exits_2_with_one_sentence_and_changes_nothing(
    refused: Refuse, case: Case
) -> None:
    refused(case)


bad_date = st.one_of(
    hostile,
    st.sampled_from(
        [
            "2024-02-30",
            "2023-02-29",
            "2024-13-01",
            "2024-00-10",
            "2024-01-01T24:00:01",
            "2024-01-01T12:00:00+24:00",
            "2024-1-1",
            "31/01/2024",
            "yesterday",
            "now",
            "1706745600",
            "2024-01-01; DROP TABLE stores",
        ]
    ),
).filter(lambda text: not _is_date(text))
_ZONES = [
    UTC,
    timezone(timedelta(hours=5, minutes=30)),
    timezone(timedelta(hours=-8)),
    timezone(timedelta(hours=14)),
    timezone(-timedelta(hours=23, minutes=59)),
]
_moment = st.datetimes(
    min_value=datetime(1900, 1, 1),
    max_value=datetime(2200, 1, 1),
    timezones=st.none() | st.sampled_from(_ZONES),
)


@st.composite
def reversed_window(draw: st.DrawFn) -> Case:
    """--from at or after --to, each written in its own zone (or none: UTC)."""
    to = draw(_moment)
    later = draw(st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=36_500)))
    start = (to if to.tzinfo else to.replace(tzinfo=UTC)) + later
    start = start.astimezone(draw(st.sampled_from(_ZONES)))
    written = draw(st.sampled_from([start.isoformat(), start.isoformat(sep=" ")]))
    return Case(
        ("create",), (f"--from={written}", f"--to={to.isoformat()}"), ("c@example.com",), "swap"
    )


date_cases = st.one_of(
    bad_date.map(lambda d: Case(("create",), (f"--from={d}",), ("c@example.com",), "--from")),
    bad_date.map(lambda d: Case(("create",), (f"--to={d}",), ("c@example.com",), "--to")),
    reversed_window(),
    # A start in the future: the window ends now.
    st.datetimes(min_value=datetime(2100, 1, 1), max_value=datetime(9000, 1, 1)).map(
        lambda d: Case(("create",), (f"--from={d.isoformat()}",), ("c@example.com",), "swap")
    ),
)


@settings(max_examples=45, **_SETTINGS)
# An empty value once meant "no --from": the whole mailbox.
@example(case=Case(("create",), ("--from=",), ("c@example.com",), "--from"))
@example(case=Case(("create",), ("--to=",), ("c@example.com",), "--to"))
@given(case=date_cases)
def test_a_bad_date_or_window_exits_2_with_one_sentence_and_changes_nothing(
    refused: Refuse, case: Case
) -> None:
    refused(case)


not_positive = st.integers(max_value=0) | st.integers(min_value=-(10**30), max_value=-(10**15))


def _create(option: str, complaint: str) -> Callable[[object], Case]:
    return lambda value: Case(("create",), (f"{option}={value}",), ("c@example.com",), complaint)


def _run(command: str, option: str, complaint: str) -> Callable[[object], Case]:
    return lambda value: Case((command,), (f"{option}={value}",), complaint=complaint)


number_cases = st.one_of(
    not_positive.map(_create("--chunk-size", "--chunk-size must be at least 1")),
    st.integers(min_value=PG_INTEGER + 1).map(_create("--chunk-size", "--chunk-size")),
    not_positive.map(_create("--max-attempts", "--max-attempts must be at least 1")),
    st.integers(min_value=PG_INTEGER + 1).map(_create("--max-attempts", "--max-attempts")),
    (st.integers(max_value=-PG_INTEGER - 2) | st.integers(min_value=PG_INTEGER + 1)).map(
        _create("--priority", "--priority")
    ),
    (st.integers(max_value=0) | st.integers(min_value=5)).map(
        _create("--parallel", "--parallel must be from 1 to 4")
    ),
    blank.map(_create("--type", "--type is empty")),
    not_positive.map(_run("run", "--concurrency", "--concurrency must be at least 1")),
    not_positive.map(_run("run-worker", "--concurrency", "--concurrency must be at least 1")),
    (st.integers(max_value=0) | st.integers(min_value=65_536)).map(
        _run("run", "--metrics-port", "--metrics-port")
    ),
    blank.map(_run("run", "--worker-id", "--worker-id is empty")),
    (st.floats(max_value=0, exclude_max=True) | st.floats(min_value=100, exclude_min=True))
    .map(repr)
    .map(lambda rate: Case(("success-rate", "--check"), (f"--min-rate={rate}",), (), "0 to 100")),
    st.just(math.nan).map(
        lambda rate: Case(("success-rate", "--check"), (f"--min-rate={rate}",), (), "0 to 100")
    ),
    st.floats().map(
        lambda rate: Case(("success-rate",), (f"--min-rate={rate!r}",), (), "only with --check")
    ),
    st.just(Case(("success-rate", "--check"), complaint="--check needs --min-rate")),
)


@settings(max_examples=60, **_SETTINGS)
# Once accepted, then refused by PostgreSQL (exit 3), or stored and unreadable by `status`.
@example(case=_create("--chunk-size", "--chunk-size")(PG_INTEGER + 1))
@example(case=_create("--max-attempts", "--max-attempts")(PG_INTEGER + 1))
@example(case=_create("--priority", "--priority")(PG_INTEGER + 1))
@example(case=_create("--priority", "--priority")(-PG_INTEGER - 2))
@given(case=number_cases)
def test_an_out_of_range_number_exits_2_with_one_sentence_and_changes_nothing(
    refused: Refuse, case: Case
) -> None:
    refused(case)


not_a_job_id = hostile.filter(lambda text: not _is_uuid(text))
unknown_job = st.uuids().flatmap(
    lambda u: st.sampled_from(
        [str(u), str(u).upper(), f"{{{u}}}", u.hex, f"urn:uuid:{u}", f" \t{u}\n"]
    )
)
_JOB_COMMANDS = st.sampled_from(["status", "retry", "cancel"])

job_cases = st.one_of(
    st.tuples(_JOB_COMMANDS, not_a_job_id).map(lambda t: Case((t[0],), (), (t[1],), "job id")),
    st.tuples(_JOB_COMMANDS, unknown_job).map(lambda t: Case((t[0],), (), (t[1],), "No job")),
    st.tuples(st.integers(), unknown_job).map(
        lambda t: Case(("retry",), (f"--chunk={t[0]}",), (t[1],), "No job")
    ),
    # Chunk 1 is processing, 2 and 3 pending, none other exists: none can be retried.
    st.integers().map(lambda n: Case(("retry",), (f"--chunk={n}",), (Job.ACTIVE,), "chunk")),
    st.just(Case(("retry",), (), (Job.ACTIVE,), "no failed or cancelled chunk")),
    st.just(Case(("cancel",), (), (Job.DONE,), "already completed")),
    st.one_of(unknown_job, st.just(Job.ACTIVE)).map(
        lambda job: Case(("status", "--watch", "--json"), (), (job,), "--watch")
    ),
    st.just(Case(("status", "--watch", "--json"), complaint="--watch")),
)


@settings(max_examples=45, **_SETTINGS)
@given(case=job_cases)
def test_a_bad_job_reference_exits_2_with_one_sentence_and_changes_nothing(
    refused: Refuse, case: Case
) -> None:
    refused(case)


_addressish = st.tuples(hostile, hostile).map(lambda t: f"{t[0]}@{t[1]}")
_registered = st.sampled_from(STORES).flatmap(
    lambda email: st.sampled_from([email, email.upper(), f" {email.title()}\t"])
)


def _store_add_complaint(name: str, email: str, business: str | None) -> str | None:
    """What `store add` must refuse, in the order the README's rules apply; None: valid."""
    address = email.strip()
    if business is not None and not _is_uuid(business):
        return "--business takes a UUID"
    if "@" not in address or address.startswith("@") or address.endswith("@"):
        return "is not a mailbox address"
    if not name.strip():
        return "store name is empty"
    if address.lower() in STORES:
        return "exists already"
    return None


@st.composite
def store_add_cases(draw: st.DrawFn) -> Case:
    name = draw(st.one_of(hostile, blank, st.just("Sales")))
    email = draw(st.one_of(hostile, _addressish, _registered))
    business = draw(st.one_of(st.none(), hostile, st.uuids().map(str)))
    complaint = _store_add_complaint(name, email, business)
    assume(complaint is not None)
    assert complaint is not None
    options: tuple[str, ...] = (f"--name={name}", f"--email={email}")
    if business is not None:
        options += (f"--business={business}",)
    return Case(("store", "add"), options, complaint=complaint)


def _create_complaint(reference: str) -> str | None:
    """What `create STORE` must refuse before counting the mailbox; None: it would count."""
    ref = reference.strip()
    if "@" in ref:
        if ref.lower() == "a@example.com":
            return "already has a processing job"
        return None if ref.lower() in STORES else "No store"
    return "No store" if _is_uuid(ref) else "neither a store id"


@st.composite
def create_cases(draw: st.DrawFn) -> Case:
    reference = draw(st.one_of(hostile, _addressish, _registered, unknown_job))
    complaint = _create_complaint(reference)
    assume(complaint is not None)
    assert complaint is not None
    return Case(("create",), (), (reference,), complaint)


@settings(max_examples=60, **_SETTINGS)
@given(case=st.one_of(store_add_cases(), create_cases()))
def test_a_bad_store_or_address_exits_2_with_one_sentence_and_changes_nothing(
    refused: Refuse, case: Case
) -> None:
    refused(case)


# Text that no reading makes a number: not even a digit of another script, nan or inf.
not_a_number = words.filter(
    lambda text: (
        not any(c.isdecimal() or c.isdigit() or c.isnumeric() for c in text)
        and text.strip().lower().lstrip("+-") not in ("nan", "inf", "infinity")
    )
)
_NUMERIC_OPTIONS = (
    (("create",), "--chunk-size", ("c@example.com",)),
    (("create",), "--max-attempts", ("c@example.com",)),
    (("create",), "--priority", ("c@example.com",)),
    (("create",), "--parallel", ("c@example.com",)),
    (("run",), "--concurrency", ()),
    (("run-worker",), "--metrics-port", ()),
    (("success-rate", "--check"), "--min-rate", ()),
    (("retry",), "--chunk", (Job.ACTIVE,)),
)


@settings(max_examples=30, **_SETTINGS)
@given(where=st.sampled_from(_NUMERIC_OPTIONS), value=not_a_number)
def test_text_for_a_number_is_a_usage_error_that_changes_nothing(
    *,
    database_url: str,
    conn: Connection,
    world: dict[Job, UUID],
    unconfigured: None,
    where: tuple[tuple[str, ...], str, tuple[str | Job, ...]],
    value: str,
) -> None:
    # The framework parses numbers and reports its own usage error (several lines
    # with the usage); test_usage_errors_stay_exit_2 holds it to exit 2 only.
    command, option, arguments = where
    argv = [*command, f"{option}={value}", f"--database-url={database_url}"]
    argv += ["--", *(str(world[a]) if isinstance(a, Job) else a for a in arguments)]
    before = snapshot(conn)

    result = CliRunner().invoke(cli.app, argv)

    assert result.exit_code == 2, (argv, result.output)
    assert "Traceback" not in result.output
    assert result.stdout == ""
    assert option in result.stderr
    assert snapshot(conn) == before


# -- Graph pages over HTTP ------------------------------------------------------

TOKEN = "graph-token-7c1d0e55"  # noqa: S105 - made up
MAILBOX = "megan@contoso.com"
WHOLE = Window(None, None)
_stores = itertools.count()


@pytest.fixture
def graph() -> Iterator[tuple[FakeGraphServer, GraphMailSource]]:
    with (
        FakeGraphServer({MAILBOX: 5}, token=TOKEN) as server,
        GraphMailSource(quick_graph_settings(server.url, TOKEN)) as source,
    ):
        yield server, source


# Every code point, NUL and lone surrogates included, and the troublesome ones often.
_ANY_CHAR = st.characters(codec=None, exclude_categories=())
_TRICKY = st.sampled_from(
    [
        "\x00",
        "\ud800",
        "\udfff",
        "\ud83d",
        "\ude00",
        "\ud83d\ude00",
        "\\",
        "\\u0000",
        "\\ud800",
        '"',
        "\u202e",
        "\U0001f600",
        "\x7f",
        "\n",
    ]
)
nasty = st.lists(st.one_of(st.text(_ANY_CHAR, max_size=8), _TRICKY), max_size=5).map("".join)


def _repeated(unit: str, size: int) -> str:
    """unit repeated to about `size` bytes of JSON."""
    per_unit = max(1, len(json.dumps(unit)) - 2)
    return unit * max(0, size // per_unit)


# Bodies of up to about a megabyte of JSON.
huge = st.tuples(
    st.one_of(st.sampled_from(["x", "\u00e9", "\U0001f600", "\x00", "\ud800"]), nasty),
    st.one_of(st.integers(100_000, 1_050_000), st.sampled_from([65_536, 1_048_576])),
).map(lambda t: _repeated(*t))

odd = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        nasty,
    ),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(nasty, inner, max_size=3),
    max_leaves=6,
)


def _or_odd(proper: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(proper, odd)


_address = st.fixed_dictionaries({}, optional={"name": _or_odd(nasty), "address": _or_odd(nasty)})
_recipient = st.fixed_dictionaries({"emailAddress": _or_odd(_address)})
_recipients = _or_odd(st.lists(_or_odd(_recipient), max_size=3))
_time = _or_odd(
    st.datetimes(timezones=st.none() | st.sampled_from(_ZONES)).map(lambda d: d.isoformat())
)
_flag = _or_odd(st.booleans() | st.sampled_from(["true", "false", "TRUE", "yes"]))
# A message id: text of any kind (the same one twice in a page, now and then).
_id = st.one_of(
    st.tuples(nasty, st.text(_ANY_CHAR.filter(lambda c: c != "\x00"), min_size=1, max_size=3)).map(
        "".join
    ),
    st.uuids().map(str),
    st.sampled_from(["AAMkAG-1", "AAMkAG-2"]),
)
_body = st.fixed_dictionaries(
    {},
    optional={
        "contentType": _or_odd(st.sampled_from(["html", "text"]) | nasty),
        "content": _or_odd(nasty),
    },
)
_message = st.fixed_dictionaries(
    {"id": _id},
    optional={
        "receivedDateTime": _time,
        "sentDateTime": _time,
        "subject": _or_odd(nasty),
        "internetMessageId": _or_odd(nasty),
        "conversationId": _or_odd(nasty),
        "importance": _or_odd(st.sampled_from(["low", "normal", "high"]) | nasty),
        "isRead": _flag,
        "isDraft": _flag,
        "hasAttachments": _flag,
        "from": _or_odd(_recipient),
        "sender": _or_odd(_recipient),
        "toRecipients": _recipients,
        "ccRecipients": _recipients,
        "bccRecipients": _recipients,
        "flag": _or_odd(st.fixed_dictionaries({}, optional={"flagStatus": _or_odd(nasty)})),
        "body": _or_odd(_body),
        "@odata.etag": odd,
    },
)
# Not a message: no id, an id that is not text or is empty once cleaned, not an object.
_not_a_message = st.one_of(
    odd,
    _message.map(lambda m: {k: v for k, v in m.items() if k != "id"}),
    st.tuples(
        _message,
        odd.filter(lambda v: not isinstance(v, str)) | st.sampled_from(["", "\x00", "\x00\x00"]),
    ).map(lambda t: {**t[0], "id": t[1]}),
)
_CONTEXT = f"https://graph.microsoft.com/v1.0/$metadata#users('{MAILBOX}')/messages"
# Bytes that are not UTF-8: a stray continuation, a lead byte cut short, an
# encoded surrogate, an overlong form, bytes UTF-8 never uses.
_NOT_UTF8 = [b"\x80", b"\xbf", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80", b"\xc0\xaf", b"\xfe", b"\xff"]
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


@st.composite
def payloads(draw: st.DrawFn) -> bytes:
    """A Graph list answer's body: JSON as Graph writes it (escapes, or UTF-8 with
    lone surrogates escaped), mostly a page of odd messages, some of them huge;
    else with an item that is no message, not a page at all, or damaged bytes."""
    kind = draw(
        st.sampled_from(
            ["page", "page", "page", "page", "no message", "not a page", "not utf-8", "cut"]
        )
    )
    messages: list[Any] = draw(st.lists(_message, max_size=4))
    if draw(st.booleans()) and messages:
        body = messages[0].get("body")
        body = {**(body if isinstance(body, dict) else {}), "content": draw(huge)}
        messages[0] = {**messages[0], "body": body}
    if kind == "no message":
        at = draw(st.integers(0, len(messages)))
        messages.insert(at, draw(_not_a_message))
    document: Any = {"@odata.context": _CONTEXT, "value": messages}
    if draw(st.booleans()):
        document["@odata.nextLink"] = draw(st.one_of(st.none(), nasty))
    if kind == "not a page":
        document = draw(
            st.one_of(
                odd,
                st.fixed_dictionaries({"value": odd}),
                odd.filter(lambda v: v is not None and not isinstance(v, str)).map(
                    lambda link: {**document, "@odata.nextLink": link}
                ),
            )
        )
    if draw(st.booleans()):
        data = json.dumps(document).encode("ascii")
    else:
        text = json.dumps(document, ensure_ascii=False)
        # A lone surrogate cannot be UTF-8: Graph sends it escaped.
        text = _LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
        data = text.encode("utf-8")
    if kind == "not utf-8":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.sampled_from(_NOT_UTF8)) + data[at:]
    elif kind == "cut":
        data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
    return data


def _cleaned(value: Any) -> Any:
    """A JSON value as PostgreSQL can hold it: in every string (keys too) a high
    and low surrogate next to each other are one character, each NUL is dropped
    and each lone surrogate is U+FFFD; an object keeps the last of equal keys."""
    if isinstance(value, str):
        paired = value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")
        return _LONE_SURROGATE.sub("\ufffd", paired.replace("\x00", ""))
    if isinstance(value, list):
        return [_cleaned(v) for v in value]
    if isinstance(value, dict):
        cleaned: dict[str, Any] = {}
        for key, item in value.items():
            cleaned[_cleaned(key)] = _cleaned(item)
        return cleaned
    return value


@dataclass(frozen=True)
class Stored:
    """The text of a message as it must be stored."""

    subject: str | None
    body: str | None
    body_content_type: str | None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _expected(data: bytes) -> list[tuple[str, Stored]] | None:
    """(id, text) of each message of the page in order, or None when it is not a
    Graph page: not UTF-8, not JSON, no list of messages, an item without an id."""
    try:
        document = _cleaned(json.loads(data.decode("utf-8")))
    except ValueError:
        return None
    if not isinstance(document, dict) or not isinstance(document.get("value"), list):
        return None
    link = document.get("@odata.nextLink")
    if link is not None and not isinstance(link, str):
        return None
    messages = []
    for item in document["value"]:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str) or not item["id"]:
            return None
        body: Any = item.get("body")
        if not isinstance(body, dict):
            body = {}
        stored = Stored(
            _text(item.get("subject")), _text(body.get("content")), _text(body.get("contentType"))
        )
        messages.append((item["id"], stored))
    return messages


def _clean_everywhere(value: Any) -> bool:
    """No NUL and no lone surrogate in any string of value."""
    if isinstance(value, str):
        return "\x00" not in value and not _LONE_SURROGATE.search(value)
    if isinstance(value, list | tuple):
        return all(_clean_everywhere(v) for v in value)
    if isinstance(value, dict):
        return all(_clean_everywhere(k) and _clean_everywhere(v) for k, v in value.items())
    return True


@settings(max_examples=60, **_SETTINGS)
@given(data=payloads())
def test_a_hostile_page_is_stored_whole_and_clean_or_refused_whole(
    graph: tuple[FakeGraphServer, GraphMailSource], conn: Connection, data: bytes
) -> None:
    server, source = graph
    chunk = claimed_chunk(conn, f"store-{next(_stores)}@contoso.com")
    expected = _expected(data)
    server.fail_next(200, body=data)  # the next request is answered with this page

    try:
        page = source.fetch_page(MAILBOX, WHOLE, skip=0, top=10)
    except MailSourceError as exc:
        refusal: MailSourceError | None = exc
    else:
        refusal = None
        write_page(conn, chunk, page.messages, checkpoint={"next": page.next_link}, lease=LEASE)

    rows = conn.execute(
        "SELECT * FROM emails WHERE sync_job_id = %s", [chunk.parent_sync_job_id]
    ).fetchall()
    state = conn.execute(
        "SELECT checkpoint, emails_synced FROM chunked_sync_jobs WHERE id = %s", [chunk.id]
    ).fetchone()
    conn.execute("DELETE FROM emails WHERE store_id = %s", [chunk.store_id])
    assert state is not None
    event("refused whole" if expected is None else f"stored {len(rows)} message(s)")
    event(f"answer of {'over' if len(data) > 100_000 else 'under'} 100 kB")
    if expected is None:
        assert refusal is not None, "a page that is not Graph JSON was accepted"
        message = str(refusal)
        assert "not valid Graph JSON" in message
        assert len(message.splitlines()) == 1, message
        assert message.endswith("."), message
        assert TOKEN not in message
        assert refusal.permanent is False
        assert rows == []
        assert not state["checkpoint"]
        assert state["emails_synced"] == 0
        return
    assert refusal is None, f"a Graph page was refused: {refusal}"
    assert [m.provider_message_id for m in page.messages] == [i for i, _ in expected]
    # Each message once: a message twice in a page is stored once, as it came last.
    last = dict(expected)
    stored = {
        row["provider_message_id"]: Stored(row["subject"], row["body"], row["body_content_type"])
        for row in rows
    }
    assert len(rows) == len(last)
    assert stored == last
    for row in rows:
        assert _clean_everywhere(dict(row)), row
    assert state["emails_synced"] == len(page.messages)


# -- next links to another origin -------------------------------------------------


class _ElsewhereServer(ThreadingHTTPServer):
    """The other host: counts every connection, keeps every Authorization header."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ElsewhereHandler)
        self.lock = threading.Lock()
        self.connections = 0
        self.authorizations: list[str] = []

    def forget(self) -> None:
        with self.lock:
            self.connections = 0
            self.authorizations.clear()

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class _ElsewhereHandler(BaseHTTPRequestHandler):
    server: _ElsewhereServer

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections += 1

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.authorizations.append(self.headers.get("Authorization", ""))
        # A page a client would gladly take.
        body = b'{"value": [{"id": "stolen"}]}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def elsewhere() -> Iterator[_ElsewhereServer]:
    server = _ElsewhereServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


@st.composite
def links_elsewhere(draw: st.DrawFn, ours: int, other: int) -> str:
    """A next link at the other server, its scheme, host and port written many ways,
    or one that starts like ours and is not (or is, past a #, ? or /)."""
    path = f"/v1.0/users/{MAILBOX}/messages"
    tail = draw(st.text(st.sampled_from("abc/?#&=%.:;@\\~-_09"), max_size=12))
    if draw(st.booleans()):
        separator = draw(
            st.sampled_from(["\\", "%5C", "%2F", ":", ";", ",", "%40", "@", "#@", "?@", "/@"])
        )
        return f"http://127.0.0.1:{ours}{separator}@127.0.0.1:{other}{path}{tail}"
    scheme = draw(st.sampled_from(["http", "https", "HTTP", "hTTp", "ftp", "ws", ""]))
    userinfo = draw(st.sampled_from(["", "u@", "u:p@", f"127.0.0.1:{ours}@"]))
    host = draw(
        st.sampled_from(
            [
                "127.0.0.1",
                "localhost",
                "LocalHost",
                "127.1",
                "127.0.0.1.",
                "[::1]",
                "[::ffff:127.0.0.1]",
                "2130706433",
                "0x7f000001",
            ]
        )
    )
    port = draw(st.sampled_from([f":{other}", f":0{other}", ""]))
    return f"{scheme}://{userinfo}{host}{port}{path}{tail}"


def _destination(link: str) -> tuple[str, str, int | None] | None:
    """Where the HTTP client would send a request for link; None if it cannot."""
    try:
        url = httpx.URL(link)
    except httpx.InvalidURL:
        return None
    default = {"http": 80, "https": 443}.get(url.scheme)
    return url.scheme, url.host, url.port or default


@settings(max_examples=60, **_SETTINGS)
@given(data=st.data())
def test_a_next_link_to_another_origin_is_refused_and_never_gets_the_token(
    graph: tuple[FakeGraphServer, GraphMailSource], elsewhere: _ElsewhereServer, data: st.DataObject
) -> None:
    server, source = graph
    elsewhere.forget()
    link = data.draw(links_elsewhere(server.port, elsewhere.port), label="link")
    server.fail_next(200, body=json.dumps({"value": [], "@odata.nextLink": link}).encode())
    first = source.fetch_page(MAILBOX, WHOLE, skip=0, top=10)
    assert first.next_link == link
    server.reset_record()

    with pytest.raises(MailSourceError) as failed:
        source.fetch_page(MAILBOX, WHOLE, skip=0, top=10, next_link=first.next_link)

    assert elsewhere.connections == 0, elsewhere.authorizations
    event("sent to our own server" if server.requests else "refused before any request")
    if _destination(link) != ("http", "127.0.0.1", server.port):
        assert failed.value.permanent is True
        assert "not sending credentials there" in str(failed.value)
        assert server.requests == []  # refused before any request
