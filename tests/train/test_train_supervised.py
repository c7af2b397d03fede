"""Supervised SimCSE: the loss against plain math, the triplet file formats and their
errors, objective auto-detection, and tiny training runs through the hard-negative path."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from diffcse_runtime.errors import DataFormatError, DiffcseError  # noqa: E402
from diffcse_train.config import TrainConfig  # noqa: E402
from diffcse_train.data import Collator  # noqa: E402
from diffcse_train.losses import supervised_contrastive_loss  # noqa: E402
from diffcse_train.model import build_model, load_tokenizer  # noqa: E402
from diffcse_train.trainer import train  # noqa: E402
from diffcse_train.triplets import Triplet, load_triplets, resolve_objective  # noqa: E402
from tests.support import read_metrics, tiny  # noqa: E402

ANCHOR = [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 1.0, 1.0]]
POSITIVE = [[0.9, 0.1, 0.0], [0.2, 1.0, 0.3], [1.0, 0.5, 1.0]]
HARD_NEG = [[-1.0, 0.2, 0.0], [0.0, -1.0, 1.0], [1.0, 1.0, 0.9]]


def cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def hand_loss(anchor, positive, negative, t: float) -> float:
    """Mean over i of -log e^{cos(h_i,h_i+)/t} / sum_j (e^{cos(h_i,h_j+)/t} + e^{cos(h_i,h_j-)/t})
    in plain Python floats."""
    total = 0.0
    for i, h in enumerate(anchor):
        terms = [math.exp(cos(h, p) / t) for p in positive]
        terms += [math.exp(cos(h, n) / t) for n in negative]
        total += -math.log(math.exp(cos(h, positive[i]) / t) / sum(terms))
    return total / len(anchor)


@pytest.mark.parametrize("with_hard_neg", [True, False], ids=["hard_neg", "positives_only"])
def test_supervised_loss_matches_the_formula_on_a_3_row_batch(with_hard_neg):
    t = 0.5
    negative = HARD_NEG if with_hard_neg else []
    expected = hand_loss(ANCHOR, POSITIVE, negative, t)
    hn = torch.tensor(HARD_NEG, dtype=torch.float64) if with_hard_neg else None
    got = supervised_contrastive_loss(
        torch.tensor(ANCHOR, dtype=torch.float64), torch.tensor(POSITIVE, dtype=torch.float64),
        hn, temperature=t,
    )  # fmt: skip
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_hard_negatives_raise_the_loss_when_they_look_like_the_positive():
    """A hard negative close to the anchor must cost more than one far from it."""
    a, p = torch.tensor(ANCHOR), torch.tensor(POSITIVE)
    near = supervised_contrastive_loss(a, p, p + 0.01, temperature=0.05)
    far = supervised_contrastive_loss(a, p, -a, temperature=0.05)
    assert near.item() > far.item() + 0.5


def test_gathered_candidates_keep_this_ranks_positives_at_its_offset():
    """Under DDP every rank's positives and hard negatives are candidates; rank 1's anchor i
    must pick row offset + i. Simulated here with rank 0's block gathered in front."""
    t = 0.5
    other_pos, other_neg = [[0.3, 0.3, 1.0], [1.0, -0.5, 0.0]], [[0.0, 0.0, 1.0], [2.0, 1.0, 0.0]]
    rows = len(other_pos) + len(other_neg)
    other = torch.tensor(other_pos + other_neg, dtype=torch.float64)

    def gather(candidates):  # this rank is rank 1 of 2: rank 0's rows come first
        return torch.cat([other, candidates]), rows

    a, p, n = (torch.tensor(x[:2], dtype=torch.float64) for x in (ANCHOR, POSITIVE, HARD_NEG))
    got = supervised_contrastive_loss(a, p, n, temperature=t, gather=gather)
    expected = hand_loss(ANCHOR[:2], POSITIVE[:2], HARD_NEG[:2] + other_pos + other_neg, t)
    assert got.item() == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------- file formats


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


GOOD = {
    "t.csv": 'sent0,sent1,hard_neg\n"a man, tall",a tall man,a cat\n\nthe dog,a dog,no dog\n',
    "t.tsv": 'hard_neg\tsent0\tsent1\na cat\ta "tall" man\ta tall man\nno dog\tthe dog\ta dog\n',
    "t.jsonl": '{"sent0": "a, man", "sent1": "a man", "hard_neg": "a cat"}\n'
    '{"hard_neg": "no dog", "sent1": "a dog", "sent0": "the dog"}\n',
}


@pytest.mark.parametrize("name", list(GOOD))
def test_each_format_reads_columns_by_name(tmp_path, name):
    data = load_triplets(str(write(tmp_path / name, GOOD[name])))
    assert data.hard_negatives and len(data.triplets) == 2
    assert data.triplets[1] == Triplet("the dog", "a dog", "no dog")
    assert resolve_objective("auto", str(tmp_path / name)) == "supervised"


def test_pairs_without_hard_negatives_and_a_bom(tmp_path):
    path = write(tmp_path / "p.csv", "\ufeffsent0,sent1\nx,y\nz,w\n")
    data = load_triplets(str(path))
    assert not data.hard_negatives and data.triplets == [Triplet("x", "y"), Triplet("z", "w")]


PAIR = '{"sent0": "a", "sent1": "b"}\n'
TRIPLE = '{"sent0": "a", "sent1": "b", "hard_neg": "c"}\n'
BAD = [
    ("b.csv", "sent0,sent1\na,b\nc\n", 3, r"1 fields, but the header has 2 \(sent0, sent1\)"),
    ("b.csv", "sent0,sent1\na,b,c\n", 2, "3 fields, but the header has 2"),
    ("b.csv", "sent0,sent1,hard_neg\na,b,c\nd,e,\n", 3, "empty hard_neg; hard_neg must be on"),
    ("b.csv", "sent0,sent1\na,  \n", 2, "empty sent1"),
    ("b.csv", 'sent0,sent1\na,"b\n', 2, "malformed CSV"),
    ("b.csv", "sent0,sent1,hardneg\na,b,c\n", 1, "unknown column 'hardneg'"),
    ("b.csv", "sent0,sent1,sent1\na,b,c\n", 1, "is repeated"),
    ("b.tsv", "sent0\tsent1\na\tb\tc\n", 2, "3 fields.*a field cannot hold a tab"),
    ("b.tsv", "sent0\tsent1\n\na\t\n", 3, "empty sent1"),
    ("b.jsonl", PAIR + '{"sent0": "a", "sent1": \n', 2, "not valid JSON"),
    ("b.jsonl", PAIR + '["a", "b"]\n', 2, "expected a JSON object"),
    ("b.jsonl", PAIR + '{"sent0": "a"}\n', 2, "no key 'sent1'"),
    ("b.jsonl", PAIR + '{"sent0": "a", "sent1": 3}\n', 2, "sent1 must be a string, got 3"),
    ("b.jsonl", PAIR + '{"sent0": "a", "sent1": "b", "label": 1}\n', 2, "unknown key 'label'"),
    ("b.jsonl", TRIPLE + PAIR, 2, "no hard_neg, but earlier rows have one; hard_neg must be on"),
    ("b.jsonl", PAIR + TRIPLE, 2, "a hard_neg, but earlier rows have none"),
]


@pytest.mark.parametrize(("name", "text", "line", "message"), BAD)
def test_format_errors_name_the_file_and_line(tmp_path, name, text, line, message):
    path = write(tmp_path / name, text)
    with pytest.raises(DataFormatError, match=rf"^train_file {path}:{line}: .*{message}") as err:
        load_triplets(str(path))
    assert "\n" not in str(err.value)


def test_bad_utf8_is_reported_as_the_sentence_reader_does(tmp_path):
    path = tmp_path / "u.csv"
    path.write_bytes(b"sent0,sent1\na,b\ncaf\xe9,x\n")
    with pytest.raises(
        DataFormatError, match=rf"train_file {path}:3: not valid UTF-8.*encoding_errors"
    ):
        load_triplets(str(path))
    assert load_triplets(str(path), errors="replace").triplets[1].sent0 == "caf\ufffd"


def test_auto_detection(tmp_path):
    sentences = write(tmp_path / "s.txt", "sent0,sent1\nplain text\n")
    headerless = write(tmp_path / "h.csv", "a man,a tall man\n")
    assert resolve_objective("auto", str(sentences)) == "unsupervised"
    assert resolve_objective("auto", "builtin:wiki_en") == "unsupervised"
    assert resolve_objective("unsupervised", str(headerless)) == "unsupervised"
    with pytest.raises(
        DataFormatError,
        match=r"h\.csv: a \.csv file under objective auto needs "
        r"sent0, sent1.*found: a man, a tall man.*set objective: unsupervised",
    ):
        resolve_objective("auto", str(headerless))
    with pytest.raises(
        DataFormatError, match=r"objective supervised needs a \.csv, \.tsv or \.jsonl"
    ):
        resolve_objective("supervised", str(sentences))
    with pytest.raises(DataFormatError, match=r"x\.jsonl:2: not valid JSON"):
        resolve_objective("auto", str(write(tmp_path / "x.jsonl", "\n{bad\n")))


# ---------------------------------------------------------------- the model and tiny runs


def triplet_csv(path: Path, n: int, hard_neg: bool = True) -> Path:
    """sent1 is sent0 in another place; hard_neg another subject doing something else."""
    sents = tiny.corpus(n, seed=3)
    rows = ["sent0,sent1,hard_neg" if hard_neg else "sent0,sent1"]
    for i, s in enumerate(sents):
        positive = s.replace(" .", " today .") if " today" not in s else s.replace(" today", "")
        row = [s, positive] + ([sents[(i + 7) % n]] if hard_neg else [])
        rows.append(",".join(row))
    return write(path, "\n".join(rows) + "\n")


def test_collator_tokenizes_each_sentence_once_and_edits_only_sent0(tiny_bert):
    tokenizer = load_tokenizer(str(tiny_bert))
    rows = [
        Triplet("a man is eating .", "a man eats .", "a cat sleeps ."),
        Triplet("x y", "x", "z"),
    ]
    batch = Collator(tokenizer, 32, "replace", 0.3, seed=0)(rows)
    assert batch["input_ids"].shape[0] == 2 and batch["pair_input_ids"].shape[0] == 4
    assert batch["aug_input_ids"].shape == batch["input_ids"].shape  # one view, of sent0
    alone = tokenizer("a cat sleeps .", return_tensors="pt")["input_ids"][0]
    assert batch["pair_input_ids"][2][: len(alone)].tolist() == alone.tolist()  # hard_neg rows


@pytest.mark.parametrize(
    ("pooling", "projector", "lambda_weight"),
    [("cls", "batchnorm", 0.0), ("mean", "tanh", 0.1), ("mean", "none", 0.0)],
)
def test_every_pooling_and_projector_trains_on_triplets(
    tiny_bert, tmp_path, pooling, projector, lambda_weight
):
    cfg = TrainConfig(
        model_name_or_path=str(tiny_bert), train_file="unused.csv", output_dir=str(tmp_path),
        pooling=pooling, projector=projector, lambda_weight=lambda_weight, augmentation="replace",
    )  # fmt: skip
    model, tokenizer = build_model(cfg)
    rows = [Triplet(s, s.upper(), s[::-1]) for s in tiny.corpus(6, seed=1)]
    batch = Collator(tokenizer, 32, "replace" if lambda_weight else "none", 0.3, seed=0)(rows)
    out = model.train()(batch)
    out["loss"].backward()
    assert math.isfinite(out["loss"].item())
    assert ("loss_rtd" in out) == (lambda_weight > 0)
    grad = model.encoder.embeddings.word_embeddings.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def tiny_run_cfg(tiny_bert, train_file: Path, out: Path, **kw) -> TrainConfig:
    values = dict(
        model_name_or_path=str(tiny_bert), train_file=str(train_file), output_dir=str(out),
        augmentation="none", lambda_weight=0.0, batch_size=8, learning_rate=1e-3, epochs=1,
        max_steps=6, eval_steps=3, save_steps=3, seed=0,
    )  # fmt: skip
    values.update(kw)
    return TrainConfig(**values)


@pytest.mark.slow
def test_hard_negative_run_end_to_end_with_rtd_on_sent0(tiny_bert, tmp_path):
    sts_dir = tiny.write_overlap_stsb(tmp_path / "sts", 40)
    data = triplet_csv(tmp_path / "triplets.csv", 64)
    out = tmp_path / "run"
    cfg = tiny_run_cfg(
        tiny_bert, data, out, eval_data_dir=str(sts_dir), augmentation="replace",
        lambda_weight=0.1,
    )  # fmt: skip
    summary = train(cfg)  # objective auto: the .csv header names sent0 and sent1
    assert summary.steps == 6
    trained = read_metrics(out, "train")
    assert len(trained) == 6
    assert all(math.isfinite(r["loss"]) and r["loss_rtd"] > 0 for r in trained)
    for folder in ("best", "last"):
        assert (out / folder / "model.safetensors").is_file(), folder
    assert json.loads((out / "best" / "metrics.json").read_text())["objective"] == "supervised"
    # the main job's table names what auto resolved to, not what the config says (auto),
    # and best/'s card uses the same words
    from diffcse_train.compare import Arm

    assert summary.objective == "supervised"
    assert Arm.of(cfg, summary).name == "supervised DiffCSE-replace"
    card = (out / "best" / "README.md").read_text(encoding="utf-8")
    assert "| objective | supervised DiffCSE-replace |" in card


@pytest.mark.slow
def test_positive_pairs_only_run(tiny_bert, tmp_path):
    data = triplet_csv(tmp_path / "pairs.csv", 40, hard_neg=False)
    summary = train(tiny_run_cfg(tiny_bert, data, tmp_path / "run", objective="supervised"))
    assert summary.steps == 5 and math.isfinite(summary.final_loss)  # 40 // 8 rows per epoch


def test_a_bad_row_stops_training_before_any_model_loads(tiny_bert, tmp_path):
    bad = write(tmp_path / "bad.jsonl", '{"sent0": "a", "sent1": "b"}\n{"sent0": "a"}\n')
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:2: no key 'sent1'"):
        train(tiny_run_cfg(tiny_bert, bad, tmp_path / "run"))
    assert not (tmp_path / "run" / "best").exists()


def test_fit_generator_on_a_triplet_file_is_refused(tiny_bert, tmp_path):
    data = triplet_csv(tmp_path / "t.csv", 16)
    cfg = tiny_run_cfg(
        tiny_bert, data, tmp_path / "run", augmentation="mlm", lambda_weight=0.1,
        generator_name_or_path=str(tmp_path / "gen"), fit_generator=True,
    )  # fmt: skip
    with pytest.raises(DiffcseError, match=r"fit_generator fits the generator on one sentence"):
        train(cfg)


# ---------------------------------------------------------------- the triplet builder


def test_builder_takes_positives_and_hard_negatives_from_train_splits_only(tmp_path):
    from benchmarks import supervised_data

    sick = tmp_path / "SICK"
    sick.mkdir()
    rows = [
        ("1", "a man plays", "a person plays", "4.5", "ENTAILMENT"),
        ("2", "a man plays", "nobody plays", "2.0", "CONTRADICTION"),
        ("3", "a dog runs", "an animal runs", "4.2", "ENTAILMENT"),
        ("4", "a cat sits", "a cat is sitting", "4.9", "NEUTRAL"),
    ]
    lines = ["\t".join(supervised_data.SICK_HEADER)] + ["\t".join(r) for r in rows]
    write(sick / "SICK_train.txt", "\n".join(lines) + "\n")
    write(sick / "SICK_trial.txt", "not read\n")
    stsb = tmp_path / "STSBenchmark"
    stsb.mkdir()
    pairs = [("4.5", "kids swim", "children swim"), ("0.5", "kids swim", "stocks fall"),
             ("2.0", "a car", "a truck")]  # fmt: skip
    write(stsb / "sts-train.csv", "".join(f"g\tf\t2012\t{i}\t{s}\t{a}\t{b}\n"
                                          for i, (s, a, b) in enumerate(pairs)))  # fmt: skip
    write(stsb / "sts-dev.csv", "not read\n")
    out = tmp_path / "t.csv"
    counts = supervised_data.build(tmp_path, out, seed=1)
    assert counts == {"sick_rows": 2, "sick_real_hard_neg": 1, "stsb_rows": 1,
                      "stsb_real_hard_neg": 1, "rows": 3}  # fmt: skip
    data = load_triplets(str(out))
    by_anchor = {t.sent0: t for t in data.triplets}
    assert by_anchor["a man plays"] == Triplet("a man plays", "a person plays", "nobody plays")
    assert by_anchor["kids swim"] == Triplet("kids swim", "children swim", "stocks fall")
    random_neg = by_anchor["a dog runs"].hard_neg
    assert random_neg not in ("a dog runs", "an animal runs")  # a random sentence of SICK
    supervised_data.build(tmp_path, out, seed=1, hard_neg=False)
    assert not load_triplets(str(out)).hard_negatives


# ---------------------------------------------------------------- DDP


@pytest.mark.slow  # torchrun, 2 processes (~20 s)
def test_one_ddp_step_on_triplets_equals_one_single_process_step(tiny_bert, tmp_path):
    """Each rank's positives and hard negatives are every rank's candidates (gather_negatives),
    so 2 processes of B rows take the step one process of 2B rows takes (float64, no dropout,
    SGD at lr 1: the update is the gradient). RTD on sent0 rides along at lambda 1."""
    import os
    import subprocess
    import sys
    from dataclasses import asdict

    from transformers import AutoModel, AutoTokenizer

    from tests.support.ddp_worker import build_trainer

    b, root = 4, Path(__file__).resolve().parents[2]
    bert = tmp_path / "bert"
    AutoModel.from_pretrained(
        tiny_bert, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    ).save_pretrained(bert)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(bert)
    data = triplet_csv(tmp_path / "t.csv", 16)
    rows = load_triplets(str(data)).triplets[: 2 * b]
    batch = Collator(load_tokenizer(str(bert)), 32, "replace", 0.3, seed=11)(rows)
    torch.save(batch, tmp_path / "batch.pt")
    cfg = tiny_run_cfg(
        bert, data, tmp_path / "ddp", batch_size=b, augmentation="replace", lambda_weight=1.0,
        temperature=0.5, max_grad_norm=0.0, max_steps=1, seed=3,
    )  # fmt: skip
    scenario = {"name": "sup", "config": asdict(cfg), "optimizer": "sgd"}
    spec = {"scenarios": [{**scenario, "batch": str(tmp_path / "batch.pt")}]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    worker = str(root / "tests" / "support" / "ddp_worker.py")
    proc = subprocess.run(
        [*cmd, worker, str(tmp_path / "spec.json")], cwd=root, env=env, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(tmp_path / "ddp" / "params.pt")

    single_cfg = tiny_run_cfg(
        bert, data, tmp_path / "single", batch_size=2 * b, augmentation="replace",
        lambda_weight=1.0, temperature=0.5, max_grad_norm=0.0, max_steps=1, seed=3,
    )  # fmt: skip
    trainer = build_trainer(single_cfg, "sgd")
    before = {k: v.clone() for k, v in trainer.model.trainable_state_dict().items()}
    trainer.train_step(batch)
    single = trainer.model.trainable_state_dict()
    moved = max((before[k].double() - single[k].double()).abs().max().item() for k in before)
    assert moved > 1e-4
    assert max((ddp[k].double() - single[k].double()).abs().max().item() for k in ddp) < 1e-6
