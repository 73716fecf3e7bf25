"""`python -m syncctl`, the same as the `syncctl` command."""

from syncctl.cli import main

main()
