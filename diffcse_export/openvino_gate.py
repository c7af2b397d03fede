"""The parity gate's OpenVINO leg: the runtime's other backend is checked like onnxruntime.

When the `openvino` package is importable, `Encoder(backend="auto")` runs a model directory
on it, so export checks that path of every variant against the same PyTorch reference
batch (`validate.parity_inputs`):

- f32 (the runtime's default `inference_precision`): the variant's own thresholds, as
  onnxruntime meets them. A failure fails the export, since "auto" would serve it.
- bf16 (`inference_precision="bf16"`, or "auto" on CPUs with AVX512-BF16/AMX): a limit
  like fp16's (min cosine 0.999, STS-B dev within 0.1 points), or the variant's own where
  it is looser (int8). bf16 is opt-in, so a miss is recorded, noted in the table and
  warned about by the runtime, not fatal. Where this CPU has no bf16 it is recorded as
  skipped.

The result lands in diffcse.json as `validation.openvino`: {"version", "f32": {...},
"bf16": {...}}, each with the numeric measures, `sts_delta` where measured, `passed`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from diffcse_export import validate
from diffcse_export.validate import Thresholds, VariantReport
from diffcse_runtime.encoder import Encoder
from diffcse_runtime.model_dir import MODEL_FILE, OUTPUT_NAME
from diffcse_runtime.openvino_backend import OpenVINOSession, openvino_available

BF16_THRESHOLDS = Thresholds(min_cosine=0.999, max_sts_delta=0.1)  # as the fp16 variant's


def bf16_thresholds(own: Thresholds) -> Thresholds:
    """fp16's limits, or the variant's own where they are looser (int8)."""

    def looser(a: float | None, b: float | None, low: bool) -> float | None:
        if a is None or b is None:
            return a if b is None else b
        return min(a, b) if low else max(a, b)

    return Thresholds(
        min_cosine=looser(own.min_cosine, BF16_THRESHOLDS.min_cosine, low=True),
        max_sts_delta=looser(own.max_sts_delta, BF16_THRESHOLDS.max_sts_delta, low=False),
    )


def cpu_has_bf16() -> bool:
    """OpenVINO can run bf16 here (AVX512-BF16 or AMX)."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def check(
    report: VariantReport,
    folder: Path,
    inputs: dict[str, np.ndarray],
    expected: np.ndarray,
    sts_reference: dict[str, Any] | None,
    sts_data: Path | None,
) -> list[str]:
    """Measure the OpenVINO path of the variant in `folder`; record it in `report.openvino`
    and return the sentences that fail the export (f32 only)."""
    if not openvino_available():
        return []
    import openvino as ov

    report.openvino = {"version": ov.__version__}
    failures: list[str] = []
    for precision in ("f32", "bf16"):
        limits = report.thresholds if precision == "f32" else bf16_thresholds(report.thresholds)
        label = f"{report.variant} on OpenVINO {precision}"
        result = _measure(
            folder, inputs, expected, precision, limits, label, sts_reference, sts_data
        )
        report.openvino[precision] = result
        if precision == "f32" and not result["passed"]:
            failures += result["failures"]
        elif precision == "bf16" and result.get("passed") is False:
            report.notes.append(
                f"OpenVINO bf16 missed its limits ({'; '.join(result['failures'])}); "
                "use inference_precision='f32' for this model"
            )
    report.notes.append(_summary(report.openvino))
    return failures


def _summary(record: dict[str, Any]) -> str:
    """One line for the export table: each precision's min cosine to PyTorch, or why not."""
    parts = []
    for precision in ("f32", "bf16"):
        got = record.get(precision, {})
        if "min_cosine" in got:
            sts = f", STS-B dev delta {got['sts_delta']:+.3f}" if "sts_delta" in got else ""
            verdict = "pass" if got["passed"] else "FAIL"
            parts.append(f"{precision} min cos {got['min_cosine']:.6f}{sts} ({verdict})")
        else:
            parts.append(f"{precision} {got.get('skipped', 'not measured')}")
    return f"OpenVINO {record['version'].split('-')[0]}: " + "; ".join(parts)


def _measure(
    folder: Path,
    inputs: dict[str, np.ndarray],
    expected: np.ndarray,
    precision: str,
    limits: Thresholds,
    label: str,
    sts_reference: dict[str, Any] | None,
    sts_data: Path | None,
) -> dict[str, Any]:
    """One precision's numeric (and for bf16 semantic) parity, gated by `limits`."""
    if precision == "bf16" and not cpu_has_bf16():
        return {"skipped": "this CPU has no AVX512-BF16 or AMX", "passed": None}
    session = OpenVINOSession(folder / MODEL_FILE, threads=None, inference_precision=precision)
    out = session.run([OUTPUT_NAME], inputs)[0]
    probe = VariantReport(variant=label, size_mb=0.0, thresholds=limits)
    probe.numeric = validate.compare(out, expected)
    if precision == "bf16" and sts_reference is not None and sts_data is not None:
        encoder = Encoder(folder, backend="openvino", inference_precision="bf16")
        spearman = validate.sts_score(encoder, sts_data)["spearman"]
        probe.sts = {"onnx": spearman, "pytorch": sts_reference["spearman"]}
        probe.sts["delta"] = spearman - sts_reference["spearman"]
    failures = validate.gate(probe)
    result: dict[str, Any] = {**probe.numeric, "failures": failures, "passed": not failures}
    if "delta" in probe.sts:
        result["sts_delta"] = probe.sts["delta"]
    result["thresholds"] = {
        "atol": limits.atol,
        "min_cosine": limits.min_cosine,
        "max_sts_delta": limits.max_sts_delta,
    }
    return result
