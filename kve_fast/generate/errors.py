"""How ``generate`` fails: its one error type, and a failure as the one line it is reported in."""

from __future__ import annotations

from .. import _files


class GenerateError(Exception):
    """A failure that stops the job; ``code`` is the exit status, ``printed`` whether the reason is already out."""

    def __init__(self, message: str, code: int = 1, printed: bool = False):
        super().__init__(message)
        self.code, self.printed = code, printed


class Failed(Exception):
    """A worker's failure, as one line."""


def oserror_line(exc: OSError, path: str) -> str:
    """One line for a failed file operation: the file, then the cause."""
    where = exc.filename if isinstance(exc, _files.NotRegularFile) and exc.filename else path
    return f"{where}: {exc.strerror or exc}"


def describe(exc: BaseException) -> str:
    """Any failure as one line: the file and the cause, or the exception's type and message."""
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}"
