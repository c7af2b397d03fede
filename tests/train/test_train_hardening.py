"""diffcse-train, issues 23 (16: a full disk) and 24 (best/ has a model card)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402

from diffcse_train.cli import train_cmd  # noqa: E402
from tests.support import tiny  # noqa: E402


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


def card_row(card: str, key: str) -> str:
    """The value of the card's `| key | value |` table row."""
    rows = [line for line in card.splitlines() if line.startswith(f"| {key} | ")]
    assert len(rows) == 1, card
    return rows[0].removeprefix(f"| {key} | ").removesuffix(" |")


@pytest.mark.parametrize(
    ("rows", "keys", "expected"),
    [
        ("sentences", {"lambda_weight": 0.0, "augmentation": "none"}, "SimCSE"),
        ("sentences", {"lambda_weight": 0.1, "augmentation": "replace"}, "DiffCSE-replace"),
        ("pairs", {"lambda_weight": 0.0, "augmentation": "none"}, "supervised SimCSE"),
        ("pairs", {"lambda_weight": 0.1, "augmentation": "delete"}, "supervised DiffCSE-delete"),
    ],
    ids=["simcse", "diffcse", "supervised", "supervised_rtd"],
)
def test_card_names_the_objective_as_the_main_jobs_table_does(
    tiny_bert, tmp_path, rows, keys, expected
):
    """best/README.md and the main job's table (Arm.of: objective_name of the summary's
    resolved objective) must say the same thing for the same run."""
    from diffcse_train.compare import Arm
    from diffcse_train.config import TrainConfig
    from diffcse_train.trainer import train as train_run

    sents = tiny.corpus(32, seed=1)
    if rows == "pairs":  # objective auto resolves this header to supervised
        data = tmp_path / "pairs.csv"
        body = [f"{s},{s.replace(' .', ' today .')}" for s in sents]
        data.write_text("\n".join(["sent0,sent1", *body]) + "\n", encoding="utf-8")
    else:
        data = tmp_path / "train.txt"
        data.write_text("\n".join(sents) + "\n", encoding="utf-8")
    cfg = TrainConfig(
        model_name_or_path=str(tiny_bert), train_file=str(data), output_dir=str(tmp_path / "run"),
        batch_size=8, max_steps=1, save_steps=1, device="cpu", seed=0, **keys,
    )  # fmt: skip
    summary = train_run(cfg)
    card = (tmp_path / "run" / "best" / "README.md").read_text(encoding="utf-8")
    assert card_row(card, "objective") == Arm.of(cfg, summary).name == expected


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


# ---------------------------------------------------------------- a full disk (issue 23, 16)


@pytest.fixture
def full_disk(tmp_path):
    """A 96 KiB tmpfs: the run's small files fit, its weights do not. Skips where mounting
    is not permitted (not root, or a container without CAP_SYS_ADMIN)."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def _assert_one_sentence_naming_a_file(result, under: Path) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "SafetensorError" not in result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith(f"Error: {under}") and "could not be written" in line, line
    return line


def test_a_full_disk_names_the_file_that_could_not_be_written(
    tiny_bert, tmp_path, full_disk, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    result = train(write_config(tmp_path, str(tiny_bert), str(full_disk / "run")))
    line = _assert_one_sentence_naming_a_file(result, full_disk / "run")
    assert "No space left on device" in line or "free on its disk" in line, line


def test_a_failed_weights_write_is_one_sentence(tiny_bert, tmp_path, monkeypatch):
    """The same without a tmpfs: safetensors' own ENOSPC error, raised at the write."""
    from safetensors import SafetensorError

    from diffcse_train import checkpoint

    def no_space(tensors, filename, *args, **kwargs):  # as safetensors fails: a part written
        Path(filename).write_bytes(b"\0" * 16)
        raise SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    monkeypatch.setattr(checkpoint, "save_file", no_space)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    result = train(write_config(tmp_path, str(tiny_bert), str(out), projector="batchnorm"))
    line = _assert_one_sentence_naming_a_file(result, out)
    assert "model.safetensors" in line or "projector.safetensors" in line, line
    assert "No space left on device" in line, line
