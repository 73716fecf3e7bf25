"""syncctl: run and repair chunked mailbox synchronisation."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("syncctl")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
