"""Output fits where it goes: rich tables on a terminal, plain tables in a pipe,
JSON with --json, data on stdout and messages on stderr."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys

import pytest

from fakes import CountOnly
from helpers import unconfigured_env
from syncctl.db import Connection
from syncctl.jobs import add_store, create_job

BOX = set("┏┓┗┛━┃│─┡┩╇")


def syncctl_env(database_url: str, **extra: str) -> dict[str, str]:
    return unconfigured_env(
        SYNCCTL_DATABASE_URL=database_url, TERM="xterm-256color", COLUMNS="120", **extra
    )


def on_a_terminal(args: list[str], env: dict[str, str]) -> str:
    """What `syncctl ARGS` prints to a terminal (a pseudo-terminal here)."""
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "syncctl", *args],
        stdout=follower,
        stderr=subprocess.PIPE,
        env=env,
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # the terminal closed: the command has exited
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    assert process.wait(timeout=60) == 0
    return b"".join(chunks).decode()


@pytest.fixture
def two_stores(conn: Connection) -> None:
    add_store(conn, name="Ann", email="ann@example.com")
    add_store(conn, name="Bob", email="bob@example.com")


@pytest.mark.usefixtures("two_stores")
def test_piped_output_is_a_plain_table(database_url: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "syncctl", "store", "list"],
        env=syncctl_env(database_url),
        capture_output=True,
        text=True,
        check=True,
    )
    lines = result.stdout.splitlines()
    assert lines[0].split()[:2] == ["id", "name"]
    assert set(lines[1]) <= {"-", " "}  # tabulate's rule under the header
    assert any("ann@example.com" in line for line in lines[2:])
    assert not BOX & set(result.stdout)
    assert "\x1b[" not in result.stdout


@pytest.mark.usefixtures("two_stores")
def test_terminal_output_is_a_rich_table(database_url: str) -> None:
    shown = on_a_terminal(["store", "list"], syncctl_env(database_url))
    assert BOX & set(shown)
    assert "ann@example.com" in shown


def colours(text: str) -> set[str]:
    """The SGR foreground colour codes (30-38, 90-97) in text."""
    found: set[str] = set()
    for sequence in re.findall(r"\x1b\[([0-9;]*)m", text):
        found.update(code for code in sequence.split(";") if re.fullmatch(r"3[0-8]|9[0-7]", code))
    return found


def test_no_color_leaves_out_colours_on_a_terminal(conn: Connection, database_url: str) -> None:
    add_store(conn, name="Ann", email="ann@example.com")
    # An empty mailbox: the job is completed at once, so --watch draws one frame and ends.
    job = create_job(conn, CountOnly(0), store_ref="ann@example.com")
    args = ["status", str(job.job_id), "--watch"]
    assert colours(on_a_terminal(args, syncctl_env(database_url)))
    shown = on_a_terminal(args, syncctl_env(database_url, NO_COLOR="1"))
    assert "completed" in shown
    assert not colours(shown)


@pytest.mark.usefixtures("two_stores")
def test_json_goes_to_stdout_alone(database_url: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "syncctl", "store", "list", "--json"],
        env=syncctl_env(database_url),
        capture_output=True,
        text=True,
        check=True,
    )
    stores = json.loads(result.stdout)["stores"]
    assert sorted(s["email"] for s in stores) == ["ann@example.com", "bob@example.com"]


def test_messages_go_to_stderr_and_leave_stdout_empty(database_url: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "syncctl", "store", "list"],
        env=syncctl_env(database_url),
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout == ""
    assert "No stores yet" in result.stderr
