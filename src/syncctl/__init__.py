"""syncctl: run and repair chunked mailbox synchronisation."""

__version__ = "0.1.0"

__all__ = ["__version__"]
