"""Shared fixtures: tiny models built on the fly, and the real STS data when present."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny.py

import tiny  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STS_DATA = ROOT.parent / "shared" / "data" / "sts"


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module's tests, restored after."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def sts_data() -> Path:
    """The real SentEval-layout data beside the project; tests skip without it."""
    from diffcse_runtime.sts import available_tasks

    if "STSBenchmark" not in available_tasks(STS_DATA, "dev"):
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
    """Export an HF encoder folder's [CLS] state with diffcse_export (fp32, numeric parity
    gated, STS parity skipped for speed) and return the model directory."""
    from diffcse_export import ExportOptions, export_model

    export_model(hf_dir, out, ExportOptions(max_seq_length=max_seq_length, sts_data=None))
    return out
