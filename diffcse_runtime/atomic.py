"""Atomic writes: a crash never leaves a half-written artifact under its final name.

Every temporary entry is named `.NAME.PID.XXXX.tmp` beside its target. The PID says which
process owns it, so the next write of the same target removes leftovers whose process is
gone (a SIGKILL or a power cut skips every `finally`), and never touches a live writer's.

Publishing never swaps out something that appeared meanwhile: a new file or folder is
renamed into place with a rename that fails when the target exists (Linux renameat2
RENAME_NOREPLACE, or a hard link for files elsewhere), and `overwrite` replaces only what
was there: a regular file (never a symlink, FIFO, socket or device: those are refused, and
`-` or `/dev/stdout` write straight to standard output), or a real folder whose manifest
says our own tool wrote every entry of it (see ownership.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import stat
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from diffcse_runtime.errors import DiffcseError
from diffcse_runtime.ownership import (
    MANIFEST_FILE,
    NotOursError,
    check_not_in_use,
    check_owned,
    manifest_text,
)


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Read once at import: swapping the process umask later could race with other threads.
# mkstemp/mkdtemp create 0600/0700 entries, and so does safetensors; published ones get the
# modes a plain open()/mkdir() would have given, so other users and services can read them.
_UMASK = _read_umask()
FILE_MODE = 0o666 & ~_UMASK
DIR_MODE = 0o777 & ~_UMASK

OLD_SUFFIX = ".old.tmp"  # a previous version moved aside for a moment while publishing
_ACTIVE: set[Path] = set()  # targets this process is staging now (nested blocks are refused)
_ACTIVE_LOCK = threading.Lock()
# outputs that clearly mean "print it": written to the stream itself, never replaced
WRITE_THROUGH = {"-": "stdout", "/dev/stdout": "stdout", "/dev/stderr": "stderr"}
__all__ = ["NotOursError", "atomic_dir", "atomic_file", "check_output_file", "check_replaceable"]

# ---------------------------------------------------------------- temporary names


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def remove_stale(path: str | Path) -> list[Path]:
    """Remove `.NAME.PID.*.tmp` leftovers beside `path` whose process no longer runs."""
    path = Path(path)
    parent = path.parent
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)\.[^/]*\.tmp$")
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for entry in sorted(entries):
        match = pattern.match(entry.name)
        if not match or _pid_alive(int(match.group(1))):
            continue
        if entry.name.endswith(OLD_SUFFIX) and not os.path.lexists(path):
            # killed between moving the previous version aside and publishing: restore it
            with contextlib.suppress(OSError):
                rename_noreplace(entry, path)
                removed.append(entry)
                continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        removed.append(entry)
    return removed


def _check_parent(path: Path) -> None:
    """Name the user's path, not the hidden temporary one, when its folder is unusable."""
    parent = path.parent
    if not parent.exists():
        raise DiffcseError(f"{path}: cannot write it, the folder {parent} does not exist")
    if not parent.is_dir():
        raise DiffcseError(f"{path}: cannot write it, {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DiffcseError(f"{path}: cannot write it, no permission to write in {parent}")


def _named_for_user(exc: OSError, tmp: Path, path: Path) -> OSError:
    """The same error, naming the user's path instead of the hidden temporary one (a full
    disk says "out.npy: No space left on device", not ".out.npy.123.x.tmp: ...")."""
    name = str(exc.filename) if exc.filename is not None else str(tmp)
    if not name.startswith(str(tmp)) or exc.errno is None:
        return exc
    named = str(path) + name[len(str(tmp)) :]
    return type(exc)(exc.errno, exc.strerror or str(exc), named)


# ---------------------------------------------------------------- no-replace rename


def _renameat2_noreplace():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _renameat2_noreplace()
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`; raise FileExistsError if `dst` exists, never replacing it."""
    if _RENAMEAT2 is not None:
        rc = _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(errno.EEXIST, "already exists", str(dst))
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # fs without the flag
            raise OSError(err, os.strerror(err), str(dst))
    if src.is_dir():
        # rename(2) refuses a non-empty folder or a file as target, but would replace an
        # empty folder: check first (a small window remains on such systems).
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "already exists", str(dst))
        os.rename(src, dst)
    else:
        os.link(src, dst)  # fails with EEXIST, atomically
        os.unlink(src)


# ---------------------------------------------------------------- atomic file

_KINDS = {
    stat.S_IFLNK: "a symbolic link",
    stat.S_IFDIR: "a folder",
    stat.S_IFIFO: "a named pipe (FIFO)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a device",
    stat.S_IFBLK: "a device",
}


def is_write_through(path: str | Path) -> bool:
    """`-`, `/dev/stdout` (and `/dev/stderr`) name a stream: written to, never replaced."""
    return str(path) in WRITE_THROUGH


def check_output_file(path: str | Path) -> None:
    """Only a regular file (or nothing) may be replaced by an output; say what else is there.

    The final entry is looked at without following it: `o.json -> /proc/self/fd/1` is a
    symlink and refused, while a folder on the way that is a symlink is fine.
    """
    if is_write_through(path):
        return
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return
    if stat.S_ISREG(mode):
        return
    kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
    raise DiffcseError(
        f"{path}: is {kind}; an output replaces only a regular file, so give another "
        f"name (or - for standard output)"
    )


@contextlib.contextmanager
def _write_through(path: str | Path, mode: str) -> Iterator:
    """The stream itself, flushed at the end and left open (it is not ours to close)."""
    text = getattr(sys, WRITE_THROUGH[str(path)])
    stream = text.buffer if "b" in mode else text
    yield stream
    stream.flush()


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb", overwrite: bool = True) -> Iterator:
    """Open a temporary file beside `path`; move it to `path` only if the block succeeds.

    Without `overwrite`, a `path` that exists at the end (even one created meanwhile) is
    left alone and FileExistsError is raised. With it, only a regular file is replaced:
    a symlink, FIFO, socket, device or folder there is refused (DiffcseError). `-` and
    `/dev/stdout` write to standard output directly.
    """
    if is_write_through(path):
        with _write_through(path, mode) as fh:
            yield fh
        return
    path = Path(path)
    _check_parent(path)
    check_output_file(path)
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(errno.EEXIST, "already exists", str(path))
    remove_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, FILE_MODE)
        if overwrite:
            check_output_file(path)  # again: something may have appeared meanwhile
            os.replace(tmp, path)
        else:
            rename_noreplace(Path(tmp), path)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise _named_for_user(exc, Path(tmp), path) from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------- atomic folder


def check_replaceable(
    path: str | Path,
    overwrite: bool,
    tool: str,
    what: str,
    inputs: Iterable[str | Path] = (),
) -> None:
    """Refuse an existing `path` without `overwrite`; with it, refuse the working directory,
    a folder holding an input, and any folder `tool`'s manifest does not account for whole.

    Call it before the work starts (to fail fast); atomic_dir calls it again at publish.
    """
    path = Path(path)
    if not os.path.lexists(path):
        return
    if not overwrite:
        raise FileExistsError(errno.EEXIST, "already exists", str(path))
    check_not_in_use(path, inputs)
    check_owned(path, tool, what)


def _fix_modes(root: Path) -> None:
    """Give staged entries the modes plain open()/mkdir() would (safetensors writes 0600)."""
    os.chmod(root, DIR_MODE)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), DIR_MODE)
        for name in filenames:
            full = os.path.join(dirpath, name)
            if not os.path.islink(full):
                os.chmod(full, FILE_MODE | (os.stat(full).st_mode & 0o111 & ~_UMASK))


@contextlib.contextmanager
def _claim(path: Path) -> Iterator[None]:
    with _ACTIVE_LOCK:
        if path in _ACTIVE:
            raise RuntimeError(f"{path}: already being written by an enclosing atomic_dir block")
        _ACTIVE.add(path)
    try:
        yield
    finally:
        with _ACTIVE_LOCK:
            _ACTIVE.discard(path)


@contextlib.contextmanager
def atomic_dir(
    path: str | Path,
    overwrite: bool = False,
    tool: str = "diffcse",
    what: str = "a folder written by diffcse",
    inputs: Iterable[str | Path] = (),
) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; move it to `path` only if the block succeeds.

    The folder is published with a manifest naming `tool` and every entry in it. Without
    `overwrite`, an existing `path` raises FileExistsError, also one that appears while the
    block runs. With it, the existing `path` is replaced only after the new folder is
    complete, and only if it is empty or `tool`'s manifest lists every entry it holds,
    never the working directory or a folder holding one of `inputs`.
    """
    inputs = tuple(inputs)
    path = Path(os.path.abspath(path))
    _check_parent_or_create(path)
    with _claim(path):
        check_replaceable(path, overwrite, tool, what, inputs)
        remove_stale(path)
        tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=path.parent))
        try:
            yield tmp
            text = manifest_text(tmp, tool)  # scanned before atomic_file adds its temp file
            with atomic_file(tmp / MANIFEST_FILE, "w") as fh:
                fh.write(text)
            _fix_modes(tmp)
            _publish(
                tmp,
                path,
                overwrite,
                lambda: check_replaceable(path, overwrite, tool, what, inputs),
                lambda aside: check_owned(aside, tool, what, shown=path),
            )
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise _named_for_user(exc, tmp, path) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _check_parent_or_create(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise DiffcseError(f"{path}: cannot write it, {path.parent} is not a folder") from None
    _check_parent(path)


def _publish(
    tmp: Path,
    path: Path,
    overwrite: bool,
    check: Callable[[], None],
    check_aside: Callable[[Path], None],
) -> None:
    """Rename `tmp` to `path`; what is at `path` now is re-checked, never swapped blindly."""
    if not os.path.lexists(path):
        try:
            rename_noreplace(tmp, path)
            return
        except FileExistsError:
            if not overwrite:
                raise FileExistsError(
                    errno.EEXIST, "appeared while it was being written; left as it is", str(path)
                ) from None
    check()
    old = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path), suffix=OLD_SUFFIX, dir=path.parent))
    os.rmdir(old)
    os.rename(path, old)  # `old` is our fresh unique name: nothing to replace there
    try:
        # once more, now that no one can add to it by its name: what was added between
        # the check and the move is the user's, and the folder goes back untouched
        check_aside(old)
        rename_noreplace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            rename_noreplace(old, path)  # put the previous version back
        raise
    shutil.rmtree(old, ignore_errors=True)
