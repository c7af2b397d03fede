"""Inputs of `diffcse-embed-ray`: find the files, cut them into shards, read one shard.

A shard is a fixed run of rows of one input file: `rows` lines starting at byte `start` of
a text/JSONL file, or a run of row groups of a Parquet file. Shards are planned from the
input alone (line offsets, Parquet footers), so a rerun plans the very same shards and can
skip the ones already written. Files are read through pyarrow filesystems, so `s3://`,
`gs://`, `hdfs://` and local paths work alike.
"""

from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from diffcse_runtime.errors import DataFormatError
from diffcse_runtime.ray_embed import FORMATS  # noqa: F401 - re-exported for callers
from diffcse_runtime.textio import _decode  # one "FILE:LINE: not valid UTF-8" everywhere

_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
_BLOCK = 8 << 20  # bytes read at a time while indexing line offsets


@dataclass(frozen=True)
class Shard:
    """Rows [first_row, first_row + rows) of `path`, stored from byte `start` (text/JSONL)
    or in `row_groups` (Parquet). `first_row` is 1-based for lines, 0-based for Parquet."""

    index: int
    path: str
    fmt: str
    first_row: int
    rows: int
    start: int = 0
    end: int = 0
    row_groups: tuple[int, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> Shard:
        return cls(**{**raw, "row_groups": tuple(raw.get("row_groups") or ())})


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path on it, for a local path or any URI pyarrow knows."""
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, ValueError):  # a relative local path
        fs, path = pafs.LocalFileSystem(), uri
    except OSError as exc:
        raise DataFormatError(f"{uri}: cannot open its filesystem ({exc})") from None
    if isinstance(fs, pafs.LocalFileSystem):  # workers may run in another folder
        path = os.path.abspath(path)
    return fs, path


def list_files(pattern: str) -> tuple[pafs.FileSystem, list[str]]:
    """The files a path, folder or glob names, sorted so every run plans the same shards."""
    fs, path = resolve(pattern)
    if not any(ch in path for ch in "*?["):
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return fs, [path]
        if info.type != pafs.FileType.Directory:
            raise DataFormatError(f"{pattern}: no such file or folder")
        found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        files = [i.path for i in found if i.type == pafs.FileType.File]
        files = [f for f in files if not f.rsplit("/", 1)[-1].startswith((".", "_"))]
    else:
        parts = path.split("/")
        fixed = next(i for i, part in enumerate(parts) if any(ch in part for ch in "*?["))
        base = "/".join(parts[:fixed]) or ("/" if path.startswith("/") else ".")
        selector = pafs.FileSelector(base, recursive="**" in path or fixed < len(parts) - 1)
        try:
            found = fs.get_file_info(selector)
        except FileNotFoundError:
            found = []
        files = [
            i.path
            for i in found
            if i.type == pafs.FileType.File and fnmatch.fnmatchcase(i.path, path)
        ]
    if not files:
        raise DataFormatError(f"{pattern}: matches no files")
    return fs, sorted(files)


def file_format(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    for suffix, name in _SUFFIXES.items():
        if path.endswith(suffix):
            return name
    return "text"


def plan_file(fs: pafs.FileSystem, path: str, fmt: str, shard_rows: int) -> list[Shard]:
    """Cut one file into shards of about `shard_rows` rows (index filled in by the caller)."""
    if fmt == "parquet":
        return _plan_parquet(fs, path, shard_rows)
    shards, first, rows, start, offset, line_end = [], 1, 0, 0, 0, 0
    with fs.open_input_stream(path) as fh:
        while block := fh.read(_BLOCK):
            pos = 0
            while (nl := block.find(b"\n", pos)) >= 0:
                rows, pos = rows + 1, nl + 1
                line_end = offset + pos
                if rows == shard_rows:
                    shards.append(Shard(-1, path, fmt, first, rows, start, line_end))
                    first, rows, start = first + rows, 0, line_end
            offset += len(block)
    rows += offset > line_end  # a last line without a newline is still a line
    if rows:
        shards.append(Shard(-1, path, fmt, first, rows, start, offset))
    return shards


def _plan_parquet(fs: pafs.FileSystem, path: str, shard_rows: int) -> list[Shard]:
    try:
        meta = pq.ParquetFile(fs.open_input_file(path)).metadata
    except pa.ArrowInvalid as exc:
        raise DataFormatError(f"{path}: not a readable Parquet file ({exc})") from None
    shards, groups, first, rows = [], [], 0, 0
    for g in range(meta.num_row_groups):
        groups.append(g)
        rows += meta.row_group(g).num_rows
        if rows >= shard_rows:
            shards.append(Shard(-1, path, "parquet", first, rows, row_groups=tuple(groups)))
            groups, first, rows = [], first + rows, 0
    if groups:
        shards.append(Shard(-1, path, "parquet", first, rows, row_groups=tuple(groups)))
    return shards


def read_shard(
    fs: pafs.FileSystem, shard: Shard, text_field: str, id_field: str | None, errors: str
) -> tuple[list[str], list[str]]:
    """(ids, texts) of a shard. Ids are `path:LINE`, `path#ROW` or the input's `id_field`."""
    if shard.fmt == "parquet":
        return _read_parquet(fs, shard, text_field, id_field)
    with fs.open_input_file(shard.path) as fh:
        fh.seek(shard.start)
        raw_lines = fh.read(shard.end - shard.start).split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()
    if len(raw_lines) != shard.rows:
        raise DataFormatError(f"{shard.path}: changed since the job was planned; start a new job")
    ids, texts = [], []
    for k, raw in enumerate(raw_lines):
        lineno = shard.first_row + k
        line = _decode(raw, shard.path, lineno, errors)
        if shard.fmt == "jsonl":
            row_id, line = _json_row(line, shard.path, lineno, text_field, id_field)
        else:
            row_id = f"{shard.path}:{lineno}"
        ids.append(row_id)
        texts.append(line)
    return ids, texts


def _json_row(
    line: str, path: str, lineno: int, text_field: str, id_field: str | None
) -> tuple[str, str]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
        raise DataFormatError(
            f"{path}:{lineno}: expected a JSON object with a text field {text_field!r} "
            "(choose the field with --text-field)"
        )
    if id_field is None:
        return f"{path}:{lineno}", obj[text_field]
    if id_field not in obj:
        raise DataFormatError(f"{path}:{lineno}: no id field {id_field!r}")
    return str(obj[id_field]), obj[text_field]


def _read_parquet(
    fs: pafs.FileSystem, shard: Shard, text_field: str, id_field: str | None
) -> tuple[list[str], list[str]]:
    columns = [text_field] + ([id_field] if id_field else [])
    pf = pq.ParquetFile(fs.open_input_file(shard.path))
    names = pf.schema_arrow.names
    for col in columns:
        if col not in names:
            option = "--text-field" if col == text_field else "--id-field"
            raise DataFormatError(f"{shard.path}: no column {col!r} (columns: {names}; {option})")
    table = pf.read_row_groups(list(shard.row_groups), columns=columns)
    texts = table.column(text_field).to_pylist()
    for k, text in enumerate(texts):
        if not isinstance(text, str):
            row = shard.first_row + k
            raise DataFormatError(f"{shard.path}#{row}: column {text_field!r} is not text")
    if id_field:
        ids = [str(v) for v in table.column(id_field).to_pylist()]
    else:
        ids = [f"{shard.path}#{shard.first_row + k}" for k in range(len(texts))]
    return ids, texts
