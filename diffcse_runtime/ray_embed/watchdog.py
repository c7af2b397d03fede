"""Fate-sharing for the local Ray that `diffcse-embed-ray` starts: its processes end with it.

A SIGTERM or Ctrl-C unwinds to `ray.shutdown()`. A SIGKILL (or the OOM killer) runs no
code, and Ray's own fate-sharing is partial: workers and the raylet go within seconds,
but the dashboard and runtime-env agents first try to report the raylet's death to a GCS
that died with it, and were measured alive 15 s and more later. So the command starts
this watchdog first: it marks the environment the local Ray inherits with a unique value,
and the watchdog, in its own session, blocks on a pipe only the command holds. When the
pipe closes, however the command ended, it sends SIGTERM to every process still carrying
the mark, and SIGKILL to those left after `GRACE` seconds. Linux only (it reads /proc);
elsewhere nothing is started and Ray's own fate-sharing is all there is.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid

MARK = "DIFFCSE_RAY_JOB"  # the environment variable every process of the local Ray inherits
GRACE = 3.0  # seconds between SIGTERM and SIGKILL
QUIET = 2.0  # seconds with no marked process before the watchdog is done
REAP_LIMIT = 60.0  # the watchdog never outlives its command by more than this


def start() -> int | None:
    """Mark this process's environment and start the watchdog; returns the pipe's write
    end, to close after `ray.shutdown()` (or never: the kernel closes it at exit)."""
    if not os.path.isdir("/proc/self"):
        return None
    mark = uuid.uuid4().hex
    read_end, write_end = os.pipe()  # not inheritable: Ray's processes never hold it
    env = {k: v for k, v in os.environ.items() if k != MARK}
    subprocess.Popen(
        [sys.executable, "-m", __name__, mark],
        stdin=read_end,
        env=env,
        start_new_session=True,  # a Ctrl-C to the terminal does not end it before its work
        close_fds=True,
    )
    os.close(read_end)
    os.environ[MARK] = mark
    return write_end


def marked(mark: str) -> list[int]:
    """Live processes (not zombies) whose environment carries `MARK=mark`."""
    needle = f"{MARK}={mark}".encode() + b"\0"
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as fh:
                env = fh.read() + b"\0"
            with open(f"/proc/{name}/stat", "rb") as fh:
                state = fh.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if state != b"Z" and (b"\0" + needle in b"\0" + env):
            found.append(int(name))
    return found


def reap(mark: str) -> None:
    """End every marked process, and keep watching until none has been seen for `QUIET`
    seconds (at most `REAP_LIMIT`): a raylet killed mid-start can still spawn an agent after
    the first sweep, as a loaded machine showed."""
    end = time.monotonic() + REAP_LIMIT
    quiet_since = time.monotonic()
    while time.monotonic() < end:
        if marked(mark):
            _sweep(mark)
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= QUIET:
            return
        time.sleep(0.1)


def _sweep(mark: str) -> None:
    """SIGTERM, then SIGKILL to whatever is left after `GRACE` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in marked(mark):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        end = time.monotonic() + GRACE
        while marked(mark) and time.monotonic() < end:
            time.sleep(0.1)


def main(mark: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while sys.stdin.buffer.read(4096):  # EOF: the command's last copy of the pipe closed
        pass
    reap(mark)


if __name__ == "__main__":
    main(sys.argv[1])
