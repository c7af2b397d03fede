#!/bin/bash
# One device call: the serving benchmark on the device machine's CPU cores (16 there), with
# what benchmarks/gpu/serve_pack.py packed into .serve (carry it). Results come back as
# results.tar.gz plus the JSON/text files. QUICK=1: a short run to check the script here.
set -u
RES=/tmp/serve-results; rm -rf "$RES"; mkdir -p "$RES"
DEST=${OUT:-$PWD/gpu-out}; mkdir -p "$DEST"
trap 'cp /tmp/serve-[0-9]*.log "$RES"/ 2>/dev/null; tar -czf "$DEST/results.tar.gz" -C "$RES" . ; cp "$RES"/*.json "$RES"/*.txt "$DEST"/ 2>/dev/null' EXIT
PY=${PY:-python3}
W=/tmp/serve-wheels
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD:$W" PATH="$PWD/.serve/bin:$PATH"
export LD_LIBRARY_PATH="$PWD/.serve/lib:${LD_LIBRARY_PATH:-}"
$PY -c "import fastapi, uvicorn" 2>/dev/null ||
  $PY -m pip install --quiet --no-index --no-deps --target "$W" .serve/wheels/*.whl || exit 1
$PY benchmarks/gpu/serve_pack.py unpack .serve /tmp/minilm-onnx || exit 1
{ nproc; lscpu; uptime; } > "$RES/machine.txt" 2>&1
grep -o -w -E 'avx2|avx512f|avx512_vnni|amx_tile' /proc/cpuinfo | sort | uniq -c >> "$RES/machine.txt"
CLIENT=wrk; wrk --version >/dev/null 2>&1 || [ $? -eq 1 ] || CLIENT=httpx  # wrk -v exits 1
echo "client: $CLIENT" | tee -a "$RES/machine.txt"
ROUNDS=${ROUNDS:-3}; SECS=${SECS:-4}; LROUNDS=2; LSECS=6  # LAYOUTS=none: serve.py only
[ "${QUICK:-0}" = 1 ] && { ROUNDS=1; SECS=1; LROUNDS=1; LSECS=1; }
timeout 260 $PY -m benchmarks.serve --model /tmp/minilm-onnx --data .serve/sts --client $CLIENT \
  --shapes 1-sentence --rounds $ROUNDS --seconds $SECS --out "$RES/serve-cores.json" 2>&1 | tail -12
C=$(nproc)
[ "${LAYOUTS:-}" = none ] && exit 0
timeout 220 $PY -m benchmarks.serve_layout --model /tmp/minilm-onnx --data .serve/sts \
  --layouts "${LAYOUTS:-1x$C,2x$((C / 2)),4x$((C / 4)),8x$((C / 8))}" --rounds $LROUNDS --seconds $LSECS \
  --out "$RES/serve-layout-cores.json" 2>&1 | tail -8
