"""The one exception type users of the runtime catch.

Every error a user can cause (a bad model folder, a malformed data file, bad CLI input)
is raised as a `DiffcseError` whose message names the file, line or key at fault, so the
command-line tools can print it as one sentence instead of a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator


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


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where SIGINT raises KeyboardInterrupt, so the same cleanup runs."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While the block runs in the main thread, SIGTERM unwinds like Ctrl-C.

    Every `finally` and staging cleanup then runs for a `kill` or a scheduler's stop, as it
    does for Ctrl-C, instead of the process dying with hidden temporary files left behind.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block is done, then raise them as usual.

    For steps that must not be cut in half: starting a spawned worker writes its start-up
    data down a pipe, and a worker whose parent stops in the middle of that dies with an
    EOFError traceback of its own instead of quietly. Only the main thread handles signals.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    wanted = (signal.SIGINT, signal.SIGTERM)
    previous = {
        sig: signal.signal(sig, lambda signum, _frame: caught.append(signum)) for sig in wanted
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if caught:
            handler = previous[caught[0]]
            if callable(handler):
                handler(caught[0], None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), caught[0])


def friendly_errors(
    fn: Callable | None = None, *, interrupted: str = "interrupted; nothing was written"
):
    """Decorate a click command: user errors become one line on stderr and exit code 1.

    DiffcseError and file-system errors print their sentence (exit 1); Ctrl-C and SIGTERM
    print `interrupted` and exit 130 / 143 after the cleanup has run. Used by every CLI
    (diffcse-embed/-eval/-search, diffcse-export, diffcse-train).
    """
    if fn is None:
        return functools.partial(friendly_errors, interrupted=interrupted)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import click

        try:
            with sigterm_as_interrupt():
                return fn(*args, **kwargs)
        except DiffcseError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            raise click.ClickException(f"{where}{exc.strerror or exc}") from None
        except KeyboardInterrupt as exc:
            click.echo(interrupted, err=True)
            sys.exit(143 if isinstance(exc, Terminated) else 130)

    return wrapper
