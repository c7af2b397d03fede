"""Issue 23, defect 18: on an install without an extra, `diffcse-train/-export/-serve --help`
print the one install line for that extra, not a ModuleNotFoundError traceback.

Each console script is run as pyproject.toml declares it, in a fresh interpreter where the
extra's third-party modules cannot be imported (a meta-path blocker stands in for the slim
venv; tests/support/slim_smoke.py checks the real slim install in CI)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
BLOCK = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Block())
module, _, attr = {target!r}.partition(":")
sys.argv = [{command!r}, *{args!r}]
getattr(__import__(module, fromlist=[attr]), attr)()
"""
EXTRAS = {
    "diffcse-train": ("train", ("torch", "transformers", "safetensors", "yaml")),
    "diffcse-export": ("export", ("torch", "transformers", "onnx", "onnxscript")),
    "diffcse-serve": ("serve", ("fastapi", "uvicorn", "pydantic", "prometheus_client")),
}


def run_script(command: str, blocked, args=("--help",)) -> subprocess.CompletedProcess:
    code = BLOCK.format(blocked=set(blocked), target=SCRIPTS[command], command=command, args=args)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


@pytest.mark.parametrize("command", sorted(EXTRAS))
@pytest.mark.parametrize("args", [("--help",), ()])
def test_help_without_the_extra_is_one_install_line(command, args):
    extra, blocked = EXTRAS[command]
    result = run_script(command, blocked, args)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == "", result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f'pip install "diffcse[{extra}]"' in lines[0], lines
    assert lines[0].startswith(f"Error: {command} needs"), lines


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(EXTRAS))
def test_help_with_the_extra_is_the_commands_help(command):
    pytest.importorskip(EXTRAS[command][1][0])
    result = run_script(command, ())
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage:") and command in result.stdout.splitlines()[0]
