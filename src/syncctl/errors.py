"""The errors syncctl reports to a person, each with its exit code.

The CLI turns any of these into one sentence on stderr and the exit code;
anything else is a bug and shows a traceback only under ``-v``.
"""

from __future__ import annotations


class SyncctlError(Exception):
    """Something went wrong."""

    exit_code = 1

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.__doc__ or self.__class__.__name__)

    @property
    def message(self) -> str:
        return str(self.args[0])


class BadInput(SyncctlError):
    """The input was not valid; nothing was changed."""

    exit_code = 2


class CheckFailed(SyncctlError):
    """A check found a problem."""

    exit_code = 1


class DatabaseUnavailable(SyncctlError):
    """The database could not be reached."""

    exit_code = 3


class MailSourceUnavailable(SyncctlError):
    """The mail service could not be reached or refused the credentials."""

    exit_code = 3


def clause(text: str) -> str:
    """Quoted text (a service's message, another error) to go on with a sentence
    of ours: without the full stop that ends it, so ours never doubles one."""
    return text.strip().rstrip(".").rstrip()
