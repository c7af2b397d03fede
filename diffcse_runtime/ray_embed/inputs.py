"""Inputs of `diffcse-embed-ray`: find the files, cut them into shards, read one shard.

A shard is a fixed run of rows of one input file: `rows` lines starting at byte `start` of
a text/JSONL file, or a run of row groups of a Parquet file. Shards are planned from the
input alone (line offsets, Parquet footers), so a rerun plans the very same shards and can
skip the ones already written. Files are read through pyarrow filesystems, so `s3://`,
`gs://`, `hdfs://` and local paths work alike.

Each shard carries the SHA-256 of the bytes it covers (its lines, or its row groups' column
chunks), and each planned file its size and modification time. Reading a shard checks its
bytes against the digest, so a part is never built from bytes other than the planned ones,
and a rerun compares stamps and digests to find exactly the shards whose input changed.
"""

from __future__ import annotations

import fnmatch
import hashlib
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
    digest: str = ""  # SHA-256 of the bytes the shard covers ("" in jobs from before it)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> Shard:
        return cls(**{**raw, "row_groups": tuple(raw.get("row_groups") or ())})

    def same_input(self, other: Shard) -> bool:
        """The same rows from the same bytes: only then may one's part stand for the other.
        Where the bytes sit (`start`, `row_groups`) does not matter: a line edited to another
        length moves every later shard's bytes, but not their rows or contents."""
        keys = ("path", "fmt", "first_row", "rows", "digest")
        return bool(self.digest) and all(getattr(self, k) == getattr(other, k) for k in keys)


def stamp(fs: pafs.FileSystem, path: str) -> dict:
    """What identifies a file's version cheaply: its size and modification time (None
    where the filesystem keeps none, which then never matches, so the file is rehashed)."""
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise DataFormatError(f"{path}: no longer exists or is not a file")
    return {"size": info.size, "mtime_ns": info.mtime_ns}


def same_stamp(a: dict | None, b: dict | None) -> bool:
    return bool(a and b) and a.get("mtime_ns") is not None and a == b


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


def plan_file(
    fs: pafs.FileSystem, path: str, fmt: str, shard_rows: int
) -> tuple[list[Shard], dict]:
    """Cut one file into shards of about `shard_rows` rows (index filled in by the caller),
    each with the digest of its bytes, and the file's stamp. A file that changes while it
    is read (its stamp, or the bytes read against its size) is refused: a plan must
    describe one version of the file."""
    before = stamp(fs, path)
    if fmt == "parquet":
        shards, read = _plan_parquet(fs, path, shard_rows), before["size"]
    else:
        shards, read = _plan_lines(fs, path, fmt, shard_rows)
    if stamp(fs, path) != before or read != before["size"]:
        raise DataFormatError(f"{path}: changed while it was read; rerun once nothing writes to it")
    return shards, before


def _plan_lines(fs: pafs.FileSystem, path: str, fmt: str, shard_rows: int):
    shards, first, rows, start, offset, line_end = [], 1, 0, 0, 0, 0
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as fh:
        while block := fh.read(_BLOCK):
            pos = hashed = 0
            while (nl := block.find(b"\n", pos)) >= 0:
                rows, pos = rows + 1, nl + 1
                line_end = offset + pos
                if rows == shard_rows:
                    digest.update(block[hashed:pos])
                    hashed = pos
                    shards.append(
                        Shard(-1, path, fmt, first, rows, start, line_end, (), digest.hexdigest())
                    )
                    first, rows, start = first + rows, 0, line_end
                    digest = hashlib.sha256()
            digest.update(block[hashed:])
            offset += len(block)
    rows += offset > line_end  # a last line without a newline is still a line
    if rows:
        shards.append(Shard(-1, path, fmt, first, rows, start, offset, (), digest.hexdigest()))
    return shards, offset


def _plan_parquet(fs: pafs.FileSystem, path: str, shard_rows: int) -> list[Shard]:
    try:
        meta = pq.ParquetFile(fs.open_input_file(path)).metadata
    except pa.ArrowInvalid as exc:
        raise DataFormatError(f"{path}: not a readable Parquet file ({exc})") from None
    shards, groups, first, rows = [], [], 0, 0
    with fs.open_input_file(path) as fh:
        for g in range(meta.num_row_groups):
            groups.append(g)
            rows += meta.row_group(g).num_rows
            if rows >= shard_rows or g == meta.num_row_groups - 1:
                digest = _row_groups_digest(fh, meta, groups)
                shards.append(Shard(-1, path, "parquet", first, rows, 0, 0, tuple(groups), digest))
                groups, first, rows = [], first + rows, 0
    return shards


def _row_groups_digest(fh, meta, groups) -> str:
    """SHA-256 of the stored bytes of `groups` (every column chunk, in order)."""
    digest = hashlib.sha256()
    for g in groups:
        group = meta.row_group(g)
        for c in range(group.num_columns):
            col = group.column(c)
            starts = [col.data_page_offset]
            if col.has_dictionary_page and col.dictionary_page_offset:
                starts.append(col.dictionary_page_offset)
            start, left = min(starts), col.total_compressed_size
            while left > 0:
                chunk = fh.read_at(min(left, _BLOCK), start)
                if not chunk:
                    break
                digest.update(chunk)
                start, left = start + len(chunk), left - len(chunk)
    return digest.hexdigest()


def read_shard(
    fs: pafs.FileSystem, shard: Shard, text_field: str, id_field: str | None, errors: str
) -> tuple[list[str], list[str]]:
    """(ids, texts) of a shard. Ids are `path:LINE`, `path#ROW` or the input's `id_field`."""
    if shard.fmt == "parquet":
        return _read_parquet(fs, shard, text_field, id_field)
    with fs.open_input_file(shard.path) as fh:
        fh.seek(shard.start)
        data = fh.read(shard.end - shard.start)
    raw_lines = data.split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()
    if len(raw_lines) != shard.rows or (
        shard.digest and hashlib.sha256(data).hexdigest() != shard.digest
    ):
        raise changed_error(shard)
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
    fh = fs.open_input_file(shard.path)  # one handle: the bytes hashed are the bytes read
    pf = pq.ParquetFile(fh)
    groups = list(shard.row_groups)
    if pf.metadata.num_row_groups <= max(groups, default=-1) or (
        shard.digest and _row_groups_digest(fh, pf.metadata, groups) != shard.digest
    ):
        raise changed_error(shard)
    names = pf.schema_arrow.names
    for col in columns:
        if col not in names:
            option = "--text-field" if col == text_field else "--id-field"
            raise DataFormatError(f"{shard.path}: no column {col!r} (columns: {names}; {option})")
    table = pf.read_row_groups(groups, columns=columns)
    if table.num_rows != shard.rows:
        raise changed_error(shard)
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


def changed_error(shard: Shard) -> DataFormatError:
    """A shard's bytes differ from the planned ones: the input changed after planning."""
    last = shard.first_row + shard.rows - 1
    where = f"lines {shard.first_row}-{last}" if shard.fmt != "parquet" else "its row groups"
    return DataFormatError(
        f"{shard.path}: changed since the job was planned ({where} differ); rerun the same "
        "command to redo exactly the changed parts"
    )
