"""The one exception type users of the runtime catch.

Every error a user can cause (a bad model folder, a malformed data file, bad CLI input)
is raised as a `DiffcseError` whose message names the file, line or key at fault, so the
command-line tools can print it as one sentence instead of a traceback (`cli_errors.py`
does the printing; `signals.py` holds the SIGTERM/Ctrl-C plumbing).
"""

from __future__ import annotations


class DiffcseError(Exception):
    """A problem with user input, reported with the file, line or key that caused it."""


def first_line(exc: BaseException) -> str:
    """The first line of a library's exception message, for a one-sentence error."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class ModelDirError(DiffcseError):
    """A model directory is missing a file, is from a newer format, or fails its hash check."""


class DataFormatError(DiffcseError):
    """A data file does not follow its documented format."""
