"""diffcse-export CHECKPOINT OUT/model.onnx: validated ONNX model directories.

Bad input and failed validation print one sentence and exit 1; nothing is written then.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import click

from diffcse_export.errors import ExportError, ValidationError
from diffcse_export.pipeline import ExportOptions, export_model, target_dirs
from diffcse_export.validate import Thresholds, format_table
from diffcse_export.variants import VARIANTS
from diffcse_runtime.bounds import field_bound
from diffcse_runtime.cli_errors import friendly_errors

DEFAULT_STS_DATA = "../shared/data/sts"


def parse_limits(values: tuple[str, ...], option: str, opts: ExportOptions) -> None:
    """Apply `VARIANT=VALUE` overrides (e.g. `--atol int8=0.3`, `VALUE` "none" ungates)."""
    key = option.lstrip("-").replace("-", "_")
    for item in values:
        variant, sep, raw = item.partition("=")
        if not sep or variant not in VARIANTS:
            raise ExportError(
                f"{option} {item!r}: expected VARIANT=VALUE, VARIANT one of {', '.join(VARIANTS)}"
            )
        try:
            value = None if raw.lower() == "none" else float(raw)
        except ValueError:
            raise ExportError(f"{option} {item!r}: {raw!r} is not a number") from None
        problem = None if value is None else field_bound(Thresholds, key).problem(value)
        if problem:  # the range Thresholds declares: finite, >= 0, a cosine within [-1, 1]
            raise ExportError(f"{option} {item!r}: {problem}")
        opts.thresholds[variant] = dataclasses.replace(opts.thresholds[variant], **{key: value})


def parse_prompts(values: tuple[str, ...]) -> dict[str, str]:
    """`NAME=TEXT` items -> {NAME: TEXT}; TEXT is kept exactly (its trailing space matters)."""
    prompts: dict[str, str] = {}
    for item in values:
        name, sep, text = item.partition("=")
        if not sep or not name.strip():
            raise ExportError(f"--prompt {item!r}: expected NAME=TEXT, e.g. 'query=query: '")
        if name in prompts:
            raise ExportError(f"--prompt {name!r} is given twice")
        prompts[name] = text
    return prompts


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint")
@click.argument("output", type=click.Path(path_type=Path))
@click.option(
    "--with-projector",
    is_flag=True,
    help="Output the training projector (BatchNorms folded) instead of the pooled vector.",
)
@click.option(
    "--pooling",
    type=click.Choice(["auto", "cls", "mean"]),
    default="auto",
    show_default=True,
    help="Sentence vector in the graph. auto: the checkpoint's own (diffcse_head.json, or "
    "sentence-transformers' modules.json; [CLS] for a plain Hugging Face folder). Another "
    "value switches pooling on purpose, and the table says so.",
)
@click.option(
    "--optimize", is_flag=True, help="Also write OUT-optimized/ (fused attention, LayerNorm, GELU)."
)
@click.option(
    "--quantize",
    type=click.Choice(["int8"]),
    default=None,
    help="Also write OUT-int8/ (static int8 MatMuls: activation scales fixed at export, so "
    "a text's vector does not depend on its batch).",
)
@click.option(
    "--calibration-file",
    default=None,
    metavar="FILE",
    help="Text that fixes the int8 activation scales: one sentence per line (UTF-8; an even "
    "sample of at most 300 is used). Default: builtin:wiki_en.",
)
@click.option("--fp16", is_flag=True, help="Also write OUT-fp16/ (float16 for GPUs, fused).")
@click.option(
    "--max-seq-length",
    type=click.IntRange(min=2),
    default=None,
    help="Token limit recorded for the runtime.",
)
@click.option(
    "--sts-data",
    type=click.Path(path_type=Path),
    default=DEFAULT_STS_DATA,
    show_default=True,
    envvar="DIFFCSE_STS_DATA",
    help="SentEval-layout folder with STSBenchmark/sts-dev.csv; absent = STS parity skipped.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace output model directories diffcse-export wrote (their .diffcse-manifest.json "
    "lists every entry; anything else there is refused).",
)
@click.option(
    "--atol", multiple=True, metavar="VARIANT=X", help="Max abs diff to PyTorch (fp32 1e-4)."
)
@click.option(
    "--min-cosine", multiple=True, metavar="VARIANT=X", help="Min cosine to PyTorch (int8 0.98)."
)
@click.option(
    "--max-sts-delta",
    multiple=True,
    metavar="VARIANT=X",
    help="Max |STS-B dev delta| (fp32 0.05, int8 0.5).",
)
@click.option(
    "--prompt",
    "prompts",
    multiple=True,
    metavar="NAME=TEXT",
    help="Record a sentence-transformers prompt, e.g. --prompt 'query=query: ' (repeatable; "
    "over the source's own). encode_query/encode_document use 'query'/'document'.",
)
@click.option(
    "--default-prompt-name",
    default=None,
    metavar="NAME",
    help="The prompt encode uses when none is named (default: the source's own, if any).",
)
@click.option("--quiet", "-q", is_flag=True, help="Print only the table and errors.")
@friendly_errors
def main(
    checkpoint: str,
    output: Path,
    with_projector: bool,
    pooling: str,
    optimize: bool,
    quantize: str | None,
    calibration_file: str | None,
    fp16: bool,
    max_seq_length: int | None,
    sts_data: Path,
    overwrite: bool,
    atol: tuple[str, ...],
    min_cosine: tuple[str, ...],
    max_sts_delta: tuple[str, ...],
    prompts: tuple[str, ...],
    default_prompt_name: str | None,
    quiet: bool,
) -> None:
    """Export CHECKPOINT (a diffcse-train output, any HF encoder folder, or
    builtin:all-MiniLM-L6-v2) to OUTPUT.

    OUTPUT is OUT/model.onnx or OUT: the fp32 model directory OUT/ (model.onnx,
    tokenizer.json, diffcse.json). Variants go beside it as OUT-optimized/, OUT-int8/ and
    OUT-fp16/. Each is checked against PyTorch (numeric parity, STS-B dev Spearman) and
    all are written only if all pass.
    """
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("diffcse_export").setLevel(logging.WARNING if quiet else logging.INFO)
    _quiet_libraries()
    opts = ExportOptions(
        with_projector=with_projector,
        pooling=pooling,
        optimize=optimize,
        quantize=quantize,
        calibration_file=calibration_file,
        fp16=fp16,
        max_seq_length=max_seq_length,
        sts_data=sts_data,
        overwrite=overwrite,
        prompts=parse_prompts(prompts),
        default_prompt_name=default_prompt_name,
    )
    for values, option in (
        (atol, "--atol"),
        (min_cosine, "--min-cosine"),
        (max_sts_delta, "--max-sts-delta"),
    ):
        parse_limits(values, option, opts)
    try:
        reports = export_model(checkpoint, output, opts)
    except ValidationError as exc:
        click.echo(format_table(exc.reports))
        raise
    click.echo(format_table(reports))
    for name, folder in target_dirs(output, opts.variants()).items():
        click.echo(f"wrote {name}: {folder}")


def _quiet_libraries() -> None:
    """transformers' weight-loading progress bars and advice are noise in this CLI."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
