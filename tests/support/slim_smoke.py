"""Prove the base install is slim: `build DIR` (full env) makes a tiny model directory,
`check DIR` (base-only env) asserts torch/transformers are absent, encodes with the
Python API and with diffcse-embed, and checks that each command of an extra answers
`--help` with the one line saying which extra to install (no traceback).

From the repository root (as .ci/run does):

    python -m tests.support.slim_smoke build DIR        # full env: needs the tests package
    SLIM_VENV/bin/python tests/support/slim_smoke.py check DIR

`check` runs by path, not with -m, so that the repository root is not on sys.path and
`diffcse_runtime` is the installed copy under test, not the source tree."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path


def build(out: Path) -> None:
    from tests.support.tiny import export_model_dir, make_encoder

    with tempfile.TemporaryDirectory() as tmp:
        export_model_dir(make_encoder(Path(tmp) / "bert"), out)


def check(model_dir: Path) -> None:
    for name in ("torch", "transformers"):
        assert importlib.util.find_spec(name) is None, f"{name} is importable in the slim env"
    import numpy as np

    from diffcse_runtime import Encoder

    emb = Encoder(model_dir).encode(["a man is playing a guitar .", ""])
    assert emb.shape == (2, Encoder(model_dir).embedding_dim) and np.isfinite(emb).all()
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "in.txt", Path(tmp) / "out.npy"
        src.write_text("hello\nworld\n")
        embed = Path(sys.executable).parent / "diffcse-embed"
        subprocess.run(
            [str(embed), str(src), "--model", str(model_dir), "-o", str(out)], check=True
        )
        assert np.load(out).shape == (2, emb.shape[1])
    check_extras_hints()
    print(f"slim runtime OK: no torch, no transformers, embeddings {emb.shape}")


EXTRA_COMMANDS = {"diffcse-train": "train", "diffcse-export": "export", "diffcse-serve": "serve"}


def check_extras_hints() -> None:
    """Without its extra, a command's --help is one line naming `pip install "diffcse[X]"`."""
    bin_dir = Path(sys.executable).parent
    for command, extra in EXTRA_COMMANDS.items():
        result = subprocess.run(
            [str(bin_dir / command), "--help"], capture_output=True, text=True, timeout=60
        )
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1, (command, result.returncode, result.stderr)
        assert "Traceback" not in result.stderr and len(lines) == 1, (command, result.stderr)
        assert f'pip install "diffcse[{extra}]"' in lines[0], (command, lines[0])
    ray = subprocess.run(
        [str(bin_dir / "diffcse-embed-ray"), "--help"], capture_output=True, text=True, timeout=60
    )
    assert ray.returncode == 0 and "Usage:" in ray.stdout, ray.stderr  # its hint is at run time


if __name__ == "__main__":
    {"build": build, "check": check}[sys.argv[1]](Path(sys.argv[2]))
