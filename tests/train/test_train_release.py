"""The main job's last step: `diffcse-train` with export_dir trains, exports (fp32 + int8,
parity-gated) and prints a before/after table scored by the runtime; it refuses up front
to replace an export it may not replace, so no training time is lost."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
from click.testing import CliRunner  # noqa: E402

from diffcse_runtime import Encoder, load_metadata  # noqa: E402
from diffcse_train.cli import train_cmd as main  # noqa: E402
from tests.support import read_metrics, tiny  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread(one_torch_thread):
    """Keep the CPU quiet for the other tests."""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A corpus file and STS-B dev + SICK trial files in the SentEval layout."""
    root = tmp_path_factory.mktemp("release")
    corpus = root / "train.txt"
    corpus.write_text("\n".join(tiny.corpus(64, seed=3)) + "\n", encoding="utf-8")
    sts = tiny.write_overlap_stsb(root / "sts", 60)
    pairs = tiny.corpus(40, seed=12)
    rows = ["pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment"]
    for i in range(0, 40, 2):
        gold = 1 + len(set(pairs[i].split()) & set(pairs[i + 1].split()))
        rows.append(f"{i}\t{pairs[i]}\t{pairs[i + 1]}\t{min(gold, 5):.1f}\tNEUTRAL")
    (sts / "SICK").mkdir()
    (sts / "SICK" / "SICK_trial.txt").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return corpus, sts


@pytest.fixture(scope="module")
def mean_source(tiny_bert, tmp_path_factory):
    folder = tmp_path_factory.mktemp("mean_source") / "model"
    return tiny.as_sentence_transformers(tiny_bert, folder, "mean")


def run(source, data, out, *extra):
    corpus, sts = data
    args = ["--quiet", "--set", f"model_name_or_path={source}", "--set", f"train_file={corpus}"]
    for item in (
        f"output_dir={out}", f"eval_data_dir={sts}", f"export_dir={out / 'model'}",
        "augmentation=replace", "lambda_weight=0.1", "batch_size=16", "max_steps=2",
        "eval_steps=2", "save_steps=2", "learning_rate=1e-3", "device=cpu",
    ):  # fmt: skip
        args += ["--set", item]
    return CliRunner().invoke(main, args + list(extra), catch_exceptions=False)


@pytest.mark.slow  # end to end: trains, exports fp32 and int8, scores each
def test_main_job_trains_exports_and_scores_before_and_after(mean_source, data, tmp_path):
    out = tmp_path / "run"
    result = run(mean_source, data, out)
    assert result.exit_code == 0, result.output
    assert "before vs after training" in result.output  # printed even with --quiet
    assert "DiffCSE-replace (int8)" in result.output  # the row names the objective shipped
    scores = json.loads((out / "scores.json").read_text())
    names = [row["name"] for row in scores["rows"]]
    assert names == ["input model", "DiffCSE-replace (fp32)", "DiffCSE-replace (int8)"]
    for row in scores["rows"]:
        assert row["pooling"] == "mean"  # the input keeps its native pooling, as trained
        assert set(row["scores"]) == {"STSBenchmark", "SICKRelatedness"}
        assert all(-100 <= v <= 100 for v in row["scores"].values())
    fp32, int8 = out / "model", out / "model-int8"
    assert load_metadata(fp32).pooling == "mean" and load_metadata(int8).variant == "int8"
    # the table's fp32 row is what the runtime gives for the exported model
    from diffcse_runtime import sts

    result_fp32 = sts.evaluate(Encoder(fp32).encode, data[1], ["STSBenchmark"], split="dev")
    trained = scores["rows"][1]["scores"]["STSBenchmark"]
    assert trained == pytest.approx(result_fp32.scores["STSBenchmark"].spearman)


def test_an_existing_export_is_refused_before_training(tiny_bert, data, tmp_path):
    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    (out / "model" / "notes.txt").write_text("mine")
    result = run(tiny_bert, data, out)
    assert result.exit_code == 1
    assert "already exists" in result.output and "--overwrite" in result.output
    assert not (out / "last").exists()  # refused before any training
    assert (out / "model" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("every_task, best_step", [(False, 1), (True, 2)])
def test_gain_on_every_task_keeps_a_step_that_is_worse_on_one_task(
    tiny_bert, data, tmp_path, monkeypatch, every_task, best_step
):
    """Scripted dev scores: step 1 has the best mean but falls on SICK-R; step 2 gains a
    little on both. The mean alone picks step 1; gain_on_every_task picks step 2."""
    from diffcse_train.config import TrainConfig
    from diffcse_train.trainer import Trainer, train

    scripted = iter([(80.0, 70.0), (85.0, 69.0), (80.5, 70.5)])  # steps 0, 1, 2

    def evaluate(self):
        stsb, sick = next(scripted)
        self.dev_scores = {"stsb_dev": stsb, "sick_trial": sick}
        return (stsb + sick) / 2

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    corpus, sts = data
    out = tmp_path / "run"
    cfg = TrainConfig(
        model_name_or_path=str(tiny_bert), train_file=str(corpus), output_dir=str(out),
        eval_data_dir=str(sts), augmentation="replace", batch_size=16, max_steps=2,
        eval_steps=1, save_steps=2, device="cpu", eval_tasks="STSBenchmark,SICKRelatedness",
        keep_initial=True, gain_on_every_task=every_task,
    )  # fmt: skip
    assert train(cfg).best_step == best_step
    evals = read_metrics(out, "eval")
    assert [r.get("eligible", True) for r in evals[1:]] == [not every_task, True]
    assert json.loads((out / "best" / "metrics.json").read_text())["step"] == best_step


def test_gain_on_every_task_needs_keep_initial():
    from diffcse_train.config import ConfigError, TrainConfig, validate

    cfg = TrainConfig(
        model_name_or_path="m",
        train_file="t",
        output_dir="o",
        augmentation="replace",
        gain_on_every_task=True,
    )
    with pytest.raises(ConfigError, match="gain_on_every_task: true needs keep_initial: true"):
        validate(cfg)


def test_keep_initial_ships_the_input_when_training_only_hurts(tiny_bert, data, tmp_path):
    """A learning rate that wrecks the encoder: with keep_initial, best/ is step 0 (the
    input, unchanged) and the selection used the mean of both dev tasks."""
    from safetensors.torch import load_file

    from diffcse_train.config import TrainConfig
    from diffcse_train.trainer import train

    corpus, sts = data
    out = tmp_path / "run"
    cfg = TrainConfig(
        model_name_or_path=str(tiny_bert), train_file=str(corpus), output_dir=str(out),
        eval_data_dir=str(sts), augmentation="replace", lambda_weight=0.1, batch_size=16,
        max_steps=2, eval_steps=1, save_steps=2, learning_rate=0.5, device="cpu",
        eval_tasks="STSBenchmark,SICKRelatedness", keep_initial=True,
    )  # fmt: skip
    summary = train(cfg)
    assert summary.best_step == 0
    metrics = json.loads((out / "best" / "metrics.json").read_text())
    assert metrics["eval_tasks"] == ["STSBenchmark", "SICKRelatedness"]
    assert metrics["dev_score"] == pytest.approx((metrics["stsb_dev"] + metrics["sick_trial"]) / 2)
    source = load_file(str(tiny_bert / "model.safetensors"))
    best = load_file(str(out / "best" / "model.safetensors"))
    shared = [k for k in source if k in best]
    assert shared and all(torch.equal(source[k], best[k]) for k in shared)


def test_the_table_says_whether_the_promise_holds():
    from diffcse_train.release import Row, format_rows

    def row(name, stsb, sick):
        return Row(name, "mean", "", {"STSBenchmark": stsb, "SICKRelatedness": sick})

    start = row("input model", 86.72, 79.80)
    better = format_rows([start, row("trained (fp32)", 86.90, 79.85)])
    assert better.endswith("the trained model beats the input model on every dev set")
    same = format_rows([start, row("trained (fp32)", 86.72, 79.80)])
    assert "the input was shipped unchanged" in same.splitlines()[-1]
    worse = format_rows([start, row("trained (fp32)", 87.10, 79.51)])
    assert worse.splitlines()[-1].endswith("BELOW the input model on SICK-R trial (-0.29)")
