"""A cut is never silent (issue 23, defect 8): a text whose tail hides behind a whitespace
run longer than the characters read per text is reported as cut by `Encoder.encode` and by
every CLI's truncation report (diffcse-embed, diffcse-search, diffcse-eval)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffcse_runtime.truncation import CUT_MAX_CHARS_PER_TOKEN

HIDDEN = "stock markets crashed" + " " * 40000 + "because of the war in europe"
BIN = Path(sys.executable).parent


def _run(tool: str, *args) -> subprocess.CompletedProcess:
    cmd = [str(BIN / tool), *map(str, args)]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


def _says_cut(stderr: str) -> bool:
    return f"1 were cut at {CUT_MAX_CHARS_PER_TOKEN * 128} characters" in stderr


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "in.txt"
    path.write_text(f"a short line\n{HIDDEN}\n", encoding="utf-8")
    return path


def test_diffcse_embed_reports_the_cut(tiny_model_dir, corpus, tmp_path):
    r = _run("diffcse-embed", corpus, "-m", tiny_model_dir, "-o", tmp_path / "o.npy")
    assert r.returncode == 0, r.stderr
    assert _says_cut(r.stderr), r.stderr
    assert "1 of 2 texts were truncated" in r.stderr


def test_diffcse_search_reports_the_cut(tiny_model_dir, corpus, tmp_path):
    r = _run("diffcse-search", "--index", tmp_path / "idx", "--build", corpus, "-m", tiny_model_dir)
    assert r.returncode == 0, r.stderr
    assert _says_cut(r.stderr), r.stderr


def test_diffcse_eval_reports_the_cut(tiny_model_dir, tmp_path):
    stsb = tmp_path / "STSBenchmark"
    stsb.mkdir()
    rows = [("a cat sleeps .", HIDDEN, 1.0), ("a dog runs .", "a dog walks .", 4.0)]
    rows += [("two men sing .", "a car is red .", 0.0), ("she reads .", "she is reading .", 4.5)]
    (stsb / "sts-test.csv").write_text(
        "".join(f"g\ts\t2012\t{i}\t{g}\t{a}\t{b}\n" for i, (a, b, g) in enumerate(rows))
    )
    r = _run("diffcse-eval", "-m", tiny_model_dir, "--data", tmp_path)
    assert r.returncode == 0, r.stderr
    assert _says_cut(r.stderr + r.stdout), r.stderr
