"""Shared fixtures: tiny models built on the fly, and the real STS data when present."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny.py

import tiny  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STS_DATA = ROOT.parent / "shared" / "data" / "sts"


@pytest.fixture(scope="session")
def sts_data() -> Path:
    """The real SentEval-layout data beside the project; tests skip without it."""
    if not (STS_DATA / "STSBenchmark" / "sts-dev.csv").is_file():
        pytest.skip(f"real STS data not found at {STS_DATA}")
    return STS_DATA


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer, hidden-32 BERT folder with a WordPiece tokenizer trained on the fly."""
    pytest.importorskip("torch")
    return tiny.make_encoder(tmp_path_factory.mktemp("tiny_bert"), style="bert")


@pytest.fixture(scope="session")
def tiny_roberta(tmp_path_factory) -> Path:
    pytest.importorskip("torch")
    return tiny.make_encoder(tmp_path_factory.mktemp("tiny_roberta"), style="roberta")


@pytest.fixture(scope="session")
def tiny_mlm(tmp_path_factory) -> Path:
    """A 1-layer masked LM sharing tiny_bert's vocabulary: a stand-in generator."""
    pytest.importorskip("torch")
    return tiny.make_mlm(tmp_path_factory.mktemp("tiny_mlm"), style="bert")


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_bert, tmp_path_factory) -> Path:
    """tiny_bert exported to a runtime model directory (fp32, [CLS] output)."""
    out = tmp_path_factory.mktemp("tiny_model_dir") / "model"
    export_model_dir(tiny_bert, out)
    return out


def export_model_dir(hf_dir: Path, out: Path, max_seq_length: int = 128) -> Path:
    """Export an HF encoder folder's [CLS] state with torch.onnx and write a model directory."""
    import shutil

    import torch
    from transformers import AutoModel, AutoTokenizer

    from diffcse_runtime.model_dir import ModelMeta, write_metadata

    model = AutoModel.from_pretrained(hf_dir).eval()
    tok = AutoTokenizer.from_pretrained(hf_dir)

    class ClsOnly(torch.nn.Module):
        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask):
            return self.encoder(
                input_ids=input_ids, attention_mask=attention_mask
            ).last_hidden_state[:, 0]

    ids = torch.tensor([[2, 7, 8, 9, 3], [2, 7, 3, 0, 0]])
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    out.mkdir(parents=True)
    torch.onnx.export(
        ClsOnly(model).eval(),
        (ids, (ids != 0).long()),
        str(out / "model.onnx"),
        input_names=["input_ids", "attention_mask"],
        output_names=["sentence_embedding"],
        dynamo=True,
        opset_version=18,
        verbose=False,
        dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
    )
    shutil.copy(Path(hf_dir) / "tokenizer.json", out / "tokenizer.json")
    meta = ModelMeta(
        embedding_dim=model.config.hidden_size,
        max_seq_length=max_seq_length,
        pad_token_id=tok.pad_token_id,
        input_names=["input_ids", "attention_mask"],
        opset=18,
        source=str(hf_dir),
    )
    write_metadata(out, meta)
    return out
