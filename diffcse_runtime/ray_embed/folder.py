"""Which output folders diffcse-embed-ray may write into, resume in, or delete parts from.

The rule is the project's (ownership.py): a folder is ours only when our own record in it
accounts for every entry it holds. Here that record is the job record `_diffcse_job.json`:
the job may use a folder that is new or empty, or one whose every entry is the job record,
manifest.json, a part file the record lists (live or retired), or the temporary name one of
these has while it is written. A file, subfolder or symlink it does not list is the user's,
so the folder is refused, naming that entry; a job record's name proves nothing alone.
Never the working directory, a folder holding it, or a folder holding an input.

Nothing here needs Ray: the command checks its output before it starts Ray, and the job
checks again before it plans.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path

import pyarrow.fs as pafs

from diffcse_runtime.errors import DiffcseError
from diffcse_runtime.ownership import (
    NotOursError,
    check_not_in_use,
    first_foreign_entry,
    is_listed,
    kind_of,
    staged_target,
)
from diffcse_runtime.ray_embed.inputs import resolve as resolve_fs
from diffcse_runtime.ray_embed.record import JOB_FILE, Record, parse_record

TOOL = "diffcse-embed-ray"
MANIFEST_FILE = "manifest.json"
_PART = re.compile(r"^part-\d{6,}\.parquet$")
_NEW = {JOB_FILE: "file"}  # what a folder holds before its first record is published
_KINDS = {pafs.FileType.File: "file", pafs.FileType.Directory: "dir"}


def part_file(index: int) -> str:
    """The name of part `index`: fixed by the plan, so a retry rewrites the same part."""
    return f"part-{index:06d}.parquet"


def owned_names(record: Record) -> dict[str, str]:
    """{entry: kind} of everything the job that wrote `record` may have put in its folder."""
    names = {JOB_FILE: "file", MANIFEST_FILE: "file"}
    for index in [s.index for s in record.shards] + list(record.retired):
        names[part_file(index)] = "file"
    return names


def check_output_folder(output_dir: str, inputs: Iterable[str] = ()) -> Record | None:
    """Raise NotOursError unless the job may use `output_dir`; return the job record found
    there (None for a new or empty folder). `inputs`: the input paths, patterns or URIs."""
    out_fs, out_path = resolve_fs(output_dir)
    return check_folder(out_fs, out_path, inputs, output_dir)


def check_folder(
    out_fs: pafs.FileSystem, out_path: str, inputs: Iterable[str], shown: str
) -> Record | None:
    """check_output_folder on a resolved filesystem and path; `shown` names it in messages."""
    if isinstance(out_fs, pafs.LocalFileSystem):
        check_not_in_use(Path(out_path), _local(inputs), action="write into it")
        entries = _local_entries(out_path, shown)
    else:
        entries = _remote_entries(out_fs, out_path, shown)
    if entries.get(JOB_FILE) != "file":
        # new: empty, or holding only a first record's staging name (killed while writing it)
        first = next(
            (n for n, k in sorted(entries.items()) if not is_listed(n, k, _NEW, True)), None
        )
        if first is None:
            return None
        raise NotOursError(
            f"{shown}: holds {first} and no {JOB_FILE} of {TOOL}, so it is not one of its "
            "output folders; refusing to write into it: choose a new or empty folder"
        )
    with out_fs.open_input_stream(f"{out_path}/{JOB_FILE}") as fh:
        raw = fh.read()
    try:
        record = parse_record(raw, f"{out_path}/{JOB_FILE}")
    except DiffcseError:
        _name_what_no_record_lists(entries, shown)
        raise
    listed = owned_names(record)
    if isinstance(out_fs, pafs.LocalFileSystem):
        foreign = first_foreign_entry(Path(out_path), listed, skip=None, staging=True)
    else:
        foreign = next(
            (n for n, k in sorted(entries.items()) if not is_listed(n, k, listed, True)), None
        )
    if foreign is not None:
        raise NotOursError(
            f"{shown}: holds {foreign}, which {TOOL} did not write (its {JOB_FILE} does "
            "not list it); refusing to write into it: move it out or choose another folder"
        )
    return record


def _name_what_no_record_lists(entries: dict[str, str], shown: str) -> None:
    """A record that does not parse lists nothing: name an entry no record of ours could
    list (the user's file beside a forged `{}`) rather than blame the record alone."""
    for name, kind in sorted(entries.items()):
        if kind == "file" and _could_be_ours(staged_target(name) or name):
            continue
        raise NotOursError(
            f"{shown}: holds {name}, which {TOOL} did not write (and its {JOB_FILE} is not "
            "a job record it wrote); refusing to write into it: choose a new or empty folder"
        )


def _could_be_ours(name: str) -> bool:
    return name in (JOB_FILE, MANIFEST_FILE) or _PART.match(name) is not None


def _local(inputs: Iterable[str]) -> list[str]:
    """The local paths among the inputs (another filesystem's files are never under a local
    folder); a URI is not resolved (that could reach the network), file:// excepted."""
    paths = []
    for item in inputs:
        if item.startswith("file://"):
            paths.append(resolve_fs(item)[1])
        elif "://" not in item:
            paths.append(item)
    return paths


def _local_entries(path: str, shown: str) -> dict[str, str]:
    """{name: kind} of the folder's entries, links not followed; {} when it does not exist."""
    try:
        st = os.stat(path)  # the folder itself may be reached through a link
    except FileNotFoundError:
        return {}
    if not stat.S_ISDIR(st.st_mode):
        raise NotOursError(f"{shown}: is not a folder; give a new or empty output folder")
    with os.scandir(path) as it:
        return {e.name: kind_of(e.stat(follow_symlinks=False).st_mode) for e in it}


def _remote_entries(fs: pafs.FileSystem, path: str, shown: str) -> dict[str, str]:
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return {}
    if info.type != pafs.FileType.Directory:
        raise NotOursError(f"{shown}: is not a folder; give a new or empty output folder")
    listing = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return {i.base_name: _KINDS.get(i.type, "special") for i in listing}


def remove_parts(out_fs: pafs.FileSystem, out_path: str, indexes: Iterable[int]) -> None:
    """Delete the parts `indexes` (retired by our record): only a regular file is removed.
    Anything else under such a name appeared after the folder was checked, and is left."""
    for index in indexes:
        path = f"{out_path}/{part_file(index)}"
        if isinstance(out_fs, pafs.LocalFileSystem):
            try:
                regular = stat.S_ISREG(os.lstat(path).st_mode)
            except FileNotFoundError:
                continue
            if regular:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        elif out_fs.get_file_info(path).type == pafs.FileType.File:
            with contextlib.suppress(FileNotFoundError):
                out_fs.delete_file(path)
