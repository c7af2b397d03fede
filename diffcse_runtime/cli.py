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

import click
import numpy as np
from tqdm.auto import tqdm

from diffcse_runtime.atomic import atomic_file
from diffcse_runtime.encoder import Encoder
from diffcse_runtime.errors import DiffcseError, friendly_errors
from diffcse_runtime.textio import ERROR_MODES, iter_lines

CHUNK_LINES = 8192  # texts held in memory at once while embedding a file
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
    "--threads", type=int, default=None, help="onnxruntime intra-op threads."
)
verbose_option = click.option(
    "--verbose", "-v", is_flag=True, help="Log which device runs the model."
)


# ------------------------------------------------------------------ diffcse-embed


def _chunks(lines: Iterator[tuple[int, str]], size: int) -> Iterator[list[str]]:
    while chunk := [text for _, text in itertools.islice(lines, size)]:
        yield chunk


def _spool_stdin(errors: str) -> tuple[Path, int]:
    """Copy stdin to a temporary file so it can be counted, then read like any file."""
    fd, tmp = tempfile.mkstemp(prefix="diffcse-embed-", suffix=".txt")
    count = 0
    with os.fdopen(fd, "wb") as out:
        for _, text in iter_lines("-", errors):
            out.write(text.encode("utf-8") + b"\n")
            count += 1
    return Path(tmp), count


def _count_lines(path: Path, errors: str) -> int:
    """Count lines, validating UTF-8 before any output is written."""
    return sum(1 for _ in iter_lines(path, errors))


def _write_npy(encoder: Encoder, path: Path, n: int, out: Path, opts: dict) -> None:
    with atomic_file(out, "wb") as fh:
        header = {"descr": "<f4", "fortran_order": False, "shape": (n, encoder.embedding_dim)}
        np.lib.format.write_array_header_1_0(fh, header)
        for chunk in _chunks(iter_lines(path, opts["errors"]), CHUNK_LINES):
            emb = encoder.encode(chunk, batch_size=opts["batch_size"], normalize=opts["normalize"])
            fh.write(np.ascontiguousarray(emb, dtype="<f4").tobytes())
            opts["bar"].update(len(chunk))


def _write_jsonl(encoder: Encoder, path: Path, out: Path, opts: dict) -> None:
    with atomic_file(out, "w") as fh:
        for chunk in _chunks(iter_lines(path, opts["errors"]), CHUNK_LINES):
            emb = encoder.encode(chunk, batch_size=opts["batch_size"], normalize=opts["normalize"])
            for text, row in zip(chunk, emb, strict=True):
                fh.write(
                    json.dumps({"text": text, "embedding": row.tolist()}, ensure_ascii=False) + "\n"
                )
            opts["bar"].update(len(chunk))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("file", type=click.Path(path_type=Path, allow_dash=True))
@model_option
@click.option(
    "--output",
    "-o",
    required=True,
    type=click.Path(path_type=Path),
    help="Output .npy (float32, row i = line i) or .jsonl ({text, embedding} per line).",
)
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--normalize", is_flag=True, help="L2-normalise each embedding.")
@click.option(
    "--errors",
    type=click.Choice(ERROR_MODES),
    default="strict",
    show_default=True,
    help="A line that is not UTF-8: stop naming its line (strict), or replace bad bytes.",
)
@threads_option
@verbose_option
@friendly_errors
def embed(
    file: Path,
    model: Path,
    output: Path,
    batch_size: int,
    normalize: bool,
    errors: str,
    threads: int | None,
    verbose: bool,
) -> None:
    """Embed FILE (one text per line, '-' for stdin) with a model directory.

    Every line is a text, empty lines included, so row i of the output is line i of FILE.
    Large files stream in chunks; the output appears only when complete.
    """
    _setup_logging(verbose)
    if output.suffix not in (".npy", ".jsonl"):
        raise DiffcseError(f"{output}: output must end in .npy or .jsonl")
    encoder = Encoder(model, intra_op_threads=threads)
    spooled = None
    if str(file) == "-":
        spooled, n = _spool_stdin(errors)
        file = spooled
    else:
        n = _count_lines(file, errors)
    try:
        bar = tqdm(total=n, unit="line", desc="embed", disable=n < PROGRESS_LINES, file=sys.stderr)
        opts = {"batch_size": batch_size, "normalize": normalize, "errors": errors, "bar": bar}
        if output.suffix == ".npy":
            _write_npy(encoder, file, n, output, opts)
        else:
            _write_jsonl(encoder, file, output, opts)
        bar.close()
    finally:
        if spooled:
            spooled.unlink(missing_ok=True)
    click.echo(f"wrote {n} embeddings of dimension {encoder.embedding_dim} to {output}", err=True)


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
    "--split", type=click.Choice(["test", "dev", "train"]), default="test", show_default=True
)
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--json",
    "json_out",
    type=click.Path(path_type=Path),
    default=None,
    help="Also write results as JSON.",
)
@click.option(
    "--retrieval", is_flag=True, help="Also report STS-B Recall@1/5/10 (paper section 6.2)."
)
@threads_option
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
    verbose: bool,
) -> None:
    """Spearman x 100 on the STS tasks, as in Table 1 of the DiffCSE paper."""
    from diffcse_runtime.retrieval import recall_at_k
    from diffcse_runtime.sts import evaluate, format_table

    _setup_logging(verbose)
    encoder = Encoder(model, intra_op_threads=threads)
    encode = functools.partial(encoder.encode, batch_size=batch_size)
    task_list = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
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
        with atomic_file(json_out, "w") as fh:
            json.dump(payload, fh, indent=2)


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
@click.option("--overwrite", is_flag=True, help="Replace an existing index folder with --build.")
@click.option("--json", "as_json", is_flag=True, help="Print hits as JSON lines.")
@threads_option
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
    as_json: bool,
    threads: int | None,
    verbose: bool,
) -> None:
    """Search an index for QUERIES (cosine top-k); build it with --build FILE --model DIR."""
    from diffcse_runtime.retrieval import Index

    _setup_logging(verbose)
    if build_file is not None:
        if model is None:
            raise DiffcseError("--build needs --model DIR to embed the texts")
        encoder = Encoder(model, intra_op_threads=threads)
        texts = [t for _, t in iter_lines(build_file) if t.strip()]
        Index.build(encoder, texts).save(index_dir, overwrite=overwrite)
        click.echo(f"indexed {len(texts)} texts into {index_dir}", err=True)
    index = Index.load(index_dir, backend=backend)
    if not queries:
        return
    encoder = _encoder_for_index(index, model, threads) if build_file is None else encoder
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
                    )
                )
            else:
                click.echo(f"{rank:>3}  {hit.score:.4f}  {hit.text}")


def _encoder_for_index(index, model: Path | None, threads: int | None) -> Encoder:
    """The model recorded in the index, or `model`; refuse a model that did not build it."""
    path = model or index.meta.get("model")
    if not path:
        raise DiffcseError("this index records no model: pass --model DIR")
    encoder = Encoder(path, intra_op_threads=threads)
    built_with = index.meta.get("onnx_sha256")
    if built_with and built_with != encoder.meta.onnx_sha256:
        raise DiffcseError(
            f"{path} is not the model this index was built with (model.onnx hash differs): "
            "queries and texts would live in different embedding spaces"
        )
    return encoder
