"""The runtime stays torch-free: importing and using it loads no training library."""

from __future__ import annotations

import subprocess
import sys


def test_runtime_import_loads_no_torch(tiny_model_dir):
    code = (
        "import sys, diffcse_runtime, diffcse_runtime.cli, diffcse_runtime.retrieval\n"
        f"diffcse_runtime.Encoder({str(tiny_model_dir)!r}).encode(['hello'])\n"
        "bad = sorted(m for m in ('torch', 'transformers', 'onnx', 'scipy') if m in sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
