"""The GPU install path: built with DIFFCSE_ONNXRUNTIME=onnxruntime-gpu, the package's own
metadata requires onnxruntime-gpu and not the CPU wheel that would overwrite it (pip reads
the metadata setup.py produces; no index is contacted: --no-deps, --no-build-isolation)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # pip resolves the package in subprocesses

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("diffcse_runtime", "diffcse_train", "diffcse_export")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A copy of what a build reads, so no build output lands in the working tree."""
    if shutil.which("pip", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("pip is not installed beside this interpreter")
    dst = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, dst / name)
    for name in PACKAGES:
        shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def build_metadata(source: Path, flavour: str, tmp_path: Path) -> subprocess.CompletedProcess:
    report = tmp_path / "report.json"
    pip = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--quiet"]
    cmd = pip + ["--no-build-isolation", "--ignore-installed", "--report", str(report), str(source)]
    env = {**os.environ, "DIFFCSE_ONNXRUNTIME": flavour, "PIP_NO_INDEX": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def base_requirements(tmp_path: Path) -> list[str]:
    (item,) = json.loads((tmp_path / "report.json").read_text())["install"]
    return [r for r in item["metadata"]["requires_dist"] if "extra ==" not in r]


def test_gpu_flavour_never_requires_the_cpu_wheel(source, tmp_path):
    done = build_metadata(source, "onnxruntime-gpu", tmp_path)
    assert done.returncode == 0, done.stderr
    base = base_requirements(tmp_path)
    assert "onnxruntime-gpu>=1.17" in base
    assert not [r for r in base if r.startswith("onnxruntime") and "gpu" not in r]
    assert {"numpy>=1.24", "tokenizers>=0.15", "click>=8.1", "tqdm>=4.64"} <= set(base)


def test_an_unknown_flavour_is_refused_by_name(source, tmp_path):
    done = build_metadata(source, "onnxruntime-gpuu", tmp_path)
    assert done.returncode != 0
    assert "DIFFCSE_ONNXRUNTIME='onnxruntime-gpuu': expected onnxruntime" in done.stderr
