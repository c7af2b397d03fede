"""best/ is a sentence-transformers folder: SentenceTransformer(best) returns the vector
the trainer scored and the exported runtime returns, for [CLS] and for mean (+ Normalize)."""

from __future__ import annotations

import json
import shutil

import pytest

torch = pytest.importorskip("torch")
st = pytest.importorskip("sentence_transformers")
import numpy as np  # noqa: E402

from diffcse_runtime import Encoder  # noqa: E402
from diffcse_runtime.pooling import read_source_pooling  # noqa: E402
from diffcse_train.config import TrainConfig  # noqa: E402
from diffcse_train.trainer import Trainer  # noqa: E402
from tests.support import tiny  # noqa: E402

SHORT = tiny.corpus(9, seed=11) + ["a"]
TEXTS = SHORT + [" ".join(tiny.corpus(30, seed=3))]  # the last one is truncated


@pytest.fixture(autouse=True, scope="module")
def one_thread(one_torch_thread):
    """Same float sums in every encode path compared below."""


@pytest.fixture(scope="module")
def mean_source(tiny_bert, tmp_path_factory):
    """tiny_bert declared as a sentence-transformers model: mean pooling + Normalize."""
    folder = tmp_path_factory.mktemp("st_source") / "model"
    return tiny.as_sentence_transformers(tiny_bert, folder, "mean", True, max_seq_length=64)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.sum(a * b, axis=1)


def train_tiny(source, out, corpus_file) -> Trainer:
    cfg = TrainConfig(
        model_name_or_path=str(source), train_file=str(corpus_file), output_dir=str(out),
        augmentation="replace", lambda_weight=0.1, batch_size=16, max_steps=3,
        save_steps=3, learning_rate=1e-3,
    )  # fmt: skip
    trainer = Trainer(cfg)
    trainer.run()  # no eval data: best/ holds the last step, the model still in memory
    return trainer


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "train.txt"
    path.write_text("\n".join(tiny.corpus(64, seed=2)) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tiny_bert, mean_source, corpus_file, tmp_path_factory):
    """pooling -> (Trainer after 3 steps, its best/ folder); each trained once per module."""
    runs: dict[str, tuple[Trainer, object]] = {}

    def get(pooling: str):
        if pooling not in runs:
            out = tmp_path_factory.mktemp(f"run_{pooling}")
            source = tiny_bert if pooling == "cls" else mean_source
            runs[pooling] = (train_tiny(source, out, corpus_file), out / "best")
        return runs[pooling]

    return get


@pytest.mark.slow  # end to end: trains, then sentence-transformers and the export agree
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_best_is_a_sentence_transformers_folder(pooling, trained, tmp_path):
    from diffcse_export import ExportOptions, export_model

    trainer, best = trained(pooling)
    declared = read_source_pooling(best)
    assert (declared.pooling, declared.normalize) == (pooling, pooling == "mean")
    config = json.loads((best / "config_sentence_transformers.json").read_text())
    assert config["model_type"] == "SentenceTransformer"
    assert config["similarity_fn_name"] == "cosine"

    model = st.SentenceTransformer(str(best), device="cpu")
    assert model.max_seq_length == (64 if pooling == "mean" else 128)
    theirs = model.encode(TEXTS, convert_to_numpy=True)
    # the vector the dev score measured (before Normalize); the trainer's own truncation
    # limit differs (positions - 2, not the source's max_seq_length), so short texts only
    trained_vectors = trainer.encode(SHORT)
    export_model(best, tmp_path / "onnx", ExportOptions(sts_data=None))
    runtime = Encoder(tmp_path / "onnx").encode(TEXTS)
    card = (tmp_path / "onnx" / "README.md").read_text()  # the card carries the training run
    assert "## Training" in card and "pooling: auto" in card  # the config as written
    assert f"| pooling | {pooling} (" in card

    assert cosines(theirs[: len(SHORT)], trained_vectors).min() >= 0.99999
    assert cosines(theirs, runtime).min() >= 0.99999
    if pooling == "mean":  # Normalize is part of the stack on both sides
        np.testing.assert_allclose(np.linalg.norm(theirs, axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(theirs, runtime, atol=1e-5)


@pytest.mark.slow  # trains first, like the test above
def test_without_the_files_sentence_transformers_would_pool_wrongly(trained, tmp_path):
    """What the files prevent: a plain HF folder of a [CLS] model gets mean pooling."""
    trainer, best = trained("cls")
    plain = tmp_path / "plain"
    shutil.copytree(best, plain)
    (plain / "modules.json").unlink()
    shutil.rmtree(plain / "1_Pooling")
    guessed = st.SentenceTransformer(str(plain), device="cpu").encode(TEXTS)
    assert cosines(guessed[: len(SHORT)], trainer.encode(SHORT)).min() < 0.999
