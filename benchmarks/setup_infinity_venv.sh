#!/usr/bin/env bash
# A separate venv with infinity-emb (its optimum/ONNX engine), the peer server serve.py can
# add as a contender (--infinity-venv), and MiniLM exported for it by optimum-cli.
#
# Why separate: infinity-emb's optimum engine needs optimum.onnxruntime (optimum-onnx 0.1.0),
# which requires transformers<4.58, while diffcse uses transformers 5.x. The same torch (CPU)
# and onnxruntime as diffcse; infinity-emb 0.0.78, the newest on PyPI.
#
# Usage: bash benchmarks/setup_infinity_venv.sh [VENV_DIR] [MODEL_DIR]
#        (default benchmarks/.venv-infinity and benchmarks/.cache/infinity-minilm)
# then:  .venv/bin/python -m benchmarks.serve --client wrk \
#          --infinity-venv benchmarks/.venv-infinity --infinity-model benchmarks/.cache/infinity-minilm
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-benchmarks/.venv-infinity}
MODEL=${2:-benchmarks/.cache/infinity-minilm}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off HF_HUB_OFFLINE=1
ORT_VERSION=$(.venv/bin/python -c "import onnxruntime; print(onnxruntime.__version__)" 2>/dev/null || echo 1.32.0)
SRC=$(.venv/bin/python -c "from benchmarks import benchlib; print(benchlib.minilm_dir())")
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q "onnxruntime==$ORT_VERSION" "transformers==4.57.6" \
  "optimum-onnx[onnxruntime]==0.1.0" "infinity-emb[server,optimum]==0.0.78"
rm -rf "$MODEL"
# model.onnx at the folder's top: infinity-emb 0.0.78 asks optimum for "onnx/model.onnx" when
# it sits in onnx/, and optimum 2.1 then matches file names only and finds nothing
"$VENV/bin/optimum-cli" export onnx --model "$SRC" --task feature-extraction "$MODEL"
cp -n "$SRC"/*.json "$SRC"/*.txt "$MODEL"/ 2>/dev/null || true
[ -d "$SRC/1_Pooling" ] && cp -r "$SRC/1_Pooling" "$MODEL"/
"$VENV/bin/python" -c "import infinity_emb, optimum.onnxruntime; print('infinity venv ready:', infinity_emb.__version__)"
