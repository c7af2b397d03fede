"""End to end with tiny models: the loss goes down, best/ is a loadable HF folder holding
the best dev step, a killed run resumes to the exact same state, and NaN stops cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from diffcse_runtime import sts  # noqa: E402
from diffcse_train import model as model_module  # noqa: E402
from diffcse_train.config import TrainConfig  # noqa: E402
from diffcse_train.trainer import TrainingDiverged, train  # noqa: E402
from tests.support import read_metrics, tiny  # noqa: E402

pytestmark = pytest.mark.slow  # end-to-end training runs, one killed and resumed in a subprocess

ROOT = Path(__file__).resolve().parents[2]
KILL_AFTER_STEP = str(ROOT / "tests" / "support" / "kill_after_step.py")  # diffcse-train, killed


@pytest.fixture(autouse=True, scope="module")
def one_thread(one_torch_thread):
    """Same thread count as the subprocesses (bitwise equality), no OpenMP spin on 2 cores."""


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "train.txt"
    lines = tiny.corpus(480, seed=4)
    lines[10:10] = ["", "   "]  # skipped and counted
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def sts_dir(tmp_path_factory) -> Path:
    """A small STS-B dev set in the SentEval layout; gold = shared words between the pair."""
    return tiny.write_overlap_stsb(tmp_path_factory.mktemp("sts"), 200)


def make_cfg(tiny_bert, corpus_file, out: Path, **kw) -> TrainConfig:
    values = dict(
        model_name_or_path=str(tiny_bert),
        train_file=str(corpus_file),
        output_dir=str(out),
        augmentation="replace",
        lambda_weight=0.1,
        mask_ratio=0.3,
        batch_size=16,
        learning_rate=5e-4,
        epochs=1,
        max_steps=24,
        eval_steps=8,
        save_steps=8,
        seed=0,
    )
    values.update(kw)
    return TrainConfig(**values)


def test_training_lowers_the_loss_and_keeps_the_best_dev_step(
    tiny_bert, corpus_file, sts_dir, tmp_path
):
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    out = tmp_path / "run"
    cfg = make_cfg(
        tiny_bert, corpus_file, out, eval_data_dir=str(sts_dir), learning_rate=3e-3, epochs=3,
        max_steps=90, eval_steps=30, save_steps=30,
    )  # fmt: skip
    # 30 steps per epoch: the run crosses two epoch boundaries. 90 steps, because from the
    # official N(0, 0.02) projector init the loss first plateaus for ~60 steps
    summary = train(cfg)
    losses = [r["loss"] for r in read_metrics(out, "train")]
    assert len(losses) == 90
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10
    train_rows = read_metrics(out, "train")
    assert all(0 <= r["rtd_acc"] <= 1 and r["loss_rtd"] > 0 for r in train_rows)
    evals = read_metrics(out, "eval")
    assert [e["step"] for e in evals] == [0, 30, 60, 90]
    trained = {e["step"]: e["stsb_dev"] for e in evals if e["step"] > 0}
    assert summary.best_step == max(trained, key=trained.get)
    assert summary.initial_score == evals[0]["stsb_dev"]

    best = out / "best"
    encoder = AutoModel.from_pretrained(best).eval()
    tokenizer = AutoTokenizer.from_pretrained(best)
    head = json.loads((best / "diffcse_head.json").read_text())
    assert head["projector"] == "batchnorm" and head["hidden_size"] == 32
    assert set(load_file(best / "projector.safetensors")) == {
        "linear1.weight",
        "bn1.weight",
        "bn1.bias",
        "bn1.running_mean",
        "bn1.running_var",
        "bn1.num_batches_tracked",
        "linear2.weight",
        "bn2.running_mean",
        "bn2.running_var",
        "bn2.num_batches_tracked",
    }
    assert json.loads((best / "metrics.json").read_text())["step"] == summary.best_step
    assert "learning_rate" in (best / "train_config.yaml").read_text()

    def encode(sentences):
        enc = tokenizer(sentences, padding=True, return_tensors="pt")
        with torch.no_grad():
            return encoder(**enc).last_hidden_state[:, 0].numpy()

    # the folder on disk is the best step: it reproduces that step's dev score
    rescored = sts.evaluate(encode, sts_dir, tasks=["STSBenchmark"], split="dev")
    assert rescored.scores["STSBenchmark"].spearman == pytest.approx(summary.best_score, abs=1e-3)


def test_killed_run_resumes_to_the_same_state(tiny_bert, corpus_file, sts_dir, tmp_path):
    common = dict(
        batch_size=32,
        epochs=2,
        max_steps=20,
        eval_steps=10,
        save_steps=8,
        eval_data_dir=str(sts_dir),
    )
    full = make_cfg(tiny_bert, corpus_file, tmp_path / "full", **common)
    train(full)  # 15 steps per epoch

    # the same run, killed (SIGKILL) after step 17: its last checkpoint is step 16, epoch 2
    cut = replace(full, output_dir=str(tmp_path / "cut"))
    cfg_path = tmp_path / "cut.yaml"
    cfg_path.write_text(cut.to_yaml())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, KILL_AFTER_STEP, "17", "--config", str(cfg_path), "--quiet"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == -9, proc.stderr[-2000:]
    state = json.loads((tmp_path / "cut" / "last" / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (16, 1, 1)
    assert max(r["step"] for r in read_metrics(tmp_path / "cut", "train")) == 17

    summary = train(cut, resume=True)
    assert summary.steps == 20
    from safetensors.torch import load_file

    for name in ("last", "best"):
        a = load_file(tmp_path / "full" / name / "model.safetensors")
        b = load_file(tmp_path / "cut" / name / "model.safetensors")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    opt_a = torch.load(tmp_path / "full" / "last" / "optimizer.pt", weights_only=True)
    opt_b = torch.load(tmp_path / "cut" / "last" / "optimizer.pt", weights_only=True)
    for slot, value in opt_a["optimizer"]["state"].items():
        assert torch.equal(value["exp_avg_sq"], opt_b["optimizer"]["state"][slot]["exp_avg_sq"])
    # the log of the resumed run reads as if it had never stopped
    assert read_metrics(tmp_path / "full", "train") == read_metrics(tmp_path / "cut", "train")
    assert read_metrics(tmp_path / "full", "eval") == read_metrics(tmp_path / "cut", "eval")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(
    tiny_bert, corpus_file, tmp_path, monkeypatch
):
    calls = {"n": 0}
    original = model_module.contrastive_loss

    def poisoned(z1, z2, temperature):
        calls["n"] += 1
        loss = original(z1, z2, temperature)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(model_module, "contrastive_loss", poisoned)
    out = tmp_path / "nan"
    cfg = make_cfg(tiny_bert, corpus_file, out, lambda_weight=0.0, save_steps=2, eval_steps=2)
    with pytest.raises(TrainingDiverged, match=r"step 3: the training loss is nan.*\(step 2\)"):
        train(cfg)
    assert json.loads((out / "last" / "trainer_state.json").read_text())["step"] == 2
    # without STS data the latest checkpoint is also the model to export
    assert json.loads((out / "best" / "metrics.json").read_text())["step"] == 2
    assert not (out / "last" / "model.safetensors.tmp").exists()
    with pytest.raises(Exception, match="already holds a training run"):
        train(cfg)
