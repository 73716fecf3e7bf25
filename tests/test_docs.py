"""The README documents every command (test_cli checks each has help text)."""

from __future__ import annotations

import re
from pathlib import Path

from test_cli import registered_commands

README = Path(__file__).resolve().parent.parent / "README.md"


def test_every_command_appears_in_the_readme() -> None:
    readme = README.read_text(encoding="utf-8")
    documented = set(re.findall(r"`syncctl ([a-z-]+(?: [a-z-]+)?)", readme))
    missing = [
        path
        for path, _ in registered_commands()
        if path not in documented and not any(d.startswith(path + " ") for d in documented)
    ]
    assert not missing, f"commands missing from README.md: {missing}"
