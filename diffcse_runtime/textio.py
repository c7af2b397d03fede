"""Reading one-text-per-line files with errors that name the file and line.

Both `diffcse-embed` and the trainer's corpus reader read text this way, so a bad byte is
reported identically everywhere: "FILE:LINE: not valid UTF-8".
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from diffcse_runtime.errors import DataFormatError

ERROR_MODES = ("strict", "replace")


def _decode(raw: bytes, name: str, lineno: int, errors: str) -> str:
    try:
        text = raw.decode("utf-8", errors=errors)
    except UnicodeDecodeError as exc:
        raise DataFormatError(
            f"{name}:{lineno}: not valid UTF-8 (byte {exc.start + 1} of the line); "
            "fix the file or use --errors replace"
        ) from None
    return text.rstrip("\r\n")


def iter_lines(source: str | Path | BinaryIO, errors: str = "strict") -> Iterator[tuple[int, str]]:
    """Yield (line number, text) for every line, empty ones included, newline stripped.

    `source` is a path, "-" for standard input, or an open binary file. Lines are read one
    at a time, so a file of any size streams in constant memory.
    """
    if errors not in ERROR_MODES:
        raise ValueError(f"errors must be one of {ERROR_MODES}, got {errors!r}")
    if isinstance(source, str | Path) and str(source) != "-":
        path = Path(source)
        try:
            fh = open(path, "rb")  # noqa: SIM115 - closed in the finally below
        except FileNotFoundError:
            raise DataFormatError(f"{path}: file not found") from None
        except IsADirectoryError:
            raise DataFormatError(f"{path}: is a directory, expected a text file") from None
        name, close = str(path), True
    else:
        fh = sys.stdin.buffer if str(source) == "-" else source
        name, close = getattr(fh, "name", "<stdin>"), False
    try:
        for lineno, raw in enumerate(fh, start=1):
            yield lineno, _decode(raw, name, lineno, errors)
    finally:
        if close:
            fh.close()
