"""Command-line tools: diffcse-embed, diffcse-eval, diffcse-search.

Every error a user can cause is a DiffcseError; the tools print its one sentence and exit 1.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import click
import numpy as np
from tqdm.auto import tqdm

from diffcse_runtime.atomic import atomic_file, check_output_file, is_write_through
from diffcse_runtime.cli_errors import friendly_errors
from diffcse_runtime.encoder import Encoder, TruncationTally
from diffcse_runtime.errors import DiffcseError
from diffcse_runtime.model_dir import load_metadata
from diffcse_runtime.openvino_backend import BACKENDS, INFERENCE_PRECISIONS, check_backend
from diffcse_runtime.parallel import EncoderPool
from diffcse_runtime.textio import ERROR_MODES, iter_lines

CHUNK_LINES = 8192  # texts held in memory at once while embedding a file
PARALLEL_CHUNK_LINES = 1024  # lines per task with --processes N > 1 (two in flight per worker)
PARALLEL_MIN_LINES = 2048  # the default layout starts worker processes from this many lines
PROGRESS_LINES = 5000  # files with more lines get a progress bar


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")


model_option = click.option(
    "--model",
    "-m",
    "model",
    required=True,
    type=click.Path(path_type=Path),
    help="Model directory (model.onnx, tokenizer.json, diffcse.json) from diffcse-export.",
)
threads_option = click.option(
    "--threads",
    type=click.IntRange(min=0),
    default=None,
    help="onnxruntime intra-op threads per process (default or 0: the cores, shared out).",
)


def _check_engine(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """Refuse a --runtime / --inference-precision pair no engine runs (onnxruntime + bf16)
    as a usage error before any work starts. Each option checks once the other is known:
    click processes them in command-line order."""
    other = "inference_precision" if param.name == "runtime" else "runtime"
    if other in ctx.params:
        pair = {param.name: value, other: ctx.params[other]}
        try:
            check_backend(pair["runtime"], pair["inference_precision"])
        except ValueError as exc:
            raise click.BadParameter(str(exc), ctx, param) from None
        except DiffcseError:  # openvino not installed: the command says so, as the Encoder
            pass
    return value


runtime_option = click.option(
    "--runtime",
    "runtime",
    type=click.Choice(BACKENDS),
    callback=_check_engine,
    default="auto",
    show_default=True,
    help='Inference engine: onnxruntime, openvino (pip install "diffcse[openvino]"), or auto '
    "(openvino when installed, the model runs on the CPU and the CPU has VNNI, AVX512-BF16 "
    "or AMX; onnxruntime otherwise).",
)
precision_option = click.option(
    "--inference-precision",
    type=click.Choice(INFERENCE_PRECISIONS),
    callback=_check_engine,
    default="f32",
    show_default=True,
    help="OpenVINO's float math: f32 (what export validated), auto (bf16 where the CPU has "
    "AVX512-BF16 or AMX and the export's gate passed it for this model, else f32), or bf16.",
)
verbose_option = click.option(
    "--verbose", "-v", is_flag=True, help="Log which device runs the model."
)


# ------------------------------------------------------------------ diffcse-embed


def _chunks(lines: Iterator[tuple[int, str]], size: int) -> Iterator[list[str]]:
    while chunk := [text for _, text in itertools.islice(lines, size)]:
        yield chunk


def _spool_stdin(errors: str) -> tuple[BinaryIO, int]:
    """Copy stdin to an anonymous temporary file so it can be counted, then read it again.

    The file has no name (unlinked at once), so no copy of the user's input outlives the
    process, whatever way it ends.
    """
    spool = tempfile.TemporaryFile(prefix="diffcse-embed-")  # noqa: SIM115 - caller closes
    count = 0
    try:
        for _, text in iter_lines("-", errors):
            spool.write(text.encode("utf-8") + b"\n")
            count += 1
    except BaseException:
        spool.close()
        raise
    return spool, count


def _count_lines(path: Path, errors: str) -> int:
    """Count lines, validating UTF-8 before any output is written."""
    return sum(1 for _ in iter_lines(path, errors))


def _source(path: Path | BinaryIO) -> Path | BinaryIO:
    """A path as is; the stdin spool rewound for another pass."""
    if not isinstance(path, Path):
        path.seek(0)
    return path


def _embedded(pool: EncoderPool, path, opts: dict) -> Iterator[tuple[list[str], np.ndarray]]:
    """(lines, embeddings) chunk by chunk in file order, every vector finite; truncation
    tallied in opts."""
    size = CHUNK_LINES if pool.processes == 1 else PARALLEL_CHUNK_LINES
    chunks = _chunks(iter_lines(_source(path), opts["errors"]), size)
    first_line = 1  # every line is a text, so chunk row i is line first_line + i
    for chunk, emb, counts in pool.map_chunks(chunks, opts["batch_size"], opts["normalize"]):
        _check_finite(emb, path, first_line)
        opts["tally"].add(counts)
        opts["bar"].update(len(chunk))
        first_line += len(chunk)
        yield chunk, emb


def _check_finite(emb: np.ndarray, path, first_line: int) -> None:
    """Refuse a NaN or infinite vector before it is written: JSON has no such number (a
    strict reader rejects `NaN`), and in a .npy it would poison every search built on it.
    A finite model never gives one, so it means a broken model folder."""
    bad = ~np.isfinite(emb).all(axis=1)
    if bad.any():
        name = path if isinstance(path, Path) else "<stdin>"
        raise DiffcseError(
            f"{name}:{first_line + int(np.argmax(bad))}: the model's embedding of this line is "
            "not finite (NaN or infinity), so it is not written and no output file is made "
            "(check the model folder)"
        )


def _write_npy(pool: EncoderPool, path, n: int, out: Path, opts: dict) -> None:
    with atomic_file(out, "wb", overwrite=opts["overwrite"]) as fh:
        header = {"descr": "<f4", "fortran_order": False, "shape": (n, pool.embedding_dim)}
        np.lib.format.write_array_header_1_0(fh, header)
        for _, emb in _embedded(pool, path, opts):
            fh.write(np.ascontiguousarray(emb, dtype="<f4").tobytes())


def _write_jsonl(pool: EncoderPool, path, out: Path, opts: dict) -> None:
    with atomic_file(out, "w", overwrite=opts["overwrite"]) as fh:
        for chunk, emb in _embedded(pool, path, opts):
            for text, row in zip(chunk, emb, strict=True):
                # rows are checked finite: allow_nan=False only makes sure of it
                line = {"text": text, "embedding": row.tolist()}
                fh.write(json.dumps(line, ensure_ascii=False, allow_nan=False) + "\n")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("file", type=click.Path(path_type=Path, allow_dash=True))
@model_option
@click.option(
    "--output",
    "-o",
    required=True,
    type=click.Path(path_type=Path),
    help="Output .npy (float32, row i = line i) or .jsonl ({text, embedding} per line); "
    "- or /dev/stdout prints the JSON lines.",
)
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--normalize", is_flag=True, help="L2-normalise each embedding.")
@click.option(
    "--overwrite", is_flag=True, help="Replace an existing output file (a regular file only)."
)
@click.option(
    "--errors",
    type=click.Choice(ERROR_MODES),
    default="strict",
    show_default=True,
    help="A line that is not UTF-8: stop naming its line (strict), or replace bad bytes.",
)
@threads_option
@runtime_option
@precision_option
@click.option(
    "--processes",
    type=click.IntRange(min=1),
    default=None,
    help="Worker processes, each with its own session and --threads threads (default: one "
    "single-thread process per core from 2048 lines up, measured faster than threads).",
)
@verbose_option
@friendly_errors
def embed(
    file: Path,
    model: Path,
    output: Path,
    batch_size: int,
    normalize: bool,
    overwrite: bool,
    errors: str,
    threads: int | None,
    runtime: str,
    inference_precision: str,
    processes: int | None,
    verbose: bool,
) -> None:
    """Embed FILE (one text per line, '-' for stdin) with a model directory.

    Every line is a text, empty lines included, so row i of the output is line i of FILE.
    Large files stream in chunks; the output appears only when complete. An existing
    output is replaced only with --overwrite, and never when it is FILE itself.
    """
    _setup_logging(verbose)
    _check_embed_output(file, output, overwrite)
    load_metadata(model)  # a bad model folder fails before the input is read
    if str(file) == "-":
        source, n = _spool_stdin(errors)
    else:
        source, n = file, _count_lines(file, errors)
    if processes is None and n < PARALLEL_MIN_LINES:
        processes = 1
    choice = {"backend": runtime, "inference_precision": inference_precision}
    pool = EncoderPool(model, processes, threads or None, **choice)
    tally = TruncationTally(pool.meta.max_seq_length)
    try:
        bar = tqdm(total=n, unit="line", desc="embed", disable=n < PROGRESS_LINES, file=sys.stderr)
        opts = {
            "batch_size": batch_size,
            "normalize": normalize,
            "errors": errors,
            "bar": bar,
            "overwrite": overwrite,
            "tally": tally,
        }
        try:
            if output.suffix == ".npy":
                _write_npy(pool, source, n, output, opts)
            else:
                _write_jsonl(pool, source, output, opts)
        except FileExistsError:
            raise DiffcseError(
                f"{output}: appeared while embedding; left as it is (use --overwrite to replace it)"
            ) from None
        bar.close()
    finally:
        pool.close()
        if not isinstance(source, Path):
            source.close()
    click.echo(f"wrote {n} embeddings of dimension {pool.embedding_dim} to {output}", err=True)
    none = f"none of {n} texts was longer than max_seq_length={tally.max_seq_length} tokens"
    click.echo(tally.message() or none, err=True)


def _check_embed_output(file: Path, output: Path, overwrite: bool) -> None:
    """Refuse an output that would lose a user's file, before any work is done.

    `-` or `/dev/stdout` print JSON lines; anything else must be absent or a regular file.
    """
    if is_write_through(output):
        return
    if output.suffix not in (".npy", ".jsonl"):
        raise DiffcseError(f"{output}: output must end in .npy or .jsonl (or - for stdout)")
    if str(file) != "-" and _same_file(file, output):
        raise DiffcseError(f"{output}: is the input file itself; choose another output")
    check_output_file(output)  # a symlink, FIFO, device or folder is never replaced
    if os.path.lexists(output) and not overwrite:
        raise DiffcseError(f"{output}: already exists (use --overwrite to replace it)")
    if not output.parent.is_dir():
        raise DiffcseError(f"{output}: cannot write it, the folder {output.parent} does not exist")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


# ------------------------------------------------------------------ diffcse-eval


@click.command("diffcse-eval", context_settings={"help_option_names": ["-h", "--help"]})
@model_option
@click.option(
    "--data",
    "data_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="SentEval data folder (task folders directly or under STS/).",
)
@click.option(
    "--tasks",
    default=None,
    help="Comma-separated tasks (STS12..STS16, STSBenchmark, SICKRelatedness); default: all found.",
)
@click.option(
    "--split",
    type=click.Choice(["auto", "test", "dev", "train"]),
    default="auto",
    show_default=True,
    help="auto: test where the data has test files, else dev; the output names the split.",
)
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--json",
    "json_out",
    type=click.Path(path_type=Path),
    default=None,
    help="Also write results as JSON (- or /dev/stdout: print them).",
)
@click.option(
    "--retrieval", is_flag=True, help="Also report STS-B Recall@1/5/10 (paper section 6.2)."
)
@threads_option
@runtime_option
@precision_option
@verbose_option
@friendly_errors
def evaluate_cmd(
    model: Path,
    data_dir: Path,
    tasks: str | None,
    split: str,
    batch_size: int,
    json_out: Path | None,
    retrieval: bool,
    threads: int | None,
    runtime: str,
    inference_precision: str,
    verbose: bool,
) -> None:
    """Spearman x 100 on the STS tasks, as in Table 1 of the DiffCSE paper."""
    from diffcse_runtime.retrieval import recall_at_k
    from diffcse_runtime.sts import evaluate, format_table, resolve_split

    _setup_logging(verbose)
    if json_out:
        _check_writable(json_out)  # before the evaluation, not after it
    task_list = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
    split = resolve_split(data_dir, task_list, split)  # no data: fail before loading a model
    encoder = Encoder(
        model, intra_op_threads=threads, backend=runtime, inference_precision=inference_precision
    )
    encode = functools.partial(encoder.encode, batch_size=batch_size)
    result = evaluate(encode, data_dir, task_list, split)
    click.echo(format_table(result))
    payload = {"model": str(model), **result.to_json()}
    if retrieval:
        payload["retrieval"] = recall_at_k(encode, data_dir, split)
        click.echo(
            "STS-B retrieval: "
            + ", ".join(f"{k} {v:.2f}" for k, v in payload["retrieval"].items() if k != "queries")
        )
    if json_out:
        body = strict_json(payload, json_out)
        with atomic_file(json_out, "w") as fh:
            fh.write(body)


def strict_json(payload: dict, path: Path) -> str:
    """JSON text of `payload`, refusing NaN and Infinity: Python would write them as bare
    `NaN`, which is not JSON, and every reader of the file after us would choke on it."""
    try:
        return json.dumps(payload, indent=2, allow_nan=False) + "\n"
    except ValueError:
        raise DiffcseError(f"{path}: a result is not a finite number; nothing written") from None


def _check_writable(path: Path) -> None:
    if is_write_through(path):
        return
    check_output_file(path)  # a folder, symlink, FIFO or device is never replaced
    if not path.parent.is_dir():
        raise DiffcseError(f"{path}: cannot write it, the folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise DiffcseError(f"{path}: cannot write it, no permission to write in {path.parent}")


# ------------------------------------------------------------------ diffcse-search


@click.command("diffcse-search", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("queries", nargs=-1)
@click.option(
    "--index", "index_dir", required=True, type=click.Path(path_type=Path), help="Index folder."
)
@click.option(
    "--build",
    "build_file",
    type=click.Path(path_type=Path, allow_dash=True),
    default=None,
    help="Build the index from this file (one text per line, empty lines skipped) first.",
)
@click.option(
    "--model",
    "-m",
    "model",
    type=click.Path(path_type=Path),
    default=None,
    help="Model directory; needed with --build, else the one recorded in the index.",
)
@click.option("-k", "top_k", default=10, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--backend",
    type=click.Choice(["auto", "numpy", "faiss", "usearch"]),
    default="numpy",
    show_default=True,
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace an index folder diffcse-search wrote (its .diffcse-manifest.json lists "
    "every entry; anything else there is refused).",
)
@click.option(
    "--errors",
    type=click.Choice(ERROR_MODES),
    default="strict",
    show_default=True,
    help="A --build line that is not UTF-8: stop naming its line (strict), or replace bad bytes.",
)
@click.option(
    "--verify-index",
    is_flag=True,
    help="Hash every byte of the index (default: sizes, a hash of its first and last MB, "
    "and every row checked to be finite).",
)
@click.option("--json", "as_json", is_flag=True, help="Print hits as JSON lines.")
@threads_option
@runtime_option
@precision_option
@verbose_option
@friendly_errors
def search(
    queries: tuple[str, ...],
    index_dir: Path,
    build_file: Path | None,
    model: Path | None,
    top_k: int,
    backend: str,
    overwrite: bool,
    errors: str,
    verify_index: bool,
    as_json: bool,
    threads: int | None,
    runtime: str,
    inference_precision: str,
    verbose: bool,
) -> None:
    """Search an index for QUERIES (cosine top-k); build it with --build FILE --model DIR."""
    from diffcse_runtime.retrieval import Index

    _setup_logging(verbose)
    runtime_kw = {
        "intra_op_threads": threads,
        "backend": runtime,
        "inference_precision": inference_precision,
    }
    if build_file is not None:
        if model is None:
            raise DiffcseError("--build needs --model DIR to embed the texts")
        _check_index_target(index_dir, build_file, overwrite)
        encoder = Encoder(model, **runtime_kw)
        texts = [t for _, t in iter_lines(build_file, errors) if t.strip()]
        Index.build(encoder, texts).save(index_dir, overwrite=overwrite, inputs=[build_file])
        click.echo(f"indexed {len(texts)} texts into {index_dir}", err=True)
    verify = "full" if verify_index else "sample"
    index = Index.load(index_dir, backend=backend, verify=verify)
    if not queries:
        return
    encoder = _encoder_for_index(index, model, runtime_kw) if build_file is None else encoder
    for query, hits in zip(queries, index.search(encoder, list(queries), top_k), strict=True):
        for rank, hit in enumerate(hits, start=1):
            if as_json:
                click.echo(
                    json.dumps(
                        {
                            "query": query,
                            "rank": rank,
                            "score": hit.score,
                            "index": hit.index,
                            "text": hit.text,
                        },
                        ensure_ascii=False,
                        allow_nan=False,  # rows and queries are checked finite: never NaN
                    )
                )
            else:
                click.echo(f"{rank:>3}  {hit.score:.4f}  {hit.text}")


def _check_index_target(index_dir: Path, build_file: Path, overwrite: bool) -> None:
    """Before embedding anything: the index may replace only an index folder we wrote."""
    from diffcse_runtime.atomic import check_replaceable
    from diffcse_runtime.ownership import check_not_in_use
    from diffcse_runtime.retrieval import INDEX_TOOL

    check_not_in_use(index_dir, [build_file])  # also when it is new: the input sits inside
    try:
        check_replaceable(index_dir, overwrite, INDEX_TOOL, "an index folder", [build_file])
    except FileExistsError:
        raise DiffcseError(f"{index_dir}: already exists (use --overwrite to replace it)") from None


def _encoder_for_index(index, model: Path | None, runtime_kw: dict) -> Encoder:
    """The model recorded in the index, or `model`; refuse a model that did not build it."""
    path = model or index.meta.get("model")
    if not path:
        raise DiffcseError("this index records no model: pass --model DIR")
    encoder = Encoder(path, **runtime_kw)
    built_files = index.meta.get("model_files") or {}
    mine = encoder.meta.files
    differ = sorted(n for n in set(built_files) & set(mine) if built_files[n] != mine[n])
    differ += sorted(set(built_files) ^ set(mine)) if built_files and mine else []
    built = index.meta.get("onnx_sha256")
    if built and built != encoder.meta.onnx_sha256 and "model.onnx" not in differ:
        differ.append("model.onnx")
    if differ:
        raise DiffcseError(
            f"{path} is not the model this index was built with ({', '.join(differ)} differs): "
            "queries and texts would live in different embedding spaces"
        )
    return encoder
