"""The parity gate's OpenVINO leg: measured, recorded in diffcse.json, and gating f32."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("openvino", reason="the openvino extra is not installed")

from diffcse_export import ExportOptions, export_model  # noqa: E402
from diffcse_export.errors import ValidationError  # noqa: E402
from diffcse_export.openvino_gate import bf16_thresholds, cpu_has_bf16  # noqa: E402
from diffcse_export.validate import Thresholds, default_thresholds  # noqa: E402
from diffcse_runtime.model_dir import load_metadata  # noqa: E402


def test_export_records_both_openvino_precisions_in_the_metadata(tiny_model_dir):
    record = load_metadata(tiny_model_dir).validation["openvino"]
    assert record["version"]
    f32 = record["f32"]
    assert f32["passed"] is True and f32["failures"] == []
    assert f32["max_abs_diff"] <= 1e-4 and f32["min_cosine"] >= 0.99999
    assert f32["thresholds"]["atol"] == 1e-4  # the fp32 variant's own limit
    bf16 = record["bf16"]
    if cpu_has_bf16():
        assert bf16["passed"] is True and bf16["min_cosine"] >= 0.999
        assert bf16["thresholds"]["min_cosine"] == 0.999
    else:
        assert bf16 == {"skipped": "this CPU has no AVX512-BF16 or AMX", "passed": None}


def test_an_openvino_f32_miss_fails_the_export_and_names_the_backend(tiny_bert, tmp_path):
    limits = {**default_thresholds(), "fp32": Thresholds(atol=1e-12)}
    options = ExportOptions(max_seq_length=64, sts_data=None, thresholds=limits)
    with pytest.raises(ValidationError) as info:
        export_model(tiny_bert, tmp_path / "out", options)
    assert "fp32 on OpenVINO f32: max abs difference to PyTorch" in str(info.value)
    assert not (tmp_path / "out").exists()  # nothing written when the gate fails


@pytest.mark.parametrize(
    "own,cosine,sts",
    [
        (Thresholds(atol=1e-4, max_sts_delta=0.05), 0.999, 0.1),  # fp32: fp16's limits
        (Thresholds(min_cosine=0.98, max_sts_delta=0.5), 0.98, 0.5),  # int8: its own, looser
    ],
)
def test_bf16_limits_are_fp16s_or_the_variants_looser_ones(own, cosine, sts):
    limits = bf16_thresholds(own)
    assert (limits.atol, limits.min_cosine, limits.max_sts_delta) == (None, cosine, sts)
