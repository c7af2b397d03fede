"""Signal plumbing shared by the CLIs and the worker pools: SIGTERM unwinds like Ctrl-C, and
a step that must not be cut in half can hold both signals until it is done.

Why this exists: a `kill` or a scheduler's stop should run the same `finally` blocks and
staging cleanup as Ctrl-C, so no hidden temporary files or half-started workers are left.
Only the main thread can install signal handlers; elsewhere both helpers do nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator


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
