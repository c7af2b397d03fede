"""Multi-process training (DDP, gloo, 2 CPU processes under torchrun) matches one process
with the global batch, and `torchrun -m diffcse_train` checkpoints once and resumes exactly.

Equivalence runs use an encoder without dropout (dropout masks are drawn per rank, so they
cannot match a single process) and float64 (see ddp_worker.build_trainer).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from diffcse_runtime.errors import DiffcseError  # noqa: E402
from diffcse_train import distributed  # noqa: E402
from diffcse_train.config import ConfigError, TrainConfig, load_config  # noqa: E402
from diffcse_train.data import IGNORE, Collator, epoch_order  # noqa: E402
from diffcse_train.trainer import train  # noqa: E402
from tests.support import read_metrics, tiny  # noqa: E402
from tests.support.ddp_worker import build_trainer, rank_rows  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "support" / "ddp_worker.py"
KILL_AFTER_STEP = str(ROOT / "tests" / "support" / "kill_after_step.py")  # diffcse-train, killed
B = 4  # per-rank batch; the single-process reference uses 2 * B


def torchrun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """2 processes on this machine, gloo; one thread each (bitwise-stable sums)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return subprocess.run(
        [*cmd, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(autouse=True, scope="module")
def one_thread(one_torch_thread):
    """Same thread count as the subprocesses (bitwise equality), no OpenMP spin on 2 cores."""


@pytest.fixture(scope="module")
def no_dropout_bert(tiny_bert, tmp_path_factory) -> Path:
    """tiny_bert with dropout off: the two views of a sentence are then identical."""
    from transformers import AutoModel, AutoTokenizer

    out = tmp_path_factory.mktemp("bert_no_dropout")
    model = AutoModel.from_pretrained(
        tiny_bert, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ddp_corpus") / "train.txt"
    path.write_text("\n".join(tiny.corpus(64, seed=5)) + "\n", encoding="utf-8")
    return path


def config(model: Path, corpus: Path, out: Path, **kw) -> TrainConfig:
    values = dict(
        model_name_or_path=str(model),
        train_file=str(corpus),
        output_dir=str(out),
        batch_size=B,
        augmentation="replace",
        lambda_weight=1.0,  # large, so a wrong RTD normalisation would show
        temperature=0.5,  # the views are identical without dropout: keep the softmax unsaturated
        max_grad_norm=0.0,
        learning_rate=1e-3,
        max_steps=1,
        seed=3,
    )
    values.update(kw)
    return TrainConfig(**values)


# ---------------------------------------------------------------- one process: pure pieces


def test_rank_batches_tile_the_single_process_batch():
    order = epoch_order(50, seed=7, epoch=1)
    for batch in range(6):  # 50 // (2 * 4) global batches
        ranks = [distributed.rank_batch(order, batch, B, r, 2) for r in range(2)]
        single = distributed.rank_batch(order, batch, 2 * B, 0, 1)
        assert torch.equal(torch.cat(ranks), single)
    assert torch.equal(distributed.rank_batch(order, 2, B, 0, 1), order[2 * B : 3 * B])


def test_launch_env_reads_torchrun_variables_and_names_what_is_missing():
    assert distributed.launch_env({}) == distributed.LaunchEnv(1, 0, 0)
    env = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "MASTER_ADDR": "node0"}
    assert distributed.launch_env(env) == distributed.LaunchEnv(4, 3, 1)
    with pytest.raises(DiffcseError, match="RANK or MASTER_ADDR is not.*torchrun"):
        distributed.launch_env({"WORLD_SIZE": "2"})
    with pytest.raises(DiffcseError, match="must be integers"):
        distributed.launch_env({"WORLD_SIZE": "two"})


def test_gradient_accumulation_is_refused_with_the_reason(tmp_path):
    path = tmp_path / "accum.yaml"
    path.write_text("model_name_or_path: m\ntrain_file: t\noutput_dir: o\nlambda_weight: 0\n")
    with pytest.raises(ConfigError, match="gradient_accumulation_steps.*in-batch negatives"):
        load_config(path, ["gradient_accumulation_steps=4"])
    assert load_config(path).gather_negatives is True


# ---------------------------------------------------------------- 2 processes vs 1


@pytest.fixture(scope="module")
def sts_dir(tmp_path_factory) -> Path:
    """A small STS-B dev set in the SentEval layout (gold = shared words of the pair)."""
    return tiny.write_overlap_stsb(tmp_path_factory.mktemp("ddp_sts"), 80)


def cli_config(tiny_bert, corpus_file, sts_dir, out: Path) -> TrainConfig:
    """Dropout on and random edits: per-rank RNG streams that a resume must restore."""
    return config(
        tiny_bert, corpus_file, out, lambda_weight=0.1, temperature=0.05, batch_size=8,
        epochs=2, max_steps=6, eval_steps=3, save_steps=2, eval_data_dir=str(sts_dir),
    )  # fmt: skip


@pytest.fixture(scope="module")
def equivalence(no_dropout_bert, tiny_bert, corpus_file, sts_dir, tmp_path_factory):
    """One torchrun launch for all scenarios (each launch costs ~20 s of CPU on 2 cores);
    returns (scenarios by name, the global batch)."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("ddp_equivalence")
    tokenizer = AutoTokenizer.from_pretrained(no_dropout_bert)
    collator = Collator(tokenizer, 32, "replace", 0.3, seed=11)
    batch = collator(tiny.corpus(2 * B, seed=8))
    torch.save(batch, root / "batch.pt")

    def scenario(name, optimizer="sgd", batch=str(root / "batch.pt"), **kw):
        cfg = config(no_dropout_bert, corpus_file, root / name, **kw)
        return {"name": name, "config": asdict(cfg), "optimizer": optimizer, "batch": batch}

    scenarios = [
        scenario("rtd_sgd"),
        scenario("rtd_adamw", optimizer="adamw", max_grad_norm=1.0),
        scenario("rtd_not_gathered", gather_negatives=False),
        # no batch: run() picks each rank's rows of the seeded order itself
        scenario("simcse_loop", batch=None, lambda_weight=0.0, max_steps=3, save_steps=3),
    ]
    # an uninterrupted 2-process run of the CLI test's config: what its resumed run must equal
    reference = cli_config(tiny_bert, corpus_file, sts_dir, root / "reference")
    scenarios.append(
        {"name": "reference", "config": asdict(reference), "optimizer": "plain", "batch": None}
    )
    (root / "spec.json").write_text(json.dumps({"scenarios": scenarios}))
    proc = torchrun(str(WORKER), str(root / "spec.json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {s["name"]: s for s in scenarios}, batch


def single_process_step(scenario: dict, batch: dict, tmp_path: Path) -> tuple[dict, dict]:
    """The same step in this process with batch 2B (the whole global batch): (before, after)."""
    cfg = TrainConfig(**{**scenario["config"], "batch_size": 2 * B})
    cfg = replace(cfg, output_dir=str(tmp_path / scenario["name"]), gather_negatives=True)
    trainer = build_trainer(cfg, scenario["optimizer"])
    before = {k: v.clone() for k, v in trainer.model.trainable_state_dict().items()}
    trainer.train_step(batch)
    return before, trainer.model.trainable_state_dict()


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.mark.slow  # torchrun, 2 processes
@pytest.mark.parametrize("name", ["rtd_sgd", "rtd_adamw"])
def test_one_ddp_step_equals_one_single_process_step(name, equivalence, tmp_path):
    scenarios, batch = equivalence
    valid = rank_rows(batch, 0, 2)["aug_labels"] != IGNORE
    assert 2 * int(valid.sum()) != int((batch["aug_labels"] != IGNORE).sum())
    # (the ranks hold different token counts, so the RTD loss normalisation matters)
    before, single = single_process_step(scenarios[name], batch, tmp_path)
    ddp = torch.load(Path(scenarios[name]["config"]["output_dir"]) / "params.pt")
    moved = {k: v for k, v in before.items() if v.is_floating_point()}
    assert max_difference(moved, {k: single[k] for k in moved}) > 1e-4  # the step moved them
    assert max_difference(ddp, single) < 1e-6
    # BatchNorm statistics of the global batch, not of one rank's half
    assert torch.allclose(ddp["projector.bn1.running_mean"], single["projector.bn1.running_mean"])


@pytest.mark.slow  # torchrun, 2 processes
def test_without_gathered_negatives_the_step_differs(equivalence, tmp_path):
    scenarios, batch = equivalence
    _, single = single_process_step(scenarios["rtd_sgd"], batch, tmp_path)
    out = Path(scenarios["rtd_not_gathered"]["config"]["output_dir"])
    assert max_difference(torch.load(out / "params.pt"), single) > 1e-4


@pytest.mark.slow  # torchrun, 2 processes
def test_ddp_training_loop_follows_the_single_process_run(equivalence, tmp_path):
    """The real data path: each rank's block of the seeded order, three steps, last/ saved."""
    from safetensors.torch import load_file

    scenario = equivalence[0]["simcse_loop"]
    cfg = TrainConfig(**{**scenario["config"], "batch_size": 2 * B})
    cfg = replace(cfg, output_dir=str(tmp_path / "single"))
    build_trainer(cfg, "sgd").run()
    ddp_out = Path(scenario["config"]["output_dir"])
    ddp = load_file(ddp_out / "last" / "model.safetensors")
    single = load_file(tmp_path / "single" / "last" / "model.safetensors")
    assert max_difference(ddp, single) < 1e-6
    state = json.loads((ddp_out / "last" / "trainer_state.json").read_text())
    assert (state["step"], state["world_size"]) == (3, 2)


# ---------------------------------------------------------------- torchrun -m diffcse_train


@pytest.mark.slow  # torchrun, 2 processes
def test_torchrun_cli_checkpoints_on_rank_0_and_resumes_exactly(
    equivalence, tiny_bert, corpus_file, sts_dir, tmp_path
):
    """`torchrun -m diffcse_train`, killed after step 5 and resumed, ends exactly where an
    uninterrupted 2-process run ends; rank 0 alone logs, evaluates and writes."""
    from safetensors.torch import load_file

    full = Path(equivalence[0]["reference"]["config"]["output_dir"])
    cut = cli_config(tiny_bert, corpus_file, sts_dir, tmp_path / "cut")
    (tmp_path / "cut.yaml").write_text(cut.to_yaml())
    proc = torchrun(KILL_AFTER_STEP, "5", "--config", str(tmp_path / "cut.yaml"))
    assert proc.returncode != 0
    state = json.loads((tmp_path / "cut" / "last" / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (4, 1, 0)
    proc = torchrun("-m", "diffcse_train", "--config", str(tmp_path / "cut.yaml"), "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("distributed: 2 processes (gloo)") == 1  # rank 0 reports
    records = read_metrics(tmp_path / "cut")
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 3, 6]
    assert read_metrics(full) == records
    state = json.loads((tmp_path / "cut" / "last" / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["world_size"]) == (6, 1, 2)  # 4 steps/epoch
    assert json.loads((tmp_path / "cut" / "best" / "metrics.json").read_text())["step"] in (3, 6)
    assert json.loads((tmp_path / "cut" / "summary.json").read_text())["steps"] == 6
    for name in ("last", "best"):
        a = load_file(full / name / "model.safetensors")
        b = load_file(tmp_path / "cut" / name / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

    # one process cannot continue a two-process run: its global batch would differ
    with pytest.raises(DiffcseError, match="written by 2 process.*same torchrun"):
        train(cut, resume=True)
