"""Which folders `--overwrite` may replace: those our own manifest says we wrote, whole.

Every folder our tools publish (an index, a model directory, a fitted generator, a
training checkpoint) carries `.diffcse-manifest.json`, written inside the staging folder
as the last step before it is renamed into place. It names the tool that wrote it and
lists every entry the folder holds, with its kind. A folder is ours to replace only when
that manifest parses, names the tool that is about to replace it, and lists every entry
the folder holds now: a file, subfolder or symlink it does not list is the user's, so the
folder is refused, naming that entry. A file's name (index.json, diffcse.json, ...) proves
nothing: anyone can write `{}` into one.

Folders written before manifests existed have a marker file and no manifest. They cannot
be told apart from a user's folder that holds a file of that name, so they are refused
too, with a sentence that says how to remove them by hand after a look.

A replacement also never removes the current working directory (or a folder holding it),
nor a folder holding one of the command's own inputs.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

from diffcse_runtime.errors import DiffcseError

MANIFEST_FILE = ".diffcse-manifest.json"
MANIFEST_FORMAT = "diffcse-manifest"
MANIFEST_VERSION = 1
MAX_MANIFEST_BYTES = 16 << 20  # a manifest lists names; anything larger is not ours
# the files that marked our folders before manifests: named only to explain a refusal
LEGACY_MARKERS = ("index.json", "diffcse.json", "fit_report.json", "trainer_state.json")
# atomic.py's temporary names, `.NAME.PID.XXXX.tmp` (XXXX: tempfile's random letters)
_STAGING = re.compile(r"^\.(.+)\.\d+\.[a-z0-9_]+\.tmp$")


class NotOursError(DiffcseError):
    """`overwrite` was asked for a path that our tools did not write (or cannot prove so)."""


# ---------------------------------------------------------------- entries


def kind_of(mode: int) -> str:
    """A folder entry's kind as the manifest records it (from lstat: links not followed)."""
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    return "special"


def _scan(root: Path, rel: str = "") -> Iterator[tuple[str, str]]:
    """(relative path, kind) of every entry under `root`, sorted, never following links."""
    with os.scandir(root / rel if rel else root) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        name = f"{rel}/{entry.name}" if rel else entry.name
        if name == MANIFEST_FILE:
            continue
        kind = kind_of(entry.stat(follow_symlinks=False).st_mode)
        yield name, kind
        if kind == "dir":
            yield from _scan(root, name)


def manifest_text(folder: Path, tool: str) -> str:
    """The manifest listing every entry of `folder` (a staging folder we filled) under `tool`.

    Only the text: `atomic.atomic_dir` writes it, so this module needs nothing from atomic.py
    and the two do not import each other.
    """
    body = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "tool": tool,
        "entries": [[name, kind] for name, kind in _scan(folder)],
    }
    return json.dumps(body, indent=1) + "\n"


# ---------------------------------------------------------------- reading a manifest


def _read_manifest(folder: Path, tool: str) -> dict[str, str] | str:
    """The manifest's {entry: kind}, or the sentence saying why it is not one of ours."""
    path = folder / MANIFEST_FILE
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return ""
    if not stat.S_ISREG(st.st_mode):
        return f"its {MANIFEST_FILE} is not a regular file"
    if st.st_size > MAX_MANIFEST_BYTES:
        return f"its {MANIFEST_FILE} is too large to be ours"
    try:
        body = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        return f"its {MANIFEST_FILE} does not parse ({type(exc).__name__})"
    entries = body.get("entries") if isinstance(body, dict) else None
    if (
        body.get("format") != MANIFEST_FORMAT
        or body.get("version") != MANIFEST_VERSION
        or not isinstance(entries, list)
        or not all(_is_entry(e) for e in entries)
    ):
        return f"its {MANIFEST_FILE} is not a manifest diffcse wrote"
    if body.get("tool") != tool:
        return f"its {MANIFEST_FILE} says {body.get('tool')!r} wrote it, not {tool}"
    return {name: kind for name, kind in entries}


def _is_entry(entry: object) -> bool:
    return (
        isinstance(entry, list)
        and len(entry) == 2
        and all(isinstance(x, str) for x in entry)
        and entry[0] != MANIFEST_FILE
    )


def staged_target(name: str) -> str | None:
    """The entry whose atomic_file temporary `name` (`.NAME.PID.XXXX.tmp`) is, or None: what
    a write of one of our files leaves when its process is killed mid-way."""
    rel, _, base = name.rpartition("/")
    match = _STAGING.match(base)
    if match is None:
        return None
    return f"{rel}/{match.group(1)}" if rel else match.group(1)


def is_staging_of(name: str, listed: dict[str, str]) -> bool:
    """Whether `name` is the temporary name of a file `listed` names."""
    target = staged_target(name)
    return target is not None and listed.get(target) == "file"


def is_listed(name: str, kind: str, listed: dict[str, str], staging: bool = False) -> bool:
    """Whether `listed` accounts for the entry `name` of this `kind` (with `staging`, also
    for the temporary name of a listed file, itself a regular file)."""
    if listed.get(name) == kind:
        return True
    return staging and kind == "file" and is_staging_of(name, listed)


def first_foreign_entry(
    folder: Path, listed: dict[str, str], skip: str | None = MANIFEST_FILE, staging: bool = False
) -> str | None:
    """The first entry (sorted) the manifest does not list with its kind, or None.

    Only folders the manifest lists are entered, so a large user folder costs one listing.
    `skip` is the manifest itself when it sits in the folder; `staging` also accepts the
    temporary names of listed files (for a folder our job writes into file by file).
    """
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(folder / rel if rel else folder) as it:
            names = sorted((e.name, e.stat(follow_symlinks=False).st_mode) for e in it)
        for base, mode in names:
            name = f"{rel}/{base}" if rel else base
            if name == skip:
                continue
            kind = kind_of(mode)
            if not is_listed(name, kind, listed, staging):
                return name
            if kind == "dir":
                stack.append(name)
    return None


# ---------------------------------------------------------------- the one check


def check_owned(path: Path, tool: str, what: str, shown: Path | None = None) -> None:
    """Raise NotOursError unless `path` is empty or a folder `tool` wrote, entry for entry.

    `shown` is the name to give in messages when `path` is the folder moved aside.
    """
    name = shown or path
    refuse = "refusing to replace it even with --overwrite"
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise NotOursError(f"{name}: is a symbolic link, not {what}; {refuse}")
    if not stat.S_ISDIR(st.st_mode):
        raise NotOursError(f"{name}: is a file, not {what}; {refuse}")
    if not any(os.scandir(path)):
        return
    listed = _read_manifest(path, tool)
    if listed == "":
        raise NotOursError(_no_manifest(path, name, tool, what))
    if isinstance(listed, str):
        raise NotOursError(f"{name}: {listed}, so it is not {what}; {refuse}")
    foreign = first_foreign_entry(path, listed)
    if foreign is not None:
        raise NotOursError(
            f"{name}: holds {foreign}, which {tool} did not write (its {MANIFEST_FILE} does "
            f"not list it); {refuse}: move it out or choose another folder"
        )


def _no_manifest(path: Path, name: Path, tool: str, what: str) -> str:
    """Name the first entry; for a folder an older diffcse wrote, say how to remove it."""
    names = os.listdir(path)
    first = min((n for n in names if n not in LEGACY_MARKERS), default=min(names))
    said = (
        f"{name}: holds {first} but no {MANIFEST_FILE} naming {tool}, so it is not {what}; "
        "refusing to replace it even with --overwrite"
    )
    legacy = next((m for m in LEGACY_MARKERS if (path / m).is_file()), None)
    if legacy is None:
        return said
    return (
        f"{said} (if it is {what} from an older diffcse, with {legacy} and no manifest, "
        f"and nothing in it is yours, remove it by hand: rm -r {name})"
    )


def check_not_in_use(
    path: Path, inputs: Iterable[str | Path] = (), action: str = "replace it"
) -> None:
    """Never replace (or write into: `action`) the working directory, a folder above it,
    or one holding an input."""
    target = Path(os.path.abspath(path))
    real = Path(os.path.realpath(path))
    cwd = Path.cwd()
    if cwd.is_relative_to(target) or Path(os.path.realpath(cwd)).is_relative_to(real):
        raise NotOursError(
            f"{path}: is the current working directory or holds it; refusing to {action}"
        )
    for item in inputs:
        if str(item) == "-":
            continue
        plain, resolved = Path(os.path.abspath(item)), Path(os.path.realpath(item))
        if plain.is_relative_to(target) or resolved.is_relative_to(real):
            raise NotOursError(f"{path}: is or holds the input {item}; choose another output")
