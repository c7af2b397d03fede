"""How every command-line tool reports what went wrong: one sentence and an exit code.

The exceptions themselves live in `errors.py` (library users catch them without click);
this is the CLI side, a decorator for click commands, kept apart so that `errors.py` stays
the exception family alone.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

from diffcse_runtime.errors import DiffcseError
from diffcse_runtime.signals import Terminated, sigterm_as_interrupt


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
