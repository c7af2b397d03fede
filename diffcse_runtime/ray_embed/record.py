"""The job record `_diffcse_job.json`: what a rerun of `diffcse-embed-ray` needs to resume.

    {"format": 2, "spec": {...}, "uris": {path: uri}, "files": {path: {size, mtime_ns}},
     "shards": [{index, path, first_row, rows, start, end, row_groups, digest}, ...],
     "retired": [indexes of parts no longer in the plan]}

A rerun compares each input's stamp (size, modification time) with the record. An input
whose stamp differs is planned again and its shards are compared with the recorded ones by
position: a shard with the same rows and the same bytes (digest) keeps its part; one that
differs keeps its index and is embedded again; shards past the old end get new indexes
(appended lines); recorded shards past the new end are retired and their parts removed.
Part numbers are never reused for other rows, so a retired part left by a crash cannot be
mistaken for a live one. Nothing here needs Ray: the module is tested on its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

from diffcse_runtime.errors import DiffcseError
from diffcse_runtime.ray_embed.inputs import Shard

JOB_FILE = "_diffcse_job.json"  # the plan: a rerun resumes only the same job
RECORD_FORMAT = 2  # 1 (unversioned): no stamps or digests, so every shard is redone once


@dataclass
class Record:
    spec: dict
    uris: dict[str, str]
    files: dict[str, dict]  # path -> stamp
    shards: list[Shard]
    retired: list[int] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "format": RECORD_FORMAT,
            "spec": self.spec,
            "uris": self.uris,
            "files": self.files,
            "shards": [s.to_dict() for s in self.shards],
            "retired": self.retired,
        }


def parse_record(raw: bytes, where: str) -> Record:
    """The record in `raw`, or one sentence naming `where` and what is wrong with it."""

    def damaged(why: str) -> DiffcseError:
        return DiffcseError(
            f"{where}: damaged job record ({why}); the parts beside it cannot be matched to "
            "their input, so start over in a new output folder"
        )

    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise damaged(f"not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise damaged("not a JSON object")
    version = body.get("format", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version > RECORD_FORMAT:
        raise DiffcseError(f"{where}: job record format {version!r} is not one this version reads")
    spec, uris = body.get("spec"), body.get("uris")
    files, retired = body.get("files", {}), body.get("retired", [])
    if not isinstance(spec, dict) or not _str_map(uris) or not isinstance(files, dict):
        raise damaged("'spec', 'uris' or 'files' is missing or malformed")
    if not isinstance(retired, list) or not all(_is_int(i) for i in retired):
        raise damaged("'retired' is not a list of part numbers")
    shards = body.get("shards")
    if not isinstance(shards, list):
        raise damaged("'shards' is not a list")
    try:
        parsed = [_shard(s) for s in shards]
    except (TypeError, ValueError) as exc:
        raise damaged(f"a shard is malformed: {exc}") from None
    if len({s.index for s in parsed}) != len(parsed):
        raise damaged("two shards share a part number")
    return Record(spec, uris, files, parsed, retired)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _str_map(value) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    )


def _shard(raw) -> Shard:
    if not isinstance(raw, dict):
        raise TypeError("not an object")
    shard = Shard.from_dict(raw)
    ints = (shard.index, shard.first_row, shard.rows, shard.start, shard.end, *shard.row_groups)
    if not all(_is_int(v) for v in ints) or shard.end < shard.start:
        raise ValueError(f"shard {raw.get('index')!r} has a bad position")
    if not isinstance(shard.path, str) or not isinstance(shard.digest, str):
        raise ValueError(f"shard {shard.index} has a bad path or digest")
    return shard


def reconcile(
    old: list[Shard], plans: dict[str, list[Shard]], order: list[str], retired: list[int]
) -> tuple[list[Shard], list[int], list[str]]:
    """The new plan: `order` lists the current input files; `plans` holds fresh shards
    (index -1) of the files planned again, the others keep their recorded shards.

    Returns (shards in file order, retired part numbers, one note per changed input)."""
    by_file: dict[str, list[Shard]] = {}
    for shard in old:
        by_file.setdefault(shard.path, []).append(shard)
    next_index = max([s.index for s in old] + retired + [-1]) + 1
    shards, retired, notes = [], list(retired), []
    for path in order:
        olds = by_file.get(path, [])
        if path not in plans:
            shards += olds
            continue
        redone, added = [], []
        for j, shard in enumerate(plans[path]):
            if j < len(olds):
                index = olds[j].index
                if not shard.same_input(olds[j]):
                    redone.append(index)
            else:
                index, next_index = next_index, next_index + 1
                added.append(index)
            shards.append(replace(shard, index=index))
        gone = [s.index for s in olds[len(plans[path]) :]]
        retired += gone
        if old and (redone or added or gone):
            notes.append(_note(path, bool(olds), redone, added, gone))
    for path, olds in by_file.items():
        if path not in order:
            retired += [s.index for s in olds]
            notes.append(f"{path}: no longer an input, its {_parts(s.index for s in olds)} removed")
    return shards, sorted(set(retired)), notes


def _note(path: str, known: bool, redone: list, added: list, gone: list) -> str:
    if not known:
        return f"{path}: new input, {_parts(added)} added"
    said = [f"{_parts(redone)} redone"] if redone else []
    said += [f"{_parts(added)} added"] if added else []
    said += [f"{_parts(gone)} removed"] if gone else []
    return f"{path}: changed since the last run, {', '.join(said)}"


def _parts(indexes) -> str:
    indexes = sorted(indexes)
    return ("part " if len(indexes) == 1 else "parts ") + ", ".join(map(str, indexes))
