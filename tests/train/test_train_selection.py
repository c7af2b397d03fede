"""Which step ships (select_on, keep_initial) and the RTD levers for short runs
(discriminator_learning_rate, discriminator_warmup_steps, lambda_warmup_steps)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from diffcse_train.config import ConfigError, TrainConfig, validate  # noqa: E402
from diffcse_train.trainer import Trainer, train  # noqa: E402
from tests.support import read_metrics, tiny  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread(one_torch_thread):
    """Keep the CPU quiet for the other tests."""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A corpus and STS-B dev + SICK trial files (their scores are scripted below)."""
    root = tmp_path_factory.mktemp("selection")
    corpus = root / "train.txt"
    corpus.write_text("\n".join(tiny.corpus(64, seed=3)) + "\n", encoding="utf-8")
    sts = tiny.write_overlap_stsb(root / "sts", 40)
    rows = ["pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment"]
    pairs = tiny.corpus(20, seed=12)
    rows += [f"{i}\t{pairs[i]}\t{pairs[i + 1]}\t{1 + i % 4}.0\tNEUTRAL" for i in range(0, 20, 2)]
    (sts / "SICK").mkdir()
    (sts / "SICK" / "SICK_trial.txt").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return corpus, sts


def config(tiny_bert, data, out, **over) -> TrainConfig:
    corpus, sts = data
    base = dict(
        model_name_or_path=str(tiny_bert), train_file=str(corpus), output_dir=str(out),
        eval_data_dir=str(sts), augmentation="replace", lambda_weight=0.1, batch_size=16,
        max_steps=2, eval_steps=1, save_steps=2, device="cpu", learning_rate=1e-3,
    )  # fmt: skip
    return TrainConfig(**(base | over))


def script_scores(monkeypatch, scores: list[tuple[float, float]]) -> None:
    """The dev evaluation returns these (STS-B dev, SICK-R trial) scores, step 0 first."""
    scripted = iter(scores)

    def evaluate(encode, data_dir, tasks, split):
        stsb, sick = next(scripted)
        given = {"STSBenchmark": stsb, "SICKRelatedness": sick}
        return SimpleNamespace(scores={t: SimpleNamespace(spearman=given[t]) for t in tasks})

    monkeypatch.setattr("diffcse_train.trainer.sts.evaluate", evaluate)


# step 1 has the best mean (it gains a lot on SICK-R) but falls on STS-B dev; step 2 is
# the best on STS-B dev alone
SCORES = [(80.0, 70.0), (79.0, 76.0), (81.0, 70.5)]


@pytest.mark.parametrize(("select_on", "best_step"), [("STSBenchmark", 2), ("", 1)])
def test_select_on_picks_best_by_those_tasks_alone(
    tiny_bert, data, tmp_path, monkeypatch, select_on, best_step
):
    script_scores(monkeypatch, SCORES)
    cfg = config(
        tiny_bert, data, tmp_path / "run", eval_tasks="STSBenchmark,SICKRelatedness",
        select_on=select_on, keep_initial=True,
    )  # fmt: skip
    assert train(cfg).best_step == best_step
    evals = read_metrics(tmp_path / "run", "eval")
    assert [(r["stsb_dev"], r["sick_trial"]) for r in evals] == SCORES  # both still logged
    assert json.loads((tmp_path / "run" / "best" / "metrics.json").read_text())["step"] == best_step


def test_keep_initial_ships_the_input_when_no_step_beats_it_on_the_selection_task(
    tiny_bert, data, tmp_path, monkeypatch
):
    """SICK-R rises at every step but STS-B dev never beats the input: step 0 ships."""
    script_scores(monkeypatch, [(80.0, 70.0), (79.5, 75.0), (79.9, 76.0)])
    cfg = config(
        tiny_bert, data, tmp_path / "run", eval_tasks="STSBenchmark,SICKRelatedness",
        select_on="STSBenchmark", keep_initial=True,
    )  # fmt: skip
    assert train(cfg).best_step == 0


def test_select_on_must_name_eval_tasks(tiny_bert, data, tmp_path):
    cfg = config(tiny_bert, data, tmp_path / "run", select_on="SICKRelatedness")
    with pytest.raises(ConfigError, match="'select_on': 'SICKRelatedness' is not one of eval"):
        validate(cfg)


def test_discriminator_gets_its_own_learning_rate(tiny_bert, data, tmp_path):
    cfg = config(tiny_bert, data, tmp_path / "run", discriminator_learning_rate=5e-2)
    trainer = Trainer(cfg)
    rates = {}
    for group in trainer.optimizer.param_groups:
        for p in group["params"]:
            rates[id(p)] = group["initial_lr"]
    d_params = {id(p) for p in trainer.model.discriminator.parameters() if p.requires_grad}
    f_params = {id(p) for p in trainer.model.encoder.parameters() if p.requires_grad}
    assert {rates[i] for i in d_params} == {5e-2}
    assert {rates[i] for i in f_params} == {1e-3}


def test_discriminator_warm_start_trains_d_alone(tiny_bert, data, tmp_path):
    cfg = config(
        tiny_bert, data, tmp_path / "run", discriminator_warmup_steps=3,
        discriminator_learning_rate=1e-2,
    )  # fmt: skip
    trainer = Trainer(cfg)
    f_before = {k: v.clone() for k, v in trainer.model.encoder.state_dict().items()}
    d_before = {k: v.clone() for k, v in trainer.model.discriminator.state_dict().items()}
    trainer._warm_start_discriminator()
    f_after, d_after = trainer.model.encoder.state_dict(), trainer.model.discriminator.state_dict()
    assert all(torch.equal(f_before[k], f_after[k]) for k in f_before)  # f frozen
    assert any(not torch.equal(d_before[k], d_after[k]) for k in d_before)  # D learned
    assert trainer.state.step == 0 and trainer.state.batch_in_epoch == 0  # data not consumed
    warm = read_metrics(tmp_path / "run", "d_warmup")
    assert [r["step"] for r in warm] == [1, 2, 3]
    assert all(0 <= r["rtd_acc"] <= 1 for r in warm)


def test_lambda_rises_over_lambda_warmup_steps(tiny_bert, data, tmp_path):
    cfg = config(
        tiny_bert, data, tmp_path / "run", lambda_warmup_steps=4, max_steps=5, eval_steps=5,
        save_steps=5, eval_data_dir=None,
    )  # fmt: skip
    train(cfg)
    lambdas = [r["lambda"] for r in read_metrics(tmp_path / "run", "train")]
    assert lambdas == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1])


@pytest.mark.slow  # two tiny runs, an export and the scored table
def test_compare_with_simcse_ships_the_better_arm_and_says_so(
    tiny_bert, data, tmp_path, monkeypatch
):
    """DiffCSE peaks at 80.5 on STS-B dev, its SimCSE twin at 81.0: SimCSE ships, and the
    table names both objectives."""
    from click.testing import CliRunner

    from diffcse_train.cli import train_cmd

    scripted = iter([80.0, 80.5, 80.2, 80.0, 79.0, 81.0])  # DiffCSE steps 0-2, SimCSE 0-2

    def evaluate(self):
        self.dev_scores = {"stsb_dev": next(scripted)}
        return self.dev_scores["stsb_dev"]

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    corpus, sts = data
    out = tmp_path / "run"
    args = ["--quiet"]
    for item in (
        f"model_name_or_path={tiny_bert}", f"train_file={corpus}", f"output_dir={out}",
        f"eval_data_dir={sts}", f"export_dir={tmp_path / 'model'}", "augmentation=replace",
        "lambda_weight=0.1", "batch_size=16", "max_steps=2", "eval_steps=1", "save_steps=2",
        "device=cpu", "keep_initial=true", "compare_with=simcse", "export_variants=",
    ):  # fmt: skip
        args += ["--set", item]
    result = CliRunner().invoke(train_cmd, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "shipped: SimCSE, the better on STS-B dev at selection: " in result.output
    assert "DiffCSE-replace 80.50 (step 1) vs SimCSE 81.00 (step 2)" in result.output
    scores = json.loads((out / "scores.json").read_text())
    assert scores["shipped"] == "SimCSE"
    names = [r["name"] for r in scores["rows"]]
    assert names == ["input model", "SimCSE (fp32)", "DiffCSE-replace, not shipped"]
    twin = tmp_path / "run-simcse"
    assert json.loads((twin / "best" / "metrics.json").read_text())["step"] == 2
    assert scores["rows"][1]["path"] == str(tmp_path / "model")
    twin_cfg = (twin / "train_config.yaml").read_text()
    assert "lambda_weight: 0.0" in twin_cfg and "augmentation: none" in twin_cfg
