#!/usr/bin/env bash
# A separate venv for the sentence-transformers backend="onnx" contender of encode.py.
#
# Why separate: sentence-transformers' ONNX backend needs optimum.onnxruntime, which now
# lives in optimum-onnx; its only release (0.1.0) requires transformers<4.58, while diffcse
# uses transformers 5.x, and sentence-transformers 6.x requires transformers>=5. So this
# venv pins the newest compatible set: sentence-transformers 5.1.2 + transformers 4.57.6 +
# optimum-onnx 0.1.0 (optimum 2.1.x), with the same torch (CPU) and onnxruntime as diffcse.
#
# Usage: bash benchmarks/setup_st_onnx_venv.sh [VENV_DIR]   (default benchmarks/.venv-st-onnx)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-benchmarks/.venv-st-onnx}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
ORT_VERSION=$(.venv/bin/python -c "import onnxruntime; print(onnxruntime.__version__)" 2>/dev/null || echo 1.32.0)
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q "onnxruntime==$ORT_VERSION" "transformers==4.57.6" \
  "sentence-transformers==5.1.2" "optimum-onnx[onnxruntime]==0.1.0"
"$VENV/bin/python" -c "import optimum.onnxruntime, sentence_transformers, transformers, onnxruntime; print('st-onnx venv ready: sentence-transformers', sentence_transformers.__version__, 'transformers', transformers.__version__, 'onnxruntime', onnxruntime.__version__)"
