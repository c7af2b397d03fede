"""The whole embedding job on Ray Data: plan shards, embed them in an actor pool, resume.

    plan (one Ray task per input file) -> from_items(shards not yet written)
      -> map_batches(ShardWriter, actor pool, batch_size=1 shard)
           each actor: read its shard -> Encoder -> Parquet part, published atomically
      -> manifest.json (model hash, rows in, rows out), published atomically

Each shard is written whole or not at all, under a name fixed by the plan. That one rule
gives both guarantees the job needs: a retried task (an actor killed and restarted by Ray)
rewrites the same part with the same rows, so every row lands exactly once; and a rerun
after a failure finds the finished parts and embeds only the missing ones.

Input changes: every part carries the digest of the bytes it was embedded from, a rerun
plans again only the inputs whose stamp changed and redoes exactly the shards whose bytes
differ (record.py), and the manifest is written only if no input changed while the job
read it. So no part, and no manifest, ever describes an input other than the one read.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from diffcse_runtime.atomic import atomic_file
from diffcse_runtime.errors import DiffcseError
from diffcse_runtime.model_dir import load_metadata
from diffcse_runtime.ray_embed.batch import TextEmbedder, embedding_array, text_hashes
from diffcse_runtime.ray_embed.folder import (
    MANIFEST_FILE,
    check_folder,
    part_file,
    remove_parts,
)
from diffcse_runtime.ray_embed.inputs import (
    Shard,
    file_format,
    list_files,
    plan_file,
    read_shard,
    same_stamp,
    stamp,
)
from diffcse_runtime.ray_embed.inputs import resolve as resolve_fs
from diffcse_runtime.ray_embed.record import JOB_FILE, Record, reconcile

log = logging.getLogger("diffcse_runtime.ray_embed")
MANIFEST_FORMAT = "diffcse-embed-ray/2"
PART_DIGEST_KEY = b"diffcse.input_sha256"  # Parquet metadata: the bytes a part came from
# Parquet metadata: the engine and float math of the actor that wrote the part, as it ran
# (onnxruntime has no precision setting, so its parts carry no precision key)
PART_BACKEND_KEY = b"diffcse.backend"
PART_PRECISION_KEY = b"diffcse.inference_precision"


@dataclass
class JobSpec:
    """What decides the output: a rerun with a different spec would mix two jobs, so it is
    refused ("holds a different job (changed: ...)").

    `inference_precision` and `engine` are here because they change the vectors, so a
    rerun with another would leave parts of two kinds: bf16 moves them (min cosine ~0.995
    to f32), and an int8 graph's vectors differ between onnxruntime and OpenVINO (min
    cosine 0.992). Both are the concrete choice the command made for every actor ("auto"
    resolved once, see `cli.job_engine`). A float32 graph gives the same vectors on both
    engines (~1e-6), so its `engine` is "any": a rerun may switch engines and keep the
    finished parts. The actors' threads and batch size are not here either.
    """

    inputs: list[str]
    model_sha256: str
    fmt: str = "auto"
    text_field: str = "text"
    id_field: str | None = None
    shard_rows: int = 100_000
    normalize: bool = False
    keep_text: bool = False
    errors: str = "strict"
    inference_precision: str = "f32"
    engine: str = "any"


# spec keys added after records were first written, with the value those jobs ran with
SPEC_ADDED = {"inference_precision": "f32", "engine": "any"}


@dataclass
class JobResult:
    rows_in: int
    rows_out: int
    shards: int
    shards_written: int
    shards_skipped: int
    seconds: float
    manifest: str
    written: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)  # inputs changed since the last run


def part_name(shard: Shard) -> str:
    return part_file(shard.index)


class ShardWriter(TextEmbedder):
    """The job's actor: embeds whole shards and publishes each as one Parquet part."""

    def __init__(self, model_dir: str, output_dir: str, spec: dict, **embedder_kwargs) -> None:
        self.spec = spec
        self.out_fs, self.out_path = resolve_fs(output_dir)
        self.in_fs: dict[str, pafs.FileSystem] = {}
        self.unusable = ""  # why this actor's Encoder could not be built, if it could not
        try:
            super().__init__(
                model_dir,
                normalize=spec["normalize"],
                inference_precision=spec["inference_precision"],
                **embedder_kwargs,
            )
        except DiffcseError as exc:
            # a setting this node cannot run (no openvino package, no bf16 in its CPU, no
            # model folder at that path): raised here, Ray would report only an actor death
            # and a traceback text, so it comes back as each shard's error instead
            self.unusable = str(exc)

    def __call__(self, batch: dict) -> dict:
        """One summary row per shard. A user error (a malformed line) comes back as data:
        Ray would wrap the exception in its own types and keep only its traceback text."""
        out: dict[str, list] = {"shard": [], "rows": [], "error": []}
        for raw in batch["shard"]:
            shard = Shard.from_dict(json.loads(raw))
            try:
                if self.unusable:
                    raise DiffcseError(self.unusable)
                rows, error = self.write_shard(shard)[1], ""
            except DiffcseError as exc:
                rows, error = -1, str(exc)
            out["shard"].append(shard.index)
            out["rows"].append(rows)
            out["error"].append(error)
        return out

    def write_shard(self, shard: Shard) -> tuple[int, int]:
        fs = self.in_fs.get(shard.path) or resolve_fs(self.spec["inputs_fs"][shard.path])[0]
        self.in_fs[shard.path] = fs
        spec = self.spec
        ids, texts = read_shard(fs, shard, spec["text_field"], spec["id_field"], spec["errors"])
        columns = {
            "id": pa.array(ids, type=pa.string()),
            "text_hash": text_hashes(texts),
            "embedding": embedding_array(self.embed(texts)),
        }
        if spec["keep_text"]:
            columns["text"] = pa.array(texts, type=pa.string())
        meta = {PART_DIGEST_KEY: shard.digest, PART_BACKEND_KEY: self.encoder.backend}
        if self.encoder.inference_precision:  # OpenVINO's effective one
            meta[PART_PRECISION_KEY] = self.encoder.inference_precision
        table = pa.table(columns).replace_schema_metadata(meta)
        write_table(table, self.out_fs, f"{self.out_path}/{part_name(shard)}")
        return shard.index, len(ids)


def write_table(table: pa.Table, fs: pafs.FileSystem, path: str) -> None:
    """Publish a Parquet file whole: atomic rename locally; object stores (S3, GCS) make an
    object visible only when its upload completes, so a plain write is already whole."""
    if isinstance(fs, pafs.LocalFileSystem):
        with atomic_file(path) as fh:
            pq.write_table(table, fh)
    else:
        with fs.open_output_stream(path) as fh:
            pq.write_table(table, fh)


def input_files(spec: JobSpec) -> dict[str, str]:
    """{path on its filesystem: the URI to reopen it by} of every input file, in order."""
    files: dict[str, str] = {}
    for pattern in spec.inputs:
        _, paths = list_files(pattern)
        prefix = pattern.split("://", 1)[0] + "://" if "://" in pattern else ""
        files.update({p: prefix + p if prefix and "://" not in p else p for p in paths})
    return files


def plan(spec: JobSpec, files: dict[str, str]) -> dict[str, tuple[list[Shard], dict]]:
    """{path: (shards, stamp)} of `files`, planned in parallel Ray tasks (one per file)."""

    @ray.remote(num_cpus=0.25)
    def plan_one(uri: str, path: str) -> tuple[list[Shard], dict]:
        fs = resolve_fs(uri)[0]
        return plan_file(fs, path, file_format(path, spec.fmt), spec.shard_rows)

    try:
        planned = ray.get([plan_one.remote(uri, path) for path, uri in files.items()])
    except ray.exceptions.RayTaskError as exc:  # a bad file: its one sentence, no traceback
        if isinstance(exc.cause, DiffcseError):
            raise DiffcseError(str(exc.cause)) from None
        raise
    return dict(zip(files, planned, strict=True))


def load_or_plan(out_fs, out_path: str, spec: JobSpec) -> tuple[Record, list[str]]:
    """This output folder's plan brought up to date with the inputs (and the notes saying
    which inputs changed), or a new plan; a folder that is not this job's is refused
    before anything is planned or written (folder.py)."""
    job_path = f"{out_path}/{JOB_FILE}"
    files = input_files(spec)
    saved = check_folder(out_fs, out_path, [*spec.inputs, *files.values()], out_path)
    asked = vars(spec)
    was = {**SPEC_ADDED, **saved.spec} if saved is not None else asked
    if was != asked:
        changed = sorted(k for k in was.keys() | asked if was.get(k) != asked.get(k))
        raise DiffcseError(
            f"{out_path}: holds a different job (changed: {', '.join(changed)}); "
            "use a new output folder"
        )
    old_stamps = saved.files if saved else {}
    now = {p: stamp(resolve_fs(u)[0], p) for p, u in files.items()}
    again = [p for p in files if not same_stamp(old_stamps.get(p), now[p])]
    planned = plan(spec, {p: files[p] for p in again}) if again else {}
    old_shards = saved.shards if saved else []
    shards, retired, notes = reconcile(
        old_shards, {p: planned[p][0] for p in planned}, list(files), saved.retired if saved else []
    )
    stamps = {p: planned[p][1] if p in planned else old_stamps[p] for p in files}
    record = Record(vars(spec), files, stamps, shards, retired)
    if saved is None or record.to_json() != saved.to_json():
        if saved is None:
            out_fs.create_dir(out_path, recursive=True)
        _write_json(out_fs, job_path, record.to_json())
    return record, notes


def finished(out_fs, out_path: str, shards: list[Shard]) -> tuple[dict[int, int], list[str]]:
    """{shard index: rows} of the parts already published whole, with the planned rows,
    from the planned bytes; and a note for each part that could not be read (redone)."""
    infos = out_fs.get_file_info(pafs.FileSelector(out_path))
    present = {i.base_name for i in infos if i.type == pafs.FileType.File}
    done, notes = {}, []
    for shard in shards:
        name = part_name(shard)
        if name not in present:
            continue
        try:
            pf = pq.ParquetFile(out_fs.open_input_file(f"{out_path}/{name}"))
            rows, meta = pf.metadata.num_rows, pf.schema_arrow.metadata or {}
        except (pa.ArrowInvalid, OSError) as exc:
            notes.append(f"{out_path}/{name}: unreadable ({exc}); embedding its rows again")
            continue
        if (
            rows == shard.rows
            and shard.digest
            and meta.get(PART_DIGEST_KEY) == shard.digest.encode()
        ):
            done[shard.index] = rows
    return done, notes


def check_inputs_unchanged(record: Record) -> None:
    """Publish nothing built from an input that changed while the job read it."""
    for path, uri in record.uris.items():
        if stamp(resolve_fs(uri)[0], path) != record.files[path]:
            raise DiffcseError(
                f"{path}: changed while the job read it, so no manifest was written; rerun "
                "the same command to redo exactly the changed parts"
            )


def run_job(
    spec: JobSpec,
    model_dir: str | Path,
    output_dir: str,
    actors: int,
    cpus_per_actor: float = 1.0,
    threads: int = 1,
    batch_size: int = 64,
    backend: str = "auto",
    worker: type[ShardWriter] = ShardWriter,
    progress: Callable[[int, int], None] | None = None,
    notify: Callable[[str], None] | None = None,
) -> JobResult:
    """Embed every shard not yet written, then write the manifest. Ray must be running.

    A dead actor (killed, out of memory, its node lost) is restarted and its shards retried:
    Ray Data's default for actor pools (`max_restarts=-1`, `max_task_retries=-1`), which
    Ray 2.60 deprecates overriding through `map_batches`. An exception raised by our code
    (a malformed line) is not retried: it fails the job with its message.

    `backend`: each actor's `Encoder` engine ("auto", "onnxruntime", "openvino"; the
    command passes the one it resolved, as `spec.engine` records for an int8 graph); its
    precision is `spec.inference_precision` (see JobSpec).
    """
    started = time.perf_counter()
    out_fs, out_path = resolve_fs(output_dir)
    record, changes = load_or_plan(out_fs, out_path, spec)
    shards, uris = record.shards, record.uris
    remove_parts(out_fs, out_path, record.retired)  # listed by our record, regular files
    done, unreadable = finished(out_fs, out_path, shards)
    changes += unreadable
    for note in changes:  # before the work: which inputs changed and what is redone
        (notify or log.warning)(note)
    todo = [s for s in shards if s.index not in done]
    rows_out = sum(done.values())
    if todo:
        ds = ray.data.from_items(
            [{"shard": json.dumps(s.to_dict())} for s in todo], override_num_blocks=len(todo)
        )
        ds = ds.map_batches(
            worker,
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=max(1, min(actors, len(todo)))),
            num_cpus=cpus_per_actor,
            fn_constructor_kwargs={
                "model_dir": str(model_dir),
                "output_dir": output_dir,
                "spec": {**vars(spec), "inputs_fs": uris},
                "intra_op_threads": threads,
                "batch_size": batch_size,
                "backend": backend,
            },
        )
        rows = iter(ds.iter_rows())
        try:
            for row in rows:
                if row["error"]:
                    raise DiffcseError(str(row["error"]))
                rows_out += int(row["rows"])
                done[int(row["shard"])] = int(row["rows"])
                if progress:
                    progress(len(done), len(shards))
        except BaseException as exc:
            # a SIGTERM (or an error) raised inside Ray Data's iterator: the traceback's
            # frames hold its executor, which the caller's ray.shutdown() would outlive and
            # whose __del__ then prints Ray tracebacks; freed here, it stops while Ray is up
            traceback.clear_frames(exc.__traceback__)
            raise
        finally:
            # stop Ray Data's executor now, also on an error or a SIGTERM: left to garbage
            # collection it stops at interpreter exit, after Ray is gone, with tracebacks
            close = getattr(rows, "close", None)
            if close is not None:
                close()
            del rows
    rows_in = sum(s.rows for s in shards)
    check_inputs_unchanged(record)
    manifest = _manifest(spec, model_dir, record, rows_in, rows_out)
    _write_json(out_fs, f"{out_path}/{MANIFEST_FILE}", manifest)
    return JobResult(
        rows_in=rows_in,
        rows_out=rows_out,
        shards=len(shards),
        shards_written=len(todo),
        shards_skipped=len(shards) - len(todo),
        seconds=time.perf_counter() - started,
        manifest=f"{out_path}/{MANIFEST_FILE}",
        written=[part_name(s) for s in todo],
        changes=changes,
    )


def _manifest(spec: JobSpec, model_dir, record: Record, rows_in: int, rows_out: int):
    meta = load_metadata(model_dir, verify_hash=False)
    return {
        "format": MANIFEST_FORMAT,
        "model": {
            "path": str(model_dir),
            "onnx_sha256": spec.model_sha256,
            "embedding_dim": meta.embedding_dim,
            "normalized": spec.normalize,
            "inference_precision": spec.inference_precision,  # as resolved; see JobSpec
            "engine": spec.engine,
        },
        "inputs": spec.inputs,
        "files": record.files,  # each input file's size and mtime_ns when it was read
        "rows_in": rows_in,
        "rows_out": rows_out,
        "complete": rows_in == rows_out,
        "columns": {"id": "string", "text_hash": "blake2b-128", "embedding": "float32 list"},
        "parts": [
            {
                "file": part_name(s),
                "rows": s.rows,
                "source": s.path,
                "first_row": s.first_row,
                "input_sha256": s.digest,  # of the bytes the part was embedded from
            }
            for s in record.shards
        ],
    }


def _write_json(fs: pafs.FileSystem, path: str, body: dict) -> None:
    data = (json.dumps(body, indent=1, allow_nan=False) + "\n").encode("utf-8")
    if isinstance(fs, pafs.LocalFileSystem):
        with atomic_file(path) as fh:
            fh.write(data)
    else:
        with fs.open_output_stream(path) as fh:
            fh.write(data)
