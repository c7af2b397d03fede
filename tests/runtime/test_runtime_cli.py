"""diffcse-embed, diffcse-eval and diffcse-search, run as a user runs them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffcse_runtime import Encoder
from diffcse_runtime.cli import embed, evaluate_cmd, search
from tests.support.cli import run


@pytest.fixture(scope="module")
def encoder(tiny_model_dir):
    return Encoder(tiny_model_dir)


def test_embed_npy_rows_follow_lines(tiny_model_dir, encoder, tmp_path):
    lines = ["a man is playing a guitar .", "", "two dogs bought a red car ."]
    src = tmp_path / "in.txt"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out.npy"
    res = run(embed, [src, "--model", tiny_model_dir, "-o", out, "--batch-size", 2])
    assert res.exit_code == 0, res.output
    arr = np.load(out)
    assert arr.shape == (3, 32) and arr.dtype == np.float32
    np.testing.assert_allclose(arr, encoder.encode(lines), atol=1e-5)


def test_embed_jsonl_stdin_normalized(tiny_model_dir, encoder, tmp_path):
    out = tmp_path / "out.jsonl"
    res = run(
        embed, ["-", "--model", tiny_model_dir, "-o", out, "--normalize"], input="hello\nworld\n"
    )
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["text"] for r in rows] == ["hello", "world"]
    np.testing.assert_allclose(
        rows[1]["embedding"], encoder.encode("world", normalize=True), atol=1e-5
    )


def test_embed_empty_file_gives_zero_rows(tiny_model_dir, tmp_path):
    src = tmp_path / "empty.txt"
    src.write_bytes(b"")
    out = tmp_path / "out.npy"
    assert run(embed, [src, "-m", tiny_model_dir, "-o", out]).exit_code == 0
    assert np.load(out).shape == (0, 32)


def test_embed_streams_in_chunks(tiny_model_dir, encoder, tmp_path, monkeypatch):
    import diffcse_runtime.cli as cli

    monkeypatch.setattr(cli, "CHUNK_LINES", 3)
    lines = [f"sentence number {i} ." for i in range(10)]
    src = tmp_path / "in.txt"
    src.write_text("\n".join(lines), encoding="utf-8")  # no trailing newline
    out = tmp_path / "out.npy"
    assert run(embed, [src, "-m", tiny_model_dir, "-o", out]).exit_code == 0
    np.testing.assert_allclose(np.load(out), encoder.encode(lines), atol=1e-5)


def test_embed_bad_utf8_names_line_and_writes_nothing(tiny_model_dir, tmp_path):
    src = tmp_path / "bad.txt"
    src.write_bytes(b"fine\nalso fine\nbad \xff byte\n")
    out = tmp_path / "out.npy"
    res = run(embed, [src, "-m", tiny_model_dir, "-o", out])
    assert res.exit_code == 1
    assert f"{src}:3: not valid UTF-8" in res.output and "Traceback" not in res.output
    assert not out.exists() and list(tmp_path.iterdir()) == [src]
    res = run(embed, [src, "-m", tiny_model_dir, "-o", out, "--errors", "replace"])
    assert res.exit_code == 0 and np.load(out).shape == (3, 32)


def test_embed_missing_model_and_input_are_one_line(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("x\n")
    res = run(embed, [src, "-m", tmp_path / "nomodel", "-o", tmp_path / "o.npy"])
    assert res.exit_code == 1 and "no such folder" in res.output and "Traceback" not in res.output
    res = run(embed, [tmp_path / "missing.txt", "-m", tmp_path, "-o", tmp_path / "o.npy"])
    assert res.exit_code == 1 and "Error:" in res.output


def test_embed_rejects_unknown_extension(tiny_model_dir, tmp_path):
    res = run(embed, ["-", "-m", tiny_model_dir, "-o", tmp_path / "o.csv"], input="x\n")
    assert res.exit_code == 1 and "must end in .npy or .jsonl" in res.output


def test_eval_prints_table_and_json(tiny_model_dir, tmp_path):
    stsb = tmp_path / "STSBenchmark"
    stsb.mkdir()
    rows = [
        ("a man is playing a guitar .", "a man plays a guitar .", 4.8),
        ("a cat is eating an apple .", "the police bought a horse .", 0.2),
        ("two dogs carries the ball .", "two dogs plays with the ball .", 3.9),
    ]
    (stsb / "sts-test.csv").write_text(
        "".join(f"g\ts\t2012\t{i}\t{g}\t{a}\t{b}\n" for i, (a, b, g) in enumerate(rows))
    )
    out = tmp_path / "r.json"
    res = run(evaluate_cmd, ["-m", tiny_model_dir, "--data", tmp_path, "--json", out])
    assert res.exit_code == 0, res.output
    assert "STS-B" in res.output
    payload = json.loads(out.read_text())
    assert set(payload["tasks"]) == {"STSBenchmark"} and payload["complete"] is False


def test_search_build_then_query(tiny_model_dir, tmp_path):
    src = tmp_path / "docs.txt"
    src.write_text("a man is playing a guitar .\n\na cat is eating an apple .\n")
    idx = tmp_path / "idx"
    res = run(search, ["--index", idx, "--build", src, "-m", tiny_model_dir])
    assert res.exit_code == 0, res.output
    res = run(search, ["--index", idx, "-k", 1, "--json", "a cat is eating an apple ."])
    assert res.exit_code == 0, res.output
    hit = json.loads(res.output.strip())
    assert hit["text"] == "a cat is eating an apple ." and hit["rank"] == 1
    res = run(search, ["--index", idx, "--build", src, "-m", tiny_model_dir])
    assert res.exit_code == 1 and "already exists" in res.output


def test_search_refuses_another_model(tiny_model_dir, tmp_path):
    src = tmp_path / "docs.txt"
    src.write_text("one\ntwo\n")
    idx = tmp_path / "idx"
    run(search, ["--index", idx, "--build", src, "-m", tiny_model_dir])
    meta = json.loads((idx / "index.json").read_text())
    meta["onnx_sha256"] = "0" * 64  # as if another model had embedded the texts
    (idx / "index.json").write_text(json.dumps(meta))
    res = run(search, ["--index", idx, "-m", tiny_model_dir, "query"])
    assert res.exit_code == 1 and "not the model this index was built with" in res.output


def _stsb(folder, split: str, rows) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"sts-{split}.csv").write_text(
        "".join(f"g\ts\t2012\t{i}\t{g}\t{a}\t{b}\n" for i, (a, b, g) in enumerate(rows))
    )


ROWS = [
    ("a man is playing a guitar .", "a man plays a guitar .", 4.8),
    ("a cat is eating an apple .", "the police bought a horse .", 0.2),
    ("two dogs carries the ball .", "two dogs plays with the ball .", 3.9),
]


def test_eval_on_an_empty_file_is_an_error_and_writes_no_json(tiny_model_dir, tmp_path):
    _stsb(tmp_path / "STSBenchmark", "test", [])
    out = tmp_path / "r.json"
    res = run(evaluate_cmd, ["-m", tiny_model_dir, "--data", tmp_path, "--json", out])
    assert res.exit_code == 1
    assert f"{tmp_path / 'STSBenchmark' / 'sts-test.csv'}: 0 pairs" in res.output
    assert "nan" not in res.output.lower() and not out.exists()


def test_eval_defaults_to_the_split_the_data_has(tiny_model_dir, tmp_path):
    """Issue 24: data with train/dev only (what STS-B users have) is scored on dev, and the
    table and the JSON both say so."""
    _stsb(tmp_path / "STSBenchmark", "train", ROWS)
    _stsb(tmp_path / "STSBenchmark", "dev", ROWS)
    out = tmp_path / "r.json"
    res = run(evaluate_cmd, ["-m", tiny_model_dir, "--data", tmp_path, "--json", out])
    assert res.exit_code == 0, res.output
    assert "split dev" in res.output
    assert json.loads(out.read_text())["split"] == "dev"


def test_eval_json_is_strict_json(tiny_model_dir, tmp_path, monkeypatch):
    """Nothing we write is NaN/Infinity (not JSON): the writer refuses it outright."""
    import diffcse_runtime.sts as sts

    _stsb(tmp_path / "STSBenchmark", "test", ROWS)
    monkeypatch.setattr(sts, "spearman", lambda x, y: float("nan"))
    monkeypatch.setattr(sts, "_check_defined", lambda *a, **k: None)
    out = tmp_path / "r.json"
    res = run(evaluate_cmd, ["-m", tiny_model_dir, "--data", tmp_path, "--json", out])
    assert res.exit_code == 1 and not out.exists()
    assert "not a finite number" in res.output
