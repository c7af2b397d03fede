"""Every run draws its own report: report.png + report.json hold the run's curves and the STS-B
dev geometry, and report_to: tensorboard writes the same scalars as event files, resumable."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("matplotlib")
pytest.importorskip("tensorboard")

from diffcse_runtime import sts  # noqa: E402
from diffcse_runtime.errors import DiffcseError  # noqa: E402
from diffcse_runtime.ownership import NotOursError  # noqa: E402
from diffcse_train import report as report_module  # noqa: E402
from diffcse_train.config import ConfigError, TrainConfig, load_config  # noqa: E402
from diffcse_train.evaluation import make_encode_fn  # noqa: E402
from diffcse_train.model import build_model  # noqa: E402
from diffcse_train.run_dir import RUN_RECORD, RunDir  # noqa: E402
from diffcse_train.trainer import Trainer, train  # noqa: E402
from tests.support import read_metrics, tiny  # noqa: E402

pytestmark = pytest.mark.slow  # tiny end-to-end training runs

TRAIN_TAGS = ("loss", "loss_contrast", "loss_rtd", "rtd_acc", "rtd_rep_acc", "lr")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True, scope="module")
def one_thread(one_torch_thread):
    """One torch thread: the runs are tiny and the machine's cores are shared."""


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "train.txt"
    path.write_text("\n".join(tiny.corpus(480, seed=4)) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def sts_dir(tmp_path_factory) -> Path:
    """STS-B dev in the SentEval layout; gold = the words a pair shares (0 to 4)."""
    return tiny.write_overlap_stsb(tmp_path_factory.mktemp("sts"), 200)


def make_cfg(tiny_bert, corpus_file, out: Path, **kw) -> TrainConfig:
    values = dict(
        model_name_or_path=str(tiny_bert),
        train_file=str(corpus_file),
        output_dir=str(out),
        augmentation="replace",
        lambda_weight=0.1,
        batch_size=16,
        learning_rate=5e-4,
        epochs=1,
        max_steps=12,
        eval_steps=4,
        save_steps=4,
        seed=0,
    )
    values.update(kw)
    return TrainConfig(**values)


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag in the event files under `logdir`, as TensorBoard itself reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def tb_run(tiny_bert, corpus_file, sts_dir, tmp_path_factory):
    """One DiffCSE run with dev data and report_to: tensorboard; (cfg, summary)."""
    out = tmp_path_factory.mktemp("tb") / "run"
    cfg = make_cfg(tiny_bert, corpus_file, out, eval_data_dir=str(sts_dir), report_to="tensorboard")
    return cfg, train(cfg)


def test_report_png_is_drawn_and_its_path_is_in_the_summary(tb_run):
    cfg, summary = tb_run
    out = Path(cfg.output_dir)
    png = out / "report.png"
    assert summary.report == str(png)
    assert json.loads((out / "summary.json").read_text())["report"] == str(png)
    assert png.read_bytes()[:8] == PNG_MAGIC
    from matplotlib.image import imread

    height, width, _ = imread(png).shape
    assert width > 1000 and height > 600


def test_report_json_holds_the_series_of_the_metrics_log(tb_run):
    cfg, summary = tb_run
    out = Path(cfg.output_dir)
    body = json.loads((out / "report.json").read_text())
    evals, steps = read_metrics(out, "eval"), read_metrics(out, "train")
    assert body["eval"]["steps"] == [r["step"] for r in evals] == [0, 4, 8, 12]
    assert body["eval"]["scores"]["stsb_dev"] == [r["stsb_dev"] for r in evals]
    assert body["eval"]["input"] == {"stsb_dev": evals[0]["stsb_dev"]}
    assert body["eval"]["selected_step"] == summary.best_step
    assert body["train"]["steps"] == list(range(1, 13))
    for key in TRAIN_TAGS:
        assert body["train"][key] == [r[key] for r in steps], key
    assert body["discriminator"] is True


def test_geometry_of_the_input_and_the_selected_model(tb_run, tiny_bert, sts_dir):
    cfg, summary = tb_run
    geometry = json.loads((Path(cfg.output_dir) / "report.json").read_text())["geometry"]
    assert geometry["input"]["step"] == 0
    assert geometry["best"]["step"] == summary.best_step
    pairs = sts.load_task(sts_dir, "STSBenchmark", "dev")
    for g in geometry.values():
        assert 0 <= g["alignment"] <= 4 and -4 <= g["uniformity"] <= 0
        assert [b["range"] for b in g["buckets"]] == [[i, i + 1] for i in range(5)]
        assert sum(b["n"] for b in g["buckets"]) == len(pairs) == g["pairs"]
        assert all(math.isfinite(b["median"]) for b in g["buckets"] if b["n"])
    assert sum(b["n"] > 0 for b in geometry["input"]["buckets"]) >= 3
    # the input model's numbers, recomputed here from scratch with the plain definitions
    model, tokenizer = build_model(cfg)
    encode = make_encode_fn(model, tokenizer, torch.device("cpu"))
    a, b = encode(pairs.sents1), encode(pairs.sents2)
    a, b = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (a, b))
    close = pairs.gold >= 4
    assert geometry["input"]["alignment"] == pytest.approx(
        float(((a[close] - b[close]) ** 2).sum(1).mean()), rel=1e-4
    )
    unique = list(dict.fromkeys(pairs.sents1 + pairs.sents2))
    u = encode(unique)
    u = u / np.linalg.norm(u, axis=1, keepdims=True)
    sq = np.maximum(2 - 2 * (u @ u.T), 0)[np.triu_indices(len(u), k=1)]
    assert geometry["input"]["uniformity"] == pytest.approx(
        float(np.log(np.exp(-2 * sq).mean())), abs=1e-4
    )
    cos = (a * b).sum(1)
    top = cos[pairs.gold >= 4]
    assert geometry["input"]["buckets"][4]["median"] == pytest.approx(np.median(top), abs=1e-5)
    assert geometry["input"]["buckets"][4]["n"] == len(top)


def test_tensorboard_holds_every_scalar_per_step_and_eval(tb_run):
    cfg, _ = tb_run
    out = Path(cfg.output_dir)
    found = scalars(out / "tensorboard")
    steps, evals = read_metrics(out, "train"), read_metrics(out, "eval")
    for key in TRAIN_TAGS:
        assert found[f"train/{key}"] == [
            (r["step"], pytest.approx(r[key], rel=1e-5)) for r in steps
        ], key
    for key in ("stsb_dev", "dev_score"):
        assert found[f"dev/{key}"] == [(r["step"], pytest.approx(r[key])) for r in evals]
    assert len(found["train/loss"]) == cfg.max_steps


def test_simcse_without_dev_data_draws_what_exists_and_says_why(tiny_bert, corpus_file, tmp_path):
    out = tmp_path / "run"
    cfg = make_cfg(tiny_bert, corpus_file, out, lambda_weight=0.0, augmentation="none")
    summary = train(cfg)
    assert (out / "report.png").read_bytes()[:8] == PNG_MAGIC
    assert summary.report == str(out / "report.png")
    body = json.loads((out / "report.json").read_text())
    assert body["discriminator"] is False
    assert body["eval"]["steps"] == []
    assert body["geometry"] == {}
    assert "no STS-B dev data" in body["geometry_missing"]
    assert body["train"]["loss_rtd"] == [None] * 12
    assert not (out / "tensorboard").exists()  # report_to: none


def test_report_false_writes_no_report(tiny_bert, corpus_file, tmp_path):
    out = tmp_path / "run"
    summary = train(make_cfg(tiny_bert, corpus_file, out, max_steps=2, report=False))
    assert summary.report is None
    assert not (out / "report.png").exists() and not (out / "report.json").exists()


def test_an_interrupted_run_closes_its_events_and_resume_appends_without_duplicates(
    tiny_bert, corpus_file, sts_dir, tmp_path, monkeypatch
):
    cfg = make_cfg(
        tiny_bert, corpus_file, tmp_path / "run", max_steps=20, save_steps=8,
        eval_data_dir=str(sts_dir), report_to="tensorboard",
    )  # fmt: skip
    real = Trainer.train_step

    def interrupted(self, batch):
        if self.state.step == 17:  # step 17 is done and logged; the last checkpoint is 16
            raise KeyboardInterrupt
        return real(self, batch)

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    logdir = tmp_path / "run" / "tensorboard"
    assert [s for s, _ in scalars(logdir)["train/loss"]] == list(range(1, 18))  # flushed
    monkeypatch.setattr(Trainer, "train_step", real)
    train(cfg, resume=True)
    found = scalars(logdir)
    assert len(list(logdir.iterdir())) == 2  # a new event file beside the first
    assert [s for s, _ in found["train/loss"]] == list(range(1, 21))
    assert [s for s, _ in found["dev/stsb_dev"]] == [0, 4, 8, 12, 16, 20]
    body = json.loads((tmp_path / "run" / "report.json").read_text())
    assert body["geometry"]["input"]["step"] == 0  # measured before the interruption, kept
    assert body["eval"]["steps"] == [0, 4, 8, 12, 16, 20]


def test_overwrite_replaces_the_report_but_never_a_foreign_file(
    tiny_bert, corpus_file, sts_dir, tmp_path
):
    out = tmp_path / "run"
    cfg = make_cfg(tiny_bert, corpus_file, out, max_steps=4, report_to="tensorboard")
    train(cfg)
    claimed = json.loads((out / RUN_RECORD).read_text())["entries"]
    assert {"report.png", "report.json", "tensorboard"} <= set(claimed)
    note = out / "tensorboard" / "notes.txt"
    note.write_text("mine")
    with pytest.raises(NotOursError, match="notes.txt is not a TensorBoard event file"):
        RunDir(out).check(cfg, resume=False, overwrite=True)
    note.unlink()
    train(replace(cfg, report_to="none"), overwrite=True)
    assert not (out / "tensorboard").exists()  # replaced: this run wrote no events
    assert (out / "report.png").is_file()


def test_a_bad_report_to_is_one_sentence_naming_the_key():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model_name_or_path=m", "train_file=t", "output_dir=o",
                           "report_to=wandb"])  # fmt: skip
    assert str(err.value) == "key 'report_to' must be one of none, tensorboard; got 'wandb'"


def test_missing_tensorboard_is_named_before_training(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name)
    )
    cfg = TrainConfig(model_name_or_path="m", train_file="t", output_dir="o")
    report_module.check_available(cfg)  # report_to: none needs no tensorboard
    with pytest.raises(DiffcseError, match=r'report_to.*pip install "diffcse\[train\]"'):
        report_module.check_available(replace(cfg, report_to="tensorboard"))


def test_the_geometry_reuses_the_vectors_the_evaluation_computed(sts_dir):
    calls = []

    def encode(sentences: list[str]) -> np.ndarray:
        calls.append(len(sentences))
        seeds = [sum(map(ord, s)) for s in sentences]
        return np.stack([np.random.default_rng(s).normal(size=8) for s in seeds])

    recording = report_module.RecordingEncode(encode)
    sts.evaluate(recording, sts_dir, ["STSBenchmark"], split="dev")
    first = report_module.analyse(recording, sts_dir, step=4)
    assert len(calls) == 1  # no second forward pass over the dev set
    recording.forget()
    assert report_module.analyse(recording, sts_dir, step=4) == first
    assert len(calls) == 2  # after forget, encoded afresh (and the same numbers)
