#!/usr/bin/env bash
# A separate venv for the sentence-transformers contenders of benchmarks.encode:
# st-torch, st-onnx, st-onnx-int8, st-openvino and st-openvino-int8.
#
# Why separate: sentence-transformers' ONNX and OpenVINO backends need optimum-onnx and
# optimum-intel, whose releases require transformers<4.58, while diffcse uses transformers 5.x.
# These versions install together from PyPI: sentence-transformers 5.1.2, transformers 4.57.6,
# optimum-onnx 0.1.0, optimum-intel 1.27.0, openvino 2026.4.1 and nncf 3.4.0, with the same
# CPU torch and onnxruntime as diffcse.
#
# Usage: bash benchmarks/setup_st_venv.sh [VENV_DIR]   (default benchmarks/.venv-st)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-benchmarks/.venv-st}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
ORT_VERSION=$(.venv/bin/python -c "import onnxruntime; print(onnxruntime.__version__)" 2>/dev/null || echo 1.32.0)
python3 -m venv "$VENV"
# the CPU build of torch first: without it pip pulls a CUDA build (~3 GB of nvidia wheels)
"$VENV/bin/pip" install -q torch==2.13.0 --extra-index-url https://download.pytorch.org/whl/cpu
"$VENV/bin/pip" install -q "onnxruntime==$ORT_VERSION" "transformers==4.57.6" \
  "sentence-transformers==5.1.2" "optimum-onnx[onnxruntime]==0.1.0" \
  "optimum-intel==1.27.0" "openvino==2026.4.1" "nncf==3.4.0"
"$VENV/bin/python" - <<'PY'
import nncf, onnxruntime, openvino, optimum.intel, optimum.onnxruntime, sentence_transformers, transformers
print("st venv ready: sentence-transformers", sentence_transformers.__version__,
      "transformers", transformers.__version__, "onnxruntime", onnxruntime.__version__,
      "openvino", openvino.__version__, "nncf", nncf.__version__)
PY
