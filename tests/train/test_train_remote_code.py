"""Issue 23 defect 5: a model folder whose config maps to custom code is refused, and no
code from it ever runs, even when the user answers transformers' prompt with "y"."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

from tests.support import tiny  # noqa: E402

MARKER_CODE = """
import pathlib
pathlib.Path({marker!r}).write_text("custom code ran")
from transformers import BertConfig, BertModel


class EvilConfig(BertConfig):
    model_type = "evilbert"


class EvilModel(BertModel):
    config_class = EvilConfig
"""


def custom_code_folder(tiny_bert: Path, dst: Path, marker: Path, where: str) -> Path:
    """tiny_bert whose `where` (config.json or tokenizer_config.json) has an auto_map to a
    .py file that writes `marker` when imported."""
    shutil.copytree(tiny_bert, dst)
    (dst / "evil.py").write_text(MARKER_CODE.format(marker=str(marker)))
    path = dst / where
    data = json.loads(path.read_text())
    if where == "config.json":
        data["model_type"] = "evilbert"  # unknown to transformers: only the custom code knows it
        data["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}
    else:
        data["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    path.write_text(json.dumps(data))
    return dst


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", f"diffcse_{args[0]}", *args[1:]],
        input="y\ny\ny\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def _assert_refused(result, folder: Path, marker: Path) -> None:
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert not marker.exists(), "code from the model folder ran"
    assert "Traceback" not in out and "[y/N]" not in out, out
    line = out.strip().splitlines()[-1]
    assert str(folder) in line and "auto_map" in line, line
    assert "evil" in line, line  # the entry that names the custom code


@pytest.mark.slow
@pytest.mark.parametrize("where", ["config.json", "tokenizer_config.json"])
def test_train_refuses_a_folder_with_custom_code_even_with_yes(tiny_bert, tmp_path, where):
    marker = tmp_path / "MARKER"
    folder = custom_code_folder(tiny_bert, tmp_path / "model", marker, where)
    corpus = tmp_path / "train.txt"
    corpus.write_text("\n".join(tiny.corpus(32, seed=1)) + "\n")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"model_name_or_path: {folder}\ntrain_file: {corpus}\noutput_dir: {tmp_path / 'out'}\n"
        "lambda_weight: 0\naugmentation: none\nbatch_size: 8\nmax_steps: 1\n"
    )
    result = _run(["train", "--config", str(cfg), "--quiet"], tmp_path)
    _assert_refused(result, folder, marker)


@pytest.mark.slow
def test_export_refuses_a_folder_with_custom_code_even_with_yes(tiny_bert, tmp_path):
    marker = tmp_path / "MARKER"
    folder = custom_code_folder(tiny_bert, tmp_path / "model", marker, "config.json")
    result = _run(["export", str(folder), str(tmp_path / "onnx")], tmp_path)
    _assert_refused(result, folder, marker)
    assert not (tmp_path / "onnx").exists()


def test_fit_generator_refuses_a_folder_with_custom_code(tiny_bert, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from diffcse_train.cli import fit_generator_cmd

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    marker = tmp_path / "MARKER"
    folder = custom_code_folder(tiny_bert, tmp_path / "model", marker, "config.json")
    corpus = tmp_path / "train.txt"
    corpus.write_text("\n".join(tiny.corpus(64, seed=1)) + "\n")
    args = ["--encoder", str(folder), "--corpus", str(corpus), "--out", str(tmp_path / "g")]
    result = CliRunner().invoke(fit_generator_cmd, [*args, "--quiet"], input="y\ny\n")
    assert result.exit_code == 1, result.output
    assert not marker.exists(), "code from the model folder ran"
    assert str(folder) in result.output and "auto_map" in result.output


def _loading_calls(path: Path) -> list[ast.Call]:
    """Every `X.from_pretrained(...)` call in the module's code (not its docstrings)."""
    tree = ast.parse(path.read_text())
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "from_pretrained"
    ]


def test_every_from_pretrained_call_passes_trust_remote_code_false():
    """A source-level guard: each transformers loading call in train/export says False
    itself, so a hub id (not on disk to check first) cannot prompt or run code either."""
    root = Path(__file__).resolve().parents[2]
    calls = [
        (path, call)
        for package in ("diffcse_train", "diffcse_export")
        for path in sorted((root / package).rglob("*.py"))
        for call in _loading_calls(path)
    ]
    assert len(calls) >= 8, calls
    missing = [
        f"{path.name}:{call.lineno}"
        for path, call in calls
        if not any(
            k.arg == "trust_remote_code" and getattr(k.value, "value", None) is False
            for k in call.keywords
        )
    ]
    assert not missing, missing
