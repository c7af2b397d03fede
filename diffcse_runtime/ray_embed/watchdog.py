"""Fate-sharing for the local Ray that `diffcse-embed-ray` starts: its processes end with it.

A SIGTERM or Ctrl-C unwinds to `ray.shutdown()`. A SIGKILL (or the OOM killer) runs no
code, and Ray's own fate-sharing is partial: workers and the raylet go within seconds,
but the dashboard and runtime-env agents first try to report the raylet's death to a GCS
that died with it, and were measured alive a minute later. So the command starts this
watchdog first, in its own session, blocked on a pipe only the command holds; when the
pipe closes, however the command ended, it ends the job's processes: SIGTERM, then
SIGKILL to those left after `GRACE` seconds.

Which processes are the job's is decided while the job runs, not at the end: the command
marks the environment the local Ray inherits with a unique value, and every `POLL` seconds
the watchdog records each process (pid and start time) that carries the mark or whose
parent is already recorded. The environment alone is not enough: Ray's agents retitle
themselves (setproctitle), which overwrites the memory `/proc/PID/environ` shows, and the
mark was seen gone from both agents, which then outlived the job by a minute. Linux only
(it reads /proc); elsewhere nothing is started and Ray's own fate-sharing is all there is.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
import uuid

MARK = "DIFFCSE_RAY_JOB"  # the environment variable every process of the local Ray inherits
POLL = 0.5  # seconds between looks at the process table while the job runs
GRACE = 3.0  # seconds between SIGTERM and SIGKILL
QUIET = 2.0  # seconds with no process of the job before the watchdog is done
REAP_LIMIT = 60.0  # the watchdog never outlives its command by more than this
SETTLED = 2.0  # seconds after which an unmarked process is taken as not the job's
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

Proc = tuple[int, bytes]  # pid and start time (clock ticks since boot): pids are reused


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


class Job:
    """The processes of one job: every one seen carrying the mark, and their descendants."""

    def __init__(self, mark: str) -> None:
        self.needle = b"\0" + f"{MARK}={mark}".encode() + b"\0"
        self.members: set[Proc] = set()
        self.others: set[Proc] = set()  # looked at once, not ours: never read again

    def look(self) -> list[int]:
        """Record new members; return the pids of members alive now (zombies excluded)."""
        table = _process_table()
        by_pid = {pid: (pid, start) for pid, start in table}
        new = [proc for proc in table if proc not in self.members and proc not in self.others]
        for proc in new:
            if self._carries_mark(proc[0]):
                self.members.add(proc)
        grew = True
        while grew:  # a child is recorded once its parent is: repeat down the tree
            grew = False
            for proc in new:
                if proc not in self.members and by_pid.get(table[proc][0]) in self.members:
                    self.members.add(proc)
                    grew = True
        settled = _ticks_since_boot() - SETTLED * _TICKS  # a fork not yet exec'd shows its
        self.others.update(  # parent's environment: only a process that old is settled
            proc for proc in new if proc not in self.members and int(proc[1]) < settled
        )
        return [
            pid
            for (pid, start), (_, state) in table.items()
            if (pid, start) in self.members and state != b"Z"
        ]

    def _carries_mark(self, pid: int) -> bool:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/environ", "rb") as fh:
            return self.needle in b"\0" + fh.read() + b"\0"
        return False


def _process_table() -> dict[Proc, tuple[int, bytes]]:
    """Every process but this one: (pid, start time) -> (parent pid, state)."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        with contextlib.suppress(OSError), open(f"/proc/{name}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()  # the name may hold spaces
            table[(int(name), fields[19])] = (int(fields[1]), fields[0])
    return table


def _ticks_since_boot() -> float:
    with open("/proc/uptime") as fh:
        return float(fh.read().split()[0]) * _TICKS


def reap(job: Job) -> None:
    """End every process of the job, and keep watching until none has been seen for
    `QUIET` seconds (at most `REAP_LIMIT`): a raylet killed mid-start can still spawn an
    agent after the first sweep, as a loaded machine showed."""
    end = time.monotonic() + REAP_LIMIT
    quiet_since = time.monotonic()
    while time.monotonic() < end:
        if job.look():
            _sweep(job)
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= QUIET:
            return
        time.sleep(0.1)


def _sweep(job: Job) -> None:
    """SIGTERM, then SIGKILL to whatever is left after `GRACE` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in job.look():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        end = time.monotonic() + GRACE
        while job.look() and time.monotonic() < end:
            time.sleep(0.1)


def main(mark: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    job = Job(mark)
    while True:
        job.look()
        ready, _, _ = select.select([sys.stdin], [], [], POLL)
        if ready and not os.read(sys.stdin.fileno(), 4096):
            break  # EOF: the command's last copy of the pipe closed
    reap(job)


if __name__ == "__main__":
    main(sys.argv[1])
