"""export_model: checkpoint -> validated model directories, all or nothing.

Layout: the output names the fp32 model directory (`OUT/` or `OUT/model.onnx`); each
requested variant goes into its own complete model directory beside it, `OUT-optimized/`,
`OUT-int8/`, `OUT-fp16/`. Every directory is staged in a hidden temporary folder next to
its final name and renamed into place only after *all* of them passed the gate, so a
failure leaves nothing behind, and an existing folder survives until its replacement is
complete (`overwrite`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from diffcse_export import graph, openvino_gate, validate, variants
from diffcse_export.calibration import Calibration, load_calibration
from diffcse_export.cls_layer import CLS_PRUNED
from diffcse_export.errors import ExportError, ValidationError, first_line
from diffcse_export.model_card import write_model_cards
from diffcse_export.tokenizer_files import write_tokenizer_files
from diffcse_export.validate import Thresholds, VariantReport
from diffcse_runtime.atomic import atomic_dir, check_replaceable, remove_stale
from diffcse_runtime.conventions import export_prompts
from diffcse_runtime.model_dir import (
    MODEL_FILE,
    TOKENIZER_FILE,
    ModelMeta,
    write_metadata,
)
from diffcse_runtime.ownership import check_not_in_use

log = logging.getLogger("diffcse_export")
EXPORT_TOOL = "diffcse-export"  # the tool a model directory's ownership manifest names


@dataclass
class ExportOptions:
    """What `diffcse-export` can be asked for; the CLI flags map one to one."""

    with_projector: bool = False
    pooling: str = "auto"  # auto = the source's own; cls/mean = explicit (noted if it differs)
    optimize: bool = False
    quantize: str | None = None  # "int8" or None
    calibration_file: str | Path | None = None  # int8 scales' text; None: builtin:wiki_en
    fp16: bool = False
    max_seq_length: int | None = None  # default: tokenizer limit capped by position table
    sts_data: Path | None = None  # None: semantic parity skipped, noted in the metadata
    overwrite: bool = False
    thresholds: dict[str, Thresholds] = field(default_factory=validate.default_thresholds)
    prompts: dict[str, str] = field(default_factory=dict)  # --prompt NAME=TEXT, over the source's
    default_prompt_name: str | None = None  # default: the source's own, if any

    def variants(self) -> list[str]:
        if self.quantize not in (None, "int8"):
            raise ExportError(f"--quantize {self.quantize!r} is not supported; use int8")
        if self.calibration_file is not None and not self.quantize:
            raise ExportError("--calibration-file calibrates int8; add --quantize int8")
        wanted = {"optimized": self.optimize, "int8": bool(self.quantize), "fp16": self.fp16}
        return ["fp32"] + [v for v in variants.VARIANTS if wanted.get(v)]


def model_dir_of(output: str | Path) -> Path:
    """`OUT/model.onnx` or `OUT` -> `OUT`; the contract fixes the graph's file name."""
    output = Path(output)
    if output.suffix == ".onnx":
        if output.name != MODEL_FILE:
            raise ExportError(
                f"{output}: the graph of a model directory is called {MODEL_FILE}; "
                f"give {output.parent / MODEL_FILE} or just the folder {output.parent}"
            )
        return output.parent
    return output


def target_dirs(output: str | Path, names: list[str]) -> dict[str, Path]:
    """fp32 -> OUT, any other variant -> OUT-<variant> beside it."""
    base = model_dir_of(output)
    return {v: base if v == "fp32" else base.with_name(f"{base.name}-{v}") for v in names}


def _check_targets(targets: dict[str, Path], overwrite: bool, source: Path) -> None:
    """Before any work: each target is new, or (with overwrite) a model directory
    diffcse-export wrote, never the working directory or a folder holding `source`."""
    for target in targets.values():
        check_not_in_use(target, [source])
        try:
            check_replaceable(target, overwrite, EXPORT_TOOL, "a model directory", [source])
        except FileExistsError:
            raise ExportError(f"{target}: already exists; pass --overwrite to replace it") from None


def remove_stale_staging(output: str | Path) -> None:
    """Remove every variant's staging folder a killed export left beside OUT, including
    those of variants this run does not build (an int8 run killed, then rerun without)."""
    for target in target_dirs(output, list(variants.VARIANTS)).values():
        remove_stale(target)


@dataclass
class _Reference:
    """What every variant is compared with: the PyTorch outputs and STS-B dev score."""

    inputs: dict  # the fixed parity batch (numpy int64 arrays)
    expected: object  # PyTorch embeddings of `inputs`
    sts: dict | None  # PyTorch STS-B dev score, None when skipped
    skip_note: str | None
    export_seconds: float
    graph_notes: list[str] = field(default_factory=list)  # facts of the export, every variant


def export_model(
    checkpoint: str | Path, output: str | Path, options: ExportOptions | None = None
) -> list[VariantReport]:
    """Export, build the variants, validate each; raise ValidationError if any fails."""
    opts = options or ExportOptions()
    names = opts.variants()
    targets = target_dirs(output, names)
    _check_targets(targets, opts.overwrite, Path(checkpoint))
    remove_stale_staging(output)
    ckpt = graph.load_checkpoint(checkpoint, opts.pooling)
    prompts, default = export_prompts(
        ckpt.path, ckpt.pooling, opts.prompts, opts.default_prompt_name
    )  # checked before any work; recorded in every variant's diffcse.json
    opts = dataclasses.replace(opts, prompts=prompts, default_prompt_name=default)
    calibration = load_calibration(opts.calibration_file) if "int8" in names else None
    max_len = graph.resolve_max_seq_length(ckpt, opts.max_seq_length)
    reference, to_export = graph.embedding_modules(ckpt, opts.with_projector)
    with contextlib.ExitStack() as stack:
        staged = {
            v: stack.enter_context(  # what appears meanwhile is replaced only if ours
                atomic_dir(t, opts.overwrite, EXPORT_TOOL, "a model directory", [checkpoint])
            )
            for v, t in targets.items()
        }
        for folder in staged.values():
            ckpt.tokenizer.backend_tokenizer.save(str(folder / TOKENIZER_FILE))
            write_tokenizer_files(folder, ckpt.path, ckpt.tokenizer, max_len)
        log.info("exporting %s (opset %d, max_seq_length %d)", ckpt.path, graph.OPSET, max_len)
        start = time.perf_counter()
        example = graph.example_inputs(ckpt, max_len)
        graph.export_onnx(to_export, staged["fp32"] / MODEL_FILE, example, max_len)
        export_seconds = time.perf_counter() - start
        ref = _reference(ckpt, reference, staged["fp32"], max_len, opts.sts_data)
        ref.export_seconds = export_seconds
        ref.graph_notes = [CLS_PRUNED] if to_export.prune_last else []
        if ckpt.pooling_switched:
            ref.graph_notes.append(ckpt.pooling_switched)
        reports = [_variant(name, ckpt, staged, ref, opts, max_len, calibration) for name in names]
        failures = [f for r in reports for f in r.failures]
        if failures:
            raise ValidationError(
                "validation failed, nothing was written: " + "; ".join(failures), reports
            )
        write_model_cards(staged, targets, reports, ckpt.path)  # after the last diffcse.json
    return reports


def _reference(ckpt, module, fp32_dir: Path, max_len: int, sts_data: Path | None) -> _Reference:
    inputs = validate.parity_inputs(fp32_dir / TOKENIZER_FILE, max_len, ckpt.pad_token_id)
    skip_note = validate.sts_skip_reason(sts_data)
    torch_sts = None
    if skip_note is None:
        log.info("scoring PyTorch on STS-B dev")
        encode = validate.torch_encode_fn(module, ckpt.tokenizer, max_len)
        torch_sts = validate.sts_score(encode, sts_data)
    return _Reference(inputs, validate.torch_outputs(module, inputs), torch_sts, skip_note, 0.0)


def _variant(
    name: str,
    ckpt: graph.Checkpoint,
    staged: dict[str, Path],
    ref: _Reference,
    opts: ExportOptions,
    max_len: int,
    calibration: Calibration | None = None,
) -> VariantReport:
    """Build one variant in its staging folder, measure it, gate it, write its metadata."""
    folder = staged[name]
    start = time.perf_counter()
    try:
        fused = _build(name, staged["fp32"] / MODEL_FILE, staged, ckpt, max_len, calibration)
    except Exception as exc:  # onnxscript/onnxruntime tools raise assorted types
        raise ExportError(f"building the {name} variant failed ({first_line(exc)})") from exc
    report = VariantReport(
        variant=name,
        size_mb=(folder / MODEL_FILE).stat().st_size / 1e6,
        thresholds=opts.thresholds.get(name, Thresholds()),
        fused_ops=fused,
        build_seconds=ref.export_seconds if name == "fp32" else time.perf_counter() - start,
    )
    log.info("validating %s", name)
    meta = _meta(ckpt, opts, max_len, name)
    write_metadata(folder, meta)  # the runtime Encoder needs it to score STS
    out, provider = validate.onnx_outputs(folder / MODEL_FILE, ref.inputs)
    report.numeric = {**validate.compare(out, ref.expected), "provider": provider}
    if ref.sts is None:
        report.sts = {"skipped": ref.skip_note}
    else:
        report.sts = validate.semantic_parity(folder, ref.sts, opts.sts_data)
    if name == "fp16" and provider == "CPUExecutionProvider":
        report.notes.append(validate.FP16_ON_CPU)
    report.notes += ref.graph_notes
    if name == "int8" and calibration is not None:
        report.notes.append(
            f"int8 scales calibrated on {len(calibration.sentences)} sentences of "
            f"{calibration.source}"
        )
    report.failures = validate.gate(report)
    report.failures += openvino_gate.check(
        report, folder, ref.inputs, ref.expected, ref.sts, opts.sts_data
    )
    meta.validation = {**report.to_json(), **_provenance(ref.export_seconds)}
    if name == "int8" and calibration is not None:
        meta.validation["calibration"] = calibration.to_json()
    write_metadata(folder, meta)
    return report


def _build(
    name: str,
    fp32: Path,
    staged: dict[str, Path],
    ckpt: graph.Checkpoint,
    max_len: int,
    calibration: Calibration | None,
) -> dict:
    """Write variant `name`'s model.onnx from the fp32 graph; return its fused-op counts."""
    dst = staged[name] / MODEL_FILE
    if name == "fp32":
        return {}
    if name == "int8":
        sentences = (calibration or load_calibration(None)).sentences
        feeds = variants.graph_feeds(fp32, sentences, staged["fp32"] / TOKENIZER_FILE, max_len)
        variants.quantize_int8(fp32, dst, feeds, graph.head_nodes(fp32))
        return {}
    if name == "optimized":
        return variants.optimize(fp32, dst, ckpt.num_heads, ckpt.hidden_size)
    # fp16 converts the optimized graph: fused kernels are what make fp16 fast on a GPU
    optimized = staged.get("optimized", staged[name]) / MODEL_FILE
    if "optimized" not in staged:
        variants.optimize(fp32, optimized, ckpt.num_heads, ckpt.hidden_size)
    variants.to_fp16(optimized, dst)
    return variants.fused_op_counts(dst)


def _meta(ckpt: graph.Checkpoint, opts: ExportOptions, max_len: int, variant: str) -> ModelMeta:
    return ModelMeta(
        embedding_dim=ckpt.hidden_size,
        max_seq_length=max_len,
        pad_token_id=ckpt.pad_token_id,
        input_names=list(graph.INPUT_NAMES),
        opset=graph.OPSET,
        projector_folded=opts.with_projector,
        pooling=ckpt.pooling,
        normalized=ckpt.normalize and not opts.with_projector,
        variant=variant,
        source=ckpt.source,  # as the user named it: the folder travels
        prompts=dict(opts.prompts),
        default_prompt_name=opts.default_prompt_name,
    )


def _provenance(export_seconds: float) -> dict:
    import onnx
    import onnxruntime
    import onnxscript
    import torch
    import transformers

    return {
        "reference": "PyTorch float32, eval mode, unfolded projector",
        "export_seconds": round(export_seconds, 2),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnx": onnx.__version__,
            "onnxscript": onnxscript.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
    }
