"""Only the base dependencies are computed here; everything else is in pyproject.toml.

pip cannot drop a base dependency for an extra (a `; extra != "gpu"` marker is evaluated
with no extra for the base requirements, so the CPU wheel comes anyway), and onnxruntime
and onnxruntime-gpu install the same `onnxruntime` package: whichever lands last wins. So
the onnxruntime build is chosen when the package is built, by DIFFCSE_ONNXRUNTIME:

    onnxruntime      (default) the CPU wheel
    onnxruntime-gpu  the CUDA build; the CPU wheel is never requested
    none             bring your own build (onnxruntime-openvino, -directml, a local wheel)

e.g. `DIFFCSE_ONNXRUNTIME=onnxruntime-gpu pip install ".[serve]"` (README: "GPU install").
"""

import os

from setuptools import setup

BASE = ["numpy>=1.24", "tokenizers>=0.15", "click>=8.1", "tqdm>=4.64"]
ONNXRUNTIME = {"onnxruntime": "onnxruntime>=1.17", "onnxruntime-gpu": "onnxruntime-gpu>=1.17"}

choice = (os.environ.get("DIFFCSE_ONNXRUNTIME") or "onnxruntime").strip().lower()
if choice not in (*ONNXRUNTIME, "none"):
    raise SystemExit(
        f"DIFFCSE_ONNXRUNTIME={choice!r}: expected onnxruntime, onnxruntime-gpu or none"
    )
setup(install_requires=BASE + ([ONNXRUNTIME[choice]] if choice in ONNXRUNTIME else []))
