"""diffcse-train, issues 23 (16: a full disk) and 24 (best/ has a model card)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import tiny  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from diffcse_train.cli import train_cmd  # noqa: E402


def write_config(folder: Path, model: str, out: str, **extra) -> Path:
    corpus = folder / "train.txt"
    corpus.write_text("\n".join(tiny.corpus(64, seed=1)) + "\n", encoding="utf-8")
    keys = {
        "model_name_or_path": model, "train_file": "train.txt", "output_dir": out,
        "lambda_weight": 0, "augmentation": "none", "batch_size": 16, "max_steps": 1,
        "save_steps": 1, "device": "cpu", **extra,
    }  # fmt: skip
    path = folder / "cfg.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in keys.items()), encoding="utf-8")
    return path


def train(config: Path):
    return CliRunner().invoke(train_cmd, ["--config", str(config), "--quiet"])


def test_best_has_a_model_card_naming_the_source_as_given(tiny_bert, tmp_path, monkeypatch):
    shutil.copytree(tiny_bert, tmp_path / "models" / "enc")
    monkeypatch.chdir(tmp_path)
    result = train(write_config(tmp_path, "models/enc", "runs/demo"))
    assert result.exit_code == 0, result.output
    card = (tmp_path / "runs/demo/best/README.md").read_text(encoding="utf-8")
    assert card.startswith("---\nlibrary_name: sentence-transformers\n")
    assert "| trained from | `models/enc` |" in card and "| training text | `train.txt` |" in card
    assert str(tmp_path) not in card  # no absolute path of the training machine
    assert "base_model" not in card  # a local folder is no hub id
    assert "model_name_or_path: models/enc" in card  # the full config


@pytest.mark.slow
def test_export_of_a_run_names_its_best_folder_as_given(tiny_bert, tmp_path, monkeypatch):
    """`diffcse-export runs/demo m` reads runs/demo/best and says so, relative as given."""
    import json

    from diffcse_export.cli import main as export_main

    shutil.copytree(tiny_bert, tmp_path / "enc")
    monkeypatch.chdir(tmp_path)
    assert train(write_config(tmp_path, "enc", "runs/demo")).exit_code == 0
    result = CliRunner().invoke(export_main, ["runs/demo", "m", "--sts-data", "none"])
    assert result.exit_code == 0, result.output
    assert json.loads(Path("m/diffcse.json").read_text())["source"] == "runs/demo/best"
    assert "checkpoint `runs/demo/best`" in Path("m/README.md").read_text()
