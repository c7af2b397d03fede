"""STS loaders and scoring: tie-aware Spearman, the SentEval layouts, the "all" setting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffcse_runtime.errors import DataFormatError, DiffcseError
from diffcse_runtime.sts import (
    evaluate,
    format_table,
    load_task,
    rankdata,
    score_pairs,
    spearman,
)

scipy_stats = pytest.importorskip("scipy.stats")


def test_rankdata_averages_ties():
    assert rankdata(np.array([10, 20, 20, 5])).tolist() == [2.0, 3.5, 3.5, 1.0]


@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")
@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 5), st.floats(-1, 1, allow_nan=False)), min_size=3, max_size=60
    )
)
def test_spearman_matches_scipy_with_ties(pairs):
    x = np.array([p[0] for p in pairs], dtype=float)
    y = np.array([p[1] for p in pairs])
    ours = spearman(x, y)
    ref = scipy_stats.spearmanr(x, y).statistic
    if np.isnan(ref):
        assert np.isnan(ours)
    else:
        assert abs(ours - ref) < 1e-9


def test_spearman_of_constant_is_nan():
    assert np.isnan(spearman(np.ones(5), np.arange(5.0)))


def _write(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture
def senteval(tmp_path) -> Path:
    """A miniature SentEval tree: STS12 (two subsets, a blank gold line), STS-B, SICK."""
    root = tmp_path / "downstream"
    sts12 = root / "STS" / "STS12-en-test"
    subsets = ["MSRpar", "MSRvid", "SMTeuroparl", "surprise.OnWN", "surprise.SMTnews"]
    for j, name in enumerate(subsets):
        _write(sts12 / f"STS.input.{name}.txt", [f"a{j}{i}\tb{j}{i}" for i in range(4)])
        _write(sts12 / f"STS.gs.{name}.txt", ["1", "", "3", str(4 + j % 2)])
    stsb = root / "STS" / "STSBenchmark"
    for split in ("train", "dev", "test"):
        _write(
            stsb / f"sts-{split}.csv",
            [f"g\ts\t2012\t{i:04d}\t{i}.0\tleft {i}\tright {i}" for i in range(5)],
        )
    rows = ["pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment"]
    _write(
        root / "SICK" / "SICK_test_annotated.txt",
        rows + [f"{i}\tx {i}\ty {i}\t{1 + i}\tNEUTRAL" for i in range(4)],
    )
    return root


def test_sts12_drops_blank_gold_and_keeps_subsets(senteval):
    pairs = load_task(senteval, "STS12")
    assert len(pairs) == 15  # 5 subsets x 3 gold lines
    assert "a01" not in pairs.sents1 and pairs.sents1[:2] == ["a00", "a02"]
    assert pairs.subset.count("MSRvid") == 3


def test_stsb_and_sick_columns(senteval):
    stsb = load_task(senteval, "STSBenchmark", "dev")
    assert stsb.sents1[2] == "left 2" and stsb.sents2[2] == "right 2" and stsb.gold[2] == 2.0
    sick = load_task(senteval, "SICK-R")
    assert sick.sents1[0] == "x 0" and sick.gold.tolist() == [1, 2, 3, 4]


def test_all_setting_differs_from_wmean(senteval):
    # An encoder whose similarity orders pairs well inside each subset but not across them.
    def encode(texts):
        out = []
        for t in texts:
            subset, i = int(t[1]), int(t[2])
            angle = (i / 10 + subset) if t[0] == "a" else 0.0
            out.append([np.cos(angle), np.sin(angle)])
        return np.array(out)

    score = score_pairs(encode, load_task(senteval, "STS12"), "STS12")
    assert score.wmean is not None and len(score.subsets) == 5
    concat = spearman(
        np.array([np.cos(int(s[2]) / 10 + int(s[1])) for s in load_task(senteval, "STS12").sents1]),
        load_task(senteval, "STS12").gold,
    )
    assert score.spearman == pytest.approx(100 * concat)
    assert score.spearman != pytest.approx(score.wmean)


def test_evaluate_defaults_to_present_tasks_and_formats(senteval):
    rng = np.random.default_rng(0)
    result = evaluate(lambda t: rng.normal(size=(len(t), 8)), senteval)
    assert list(result.scores) == ["STS12", "STSBenchmark", "SICKRelatedness"]
    table = format_table(result)
    assert "STS-B" in table and "Avg. over 3 of 7 tasks" in table


def test_bad_rows_name_file_and_line(senteval):
    bad = senteval / "STS" / "STSBenchmark" / "sts-dev.csv"
    bad.write_text("g\ts\t2012\t0001\t1.0\tone\ttwo\ng\ts\t2012\t0002\tnot-a-number\tx\ty\n")
    with pytest.raises(DataFormatError, match=r"sts-dev.csv:2: gold score 'not-a-number'"):
        load_task(senteval, "STSBenchmark", "dev")
    bad.write_text("only\tthree\tcols\n")
    with pytest.raises(DataFormatError, match=r"sts-dev.csv:1: expected at least 7"):
        load_task(senteval, "STSBenchmark", "dev")


def test_missing_task_and_unknown_names(senteval, tmp_path):
    with pytest.raises(DataFormatError, match="no STS13-en-test folder"):
        load_task(senteval, "STS13")
    with pytest.raises(DiffcseError, match="unknown task"):
        load_task(senteval, "STS99")
    with pytest.raises(DiffcseError, match="only a test split"):
        load_task(senteval, "STS12", "dev")
    with pytest.raises(DataFormatError, match="no STS task data"):
        evaluate(lambda t: np.ones((len(t), 2)), tmp_path / "empty")


def test_real_stsb_and_sick_files_load(sts_data):
    dev = load_task(sts_data, "STSBenchmark", "dev")
    assert len(dev) == 1500 and dev.gold.min() >= 0 and dev.gold.max() <= 5
    train = load_task(sts_data, "STSBenchmark", "train")
    assert len(train) == 5749
    trial = load_task(sts_data, "SICKRelatedness", "dev")
    assert len(trial) == 500 and trial.gold.min() >= 1 and trial.gold.max() <= 5
    # A bag-of-words encoder is a real, weak baseline: clearly positive on STS-B dev.
    vocab: dict[str, int] = {}

    def bow(texts):
        out = np.zeros((len(texts), 20000))
        for r, t in enumerate(texts):
            for w in t.lower().split():
                out[r, vocab.setdefault(w, len(vocab)) % 20000] += 1
        return out

    score = evaluate(bow, sts_data, ["STSBenchmark"], "dev").scores["STSBenchmark"].spearman
    assert 40 < score < 80


# ---------------------------------------------------------------- issue 23 (13), issue 24


def _encode_by_hash(texts):
    rng = {t: np.random.default_rng(abs(hash(t)) % 2**32).normal(size=8) for t in texts}
    return np.stack([rng[t] for t in texts])


@pytest.mark.parametrize(
    "lines, why",
    [
        ([], "0 pairs, at least 2 are needed"),
        (["g\ts\t2012\t0001\t3.0\tone\ttwo"], "1 pair, at least 2 are needed"),
        ([f"g\ts\t2012\t{i:04d}\t2.5\tl{i}\tr{i}" for i in range(4)], "every gold score is 2.5"),
    ],
)
def test_a_task_without_a_defined_correlation_is_an_error_naming_the_file(senteval, lines, why):
    path = senteval / "STS" / "STSBenchmark" / "sts-dev.csv"
    path.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(DataFormatError, match=rf"^{path}: .*{why}"):
        evaluate(_encode_by_hash, senteval, ["STSBenchmark"], "dev")


def test_a_constant_sts12_subset_names_its_gold_file(senteval):
    gs = senteval / "STS" / "STS12-en-test" / "STS.gs.MSRvid.txt"
    gs.write_text("2\n2\n\n2\n")
    with pytest.raises(DataFormatError, match=rf"^{gs}: every gold score is 2"):
        evaluate(_encode_by_hash, senteval, ["STS12"])


def test_a_model_giving_every_pair_the_same_similarity_is_an_error(senteval):
    with pytest.raises(DiffcseError, match="same similarity to every pair"):
        evaluate(lambda t: np.ones((len(t), 4)), senteval, ["STSBenchmark"], "dev")


def test_auto_split_prefers_test_then_dev(senteval, tmp_path):
    from diffcse_runtime.sts import resolve_split

    assert resolve_split(senteval, None, "auto") == "test"
    only_dev = tmp_path / "d" / "STSBenchmark"
    _write(only_dev / "sts-dev.csv", ["g\ts\t2012\t0\t1.0\ta\tb", "g\ts\t2012\t1\t2.0\tc\td"])
    _write(only_dev / "sts-train.csv", ["g\ts\t2012\t0\t1.0\ta\tb", "g\ts\t2012\t1\t2.0\tc\td"])
    assert resolve_split(tmp_path / "d", None, "auto") == "dev"
    result = evaluate(_encode_by_hash, tmp_path / "d", None, "auto")
    assert result.split == "dev" and result.to_json()["split"] == "dev"
    assert "split dev" in format_table(result)


def test_no_task_data_says_which_splits_exist_and_where_data_comes_from(tmp_path):
    only_train = tmp_path / "d" / "STSBenchmark"
    _write(only_train / "sts-train.csv", ["g\ts\t2012\t0\t1.0\ta\tb"])
    with pytest.raises(DataFormatError) as info:
        evaluate(_encode_by_hash, tmp_path / "d", None, "test")
    msg = str(info.value)
    assert "no STS task data found for split 'test'" in msg
    assert "found: train (STSBenchmark)" in msg and "SentEval" in msg
    _write(only_train / "sts-dev.csv", ["g\ts\t2012\t0\t1.0\ta\tb"])
    with pytest.raises(DataFormatError, match="pass --split dev, or get the data"):
        evaluate(_encode_by_hash, tmp_path / "d", None, "test")
    with pytest.raises(DataFormatError, match="found: nothing"):
        evaluate(_encode_by_hash, tmp_path / "empty", None, "auto")
