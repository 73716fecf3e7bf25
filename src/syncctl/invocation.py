"""How to type syncctl in the shell that ran it, for hints that name commands."""

from __future__ import annotations

import os
import shlex
import shutil
import sys


def command_name() -> str:
    """`syncctl` when that name on PATH is this syncctl; else the way this one
    was started (`.venv/bin/syncctl`, or `python -m syncctl` with its path),
    so a hint can be pasted as it is."""
    started = sys.argv[0] if sys.argv else ""
    on_path = shutil.which("syncctl")
    if not started or started.endswith(("__main__.py", "-c")):
        # `python -m syncctl`: the same interpreter runs it again.
        if on_path and _same_environment(on_path):
            return "syncctl"
        return f"{shlex.quote(sys.executable)} -m syncctl"
    if on_path and os.path.realpath(on_path) == os.path.realpath(started):
        return "syncctl"
    return shlex.quote(started)


def _same_environment(script: str) -> bool:
    """Whether the script on PATH lives beside this interpreter (one virtualenv)."""
    return os.path.dirname(os.path.realpath(script)) == os.path.dirname(
        os.path.realpath(sys.executable)
    )
