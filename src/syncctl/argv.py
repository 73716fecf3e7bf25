"""Options where operators type them: `syncctl run -v`, `syncctl --json status`.

The root options (-v/--verbose, --log-format) belong before the command and
--json after it, as the parser sees them; people type both anywhere. This
moves them to where they belong before the parser runs. It knows only the
command names it is given and these options, and leaves everything after
`--` alone.
"""

from __future__ import annotations

from collections.abc import Collection

ROOT_FLAGS = frozenset({"-v", "--verbose"})
ROOT_VALUED = frozenset({"--log-format"})  # takes a value: `--log-format json`
COMMAND_FLAGS = frozenset({"--json"})


def normalize(args: list[str], groups: Collection[str]) -> list[str]:
    """args (without the program name) with root options moved before the
    command and --json moved after it. groups: command names that take a
    subcommand (e.g. "db"), so their subcommand is part of the command."""
    root: list[str] = []
    late: list[str] = []
    rest: list[str] = []
    command_end = None  # index in rest just after the command's name(s)
    position = 0
    while position < len(args):
        arg = args[position]
        if arg == "--":
            rest += args[position:]
            break
        if arg in ROOT_FLAGS:
            root.append(arg)
        elif arg in ROOT_VALUED and position + 1 < len(args):
            root += args[position : position + 2]
            position += 1
        elif arg.split("=", 1)[0] in ROOT_VALUED and "=" in arg:
            root.append(arg)
        elif arg in COMMAND_FLAGS and command_end is None:
            late.append(arg)
        else:
            rest.append(arg)
            if command_end is None and not arg.startswith("-"):
                following = args[position + 1] if position + 1 < len(args) else "-"
                if arg in groups and not following.startswith("-"):
                    rest.append(following)  # the group's subcommand
                    position += 1
                command_end = len(rest)
        position += 1
    if command_end is None:
        return root + rest + late
    return root + rest[:command_end] + late + rest[command_end:]
