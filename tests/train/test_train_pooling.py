"""Pooling end to end and the official code's details, each switch doing what it says.

Pooling: the masked mean ignores padding; `auto` takes a sentence-transformers source's
own pooling; an explicit different pooling is said out loud; and a model trained with a
pooling keeps it through best/ -> export -> runtime. The switches: G in train mode, the
RTD loss over padding, fp32 dev scoring, and the projector's N(0, 0.02) init.
"""

from __future__ import annotations

import json
import logging

import pytest

torch = pytest.importorskip("torch")
import numpy as np  # noqa: E402

from diffcse_runtime import Encoder, load_metadata  # noqa: E402
from diffcse_train.config import TrainConfig  # noqa: E402
from diffcse_train.data import IGNORE, Collator  # noqa: E402
from diffcse_train.evaluation import make_encode_fn  # noqa: E402
from diffcse_train.model import build_model, pool, rtd_loss  # noqa: E402
from diffcse_train.trainer import Trainer, train  # noqa: E402
from tests.support import tiny  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread(one_torch_thread):
    """Deterministic float sums for the equality checks below."""


@pytest.fixture(scope="module")
def mean_source(tiny_bert, tmp_path_factory):
    """tiny_bert declared as a sentence-transformers model with mean pooling + Normalize."""
    folder = tmp_path_factory.mktemp("st_mean") / "model"
    return tiny.as_sentence_transformers(tiny_bert, folder, "mean", normalize=True)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "train.txt"
    path.write_text("\n".join(tiny.corpus(96, seed=2)) + "\n", encoding="utf-8")
    return path


def cfg_for(source, **kw) -> TrainConfig:
    values = dict(
        model_name_or_path=str(source),
        train_file="unused",
        output_dir="unused",
        augmentation="replace",
        lambda_weight=0.1,
    )
    values.update(kw)
    return TrainConfig(**values)


# ---------------------------------------------------------------- pooling


def test_mean_pooling_ignores_padding():
    hidden = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    garbage = hidden.clone()
    garbage[0, 3:] = 1e6  # padded positions must not matter
    torch.testing.assert_close(pool(garbage, mask, "mean"), pool(hidden, mask, "mean"))
    torch.testing.assert_close(pool(hidden, mask, "mean")[0], hidden[0, :3].mean(0))
    torch.testing.assert_close(pool(hidden, mask, "cls"), hidden[:, 0])


def test_mean_pooled_sentence_is_the_same_alone_or_padded_in_a_batch(mean_source):
    model, tokenizer = build_model(cfg_for(mean_source))
    encode = make_encode_fn(model, tokenizer, torch.device("cpu"))
    short, long = "the cat sat", " ".join(tiny.corpus(6, seed=1))
    alone = encode([short])[0]
    batched = encode([short, long])[0]  # padded to the long sentence's length
    np.testing.assert_allclose(alone, batched, rtol=1e-5, atol=1e-6)


def test_auto_takes_the_source_pooling_and_plain_folders_get_cls(tiny_bert, mean_source):
    model, _ = build_model(cfg_for(mean_source))
    assert (model.pooling, model.normalize) == ("mean", True)
    model, _ = build_model(cfg_for(tiny_bert))
    assert (model.pooling, model.normalize) == ("cls", False)


def test_an_explicit_pooling_switch_is_honoured_and_said(mean_source, caplog):
    with caplog.at_level(logging.WARNING, logger="diffcse_train"):
        model, _ = build_model(cfg_for(mean_source, pooling="cls"))
    assert (model.pooling, model.normalize) == ("cls", False)
    assert "declares mean pooling" in caplog.text


@pytest.mark.slow  # end to end: train, export, runtime
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_pooling_round_trips_train_export_runtime(pooling, mean_source, corpus_file, tmp_path):
    """The trained vector is what best/ declares, export builds and the runtime returns."""
    from diffcse_export import ExportOptions, export_model

    out = tmp_path / "run"
    cfg = cfg_for(
        mean_source, pooling=pooling, train_file=str(corpus_file), output_dir=str(out),
        batch_size=16, max_steps=3, eval_steps=3, save_steps=3, learning_rate=1e-3,
    )  # fmt: skip
    train(cfg)
    head = json.loads((out / "best" / "diffcse_head.json").read_text())
    assert head["pooling"] == pooling
    (report,) = export_model(out, tmp_path / "onnx", ExportOptions(sts_data=None))
    assert not any("requested" in note for note in report.notes)  # no switch at export
    meta = load_metadata(tmp_path / "onnx")
    assert meta.pooling == pooling and meta.normalized == (pooling == "mean")

    from transformers import AutoModel, AutoTokenizer

    texts = tiny.corpus(7, seed=9)
    best = out / "best"
    tok, encoder = AutoTokenizer.from_pretrained(best), AutoModel.from_pretrained(best).eval()
    enc = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        states = encoder(**enc).last_hidden_state
    reference = pool(states, enc["attention_mask"], head["pooling"]).numpy()
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    ours = Encoder(tmp_path / "onnx").encode(texts, normalize=True)
    assert np.sum(ours * reference, axis=1).min() >= 0.99999


# ---------------------------------------------------------------- the official details


def test_generator_train_mode_switch(tiny_bert, tiny_mlm):
    cfg = cfg_for(tiny_bert, augmentation="mlm", generator_name_or_path=str(tiny_mlm))
    official, tokenizer = build_model(cfg)
    quiet, _ = build_model(TrainConfig(**{**cfg.to_dict(), "generator_train_mode": False}))
    batch = Collator(tokenizer, 32, "mlm", 0.5, seed=0)(tiny.corpus(16))
    for model, dropout in ((official, True), (quiet, False)):
        model.train()
        assert model.generator.training is dropout
        assert all(not p.requires_grad for p in model.generator.parameters())
        torch.manual_seed(0)
        first = model.edited_inputs(batch)[0]
        torch.manual_seed(1)
        second = model.edited_inputs(batch)[0]
        assert (not torch.equal(first, second)) is dropout  # dropout changes G's argmax
        model.eval()
        assert not model.generator.training


def test_rtd_loss_over_padding_counts_padding_as_kept():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 2)
    labels = torch.tensor([[0, 1, 0, IGNORE], [1, 0, IGNORE, IGNORE]])
    official, stats = rtd_loss(logits, labels, over_padding=True)
    real_only, _ = rtd_loss(logits, labels, over_padding=False)
    valid = labels != IGNORE
    torch.testing.assert_close(
        official,
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.clamp(min=0).flatten()),
    )
    torch.testing.assert_close(
        real_only, torch.nn.functional.cross_entropy(logits[valid], labels[valid])
    )
    assert not torch.isclose(official, real_only)
    assert stats["replaced_frac"] == pytest.approx(2 / 5)  # accuracies: real tokens only


@pytest.mark.parametrize("init, low, high", [("normal", 0.015, 0.025), ("pytorch", 0.05, 1.0)])
def test_projector_init(tiny_bert, init, low, high):
    torch.manual_seed(0)
    model, _ = build_model(cfg_for(tiny_bert, projector_init=init))
    for linear in (model.projector.linear1, model.projector.linear2):
        assert low < float(linear.weight.detach().std()) < high


def test_dev_scoring_runs_in_fp32_under_autocast(tiny_bert, corpus_file, tmp_path):
    """bf16 autocast training (CPU) still scores STS-B dev in fp32 unless told otherwise."""
    texts = tiny.corpus(8, seed=5)
    encodings = {}
    for flag in (True, False):
        cfg = cfg_for(
            tiny_bert, train_file=str(corpus_file), output_dir=str(tmp_path / f"r{flag}"),
            precision="bf16", device="cpu", eval_fp32=flag, batch_size=16,
        )  # fmt: skip
        encodings[flag] = Trainer(cfg).encode(texts)
    fp32_model, tokenizer = build_model(cfg_for(tiny_bert))
    plain = make_encode_fn(fp32_model, tokenizer, torch.device("cpu"))(texts)
    np.testing.assert_allclose(encodings[True], plain, rtol=1e-5, atol=1e-6)
    assert np.abs(encodings[False] - plain).max() > 1e-4  # bf16 really differs
