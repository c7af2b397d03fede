"""diffcse-export, issues 23 and 24: numeric options are finite and in range before any work,
`builtin:` names are accepted as in training, and the model card names the source as the
user gave it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")

from click.testing import CliRunner  # noqa: E402

from diffcse_export.cli import main  # noqa: E402
from diffcse_export.validate import Thresholds  # noqa: E402


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize(
    ("option", "value", "phrase"),
    [
        ("--atol", "fp32=nan", "must be a finite number >= 0, got nan"),
        ("--atol", "fp32=inf", "must be a finite number >= 0, got inf"),
        ("--atol", "fp32=-1e-4", "must be a finite number >= 0"),
        ("--min-cosine", "int8=nan", "must be a finite number >= -1 and <= 1"),
        ("--min-cosine", "int8=1.5", "must be a finite number >= -1 and <= 1"),
        ("--max-sts-delta", "int8=-0.5", "must be a finite number >= 0"),
        ("--max-sts-delta", "fp32=nan", "must be a finite number >= 0"),
    ],
)
def test_threshold_options_are_finite_and_in_range(tmp_path, option, value, phrase):
    """Checked before the checkpoint is even looked at (it does not exist here)."""
    result = run(tmp_path / "no-such-checkpoint", tmp_path / "out", option, value)
    assert result.exit_code == 1, result.output
    line = result.output.strip().splitlines()[-1]
    assert "Traceback" not in result.output and f"{option} {value!r}" in line, line
    assert phrase in line and "no-such-checkpoint" not in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["-5", "0", "1"])
def test_max_seq_length_is_refused_before_loading(tmp_path, value):
    result = run(tmp_path / "no-such-checkpoint", tmp_path / "out", "--max-seq-length", value)
    assert result.exit_code == 2 and "--max-seq-length" in result.output, result.output
    assert "no-such-checkpoint" not in result.output


def test_thresholds_built_in_code_are_checked():
    from diffcse_export.errors import ExportError

    with pytest.raises(ExportError, match="'atol' must be a finite number >= 0, got nan"):
        Thresholds(atol=float("nan"))
    assert Thresholds(atol=None, min_cosine=-1.0).min_cosine == -1.0


# ---------------------------------------------------------------- builtin: and the card


@pytest.mark.slow
def test_export_accepts_builtin_names_and_the_card_names_them(minilm, tmp_path, monkeypatch):
    """Issue 24: `diffcse-export builtin:all-MiniLM-L6-v2 my-model` as the README says."""
    monkeypatch.chdir(tmp_path)
    result = run("builtin:all-MiniLM-L6-v2", "my-model", "--sts-data", tmp_path / "none")
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "my-model" / "diffcse.json").read_text())
    assert meta["source"] == "builtin:all-MiniLM-L6-v2"
    card = (tmp_path / "my-model" / "README.md").read_text()
    assert "`builtin:all-MiniLM-L6-v2`" in card and str(minilm) not in card
    assert 'base_model: "sentence-transformers/all-MiniLM-L6-v2"' in card


def test_unknown_builtin_name_is_one_sentence(tmp_path):
    result = run("builtin:no-such-model", tmp_path / "out")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "unknown built-in model 'builtin:no-such-model'" in result.output


def test_card_names_a_relative_source_as_given(tiny_bert, tmp_path, monkeypatch):
    """A relative checkpoint path is written as the user typed it, never made absolute."""
    import shutil

    shutil.copytree(tiny_bert, tmp_path / "models" / "enc")
    monkeypatch.chdir(tmp_path)
    result = run("models/enc", "out", "--sts-data", "none")
    assert result.exit_code == 0, result.output
    meta = json.loads(Path("out/diffcse.json").read_text())
    assert meta["source"] == "models/enc"
    card = Path("out/README.md").read_text()
    assert "`models/enc`" in card and str(tmp_path) not in card
