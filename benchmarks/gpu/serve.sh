#!/usr/bin/env bash
# The serving benchmark on this machine's CPU cores (many, on a GPU machine): benchmarks.serve
# at c=1/8/64, then benchmarks.serve_layout over workers x threads layouts that fill the cores.
# Run from the repository root in a venv with diffcse[serve] (wrk on PATH, else the httpx
# client): `bash benchmarks/gpu/serve.sh`. Settings (environment, all optional): PY (default
# python), OUT (default ./gpu-out), MODEL (an exported model directory; default the cached
# MiniLM export), STS (default ../shared/data/sts), ROUNDS/SECS, LAYOUTS (WORKERSxTHREADS,...;
# none: serve.py only), QUICK=1 (a short run to check the script), PACKED (a folder made by
# transfer/serve_pack.py, for a machine reached through a size-limited transfer:
# transfer/serve_unpack.sh).
set -u
[ -f benchmarks/__init__.py ] || { echo "run this from the repository root" >&2; exit 1; }
if [ -n "${PACKED:-}" ]; then
  source benchmarks/gpu/transfer/serve_unpack.sh || exit 1
fi
PY=${PY:-python}; OUT=${OUT:-gpu-out}; STS=${STS:-../shared/data/sts}
MODEL_OPT=(); [ -n "${MODEL:-}" ] && MODEL_OPT=(--model "$MODEL")
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{ nproc; lscpu; uptime; } > "$OUT/machine.txt" 2>&1
grep -o -w -E 'avx2|avx512f|avx512_vnni|amx_tile' /proc/cpuinfo | sort | uniq -c >> "$OUT/machine.txt"
CLIENT=wrk; wrk --version >/dev/null 2>&1 || [ $? -eq 1 ] || CLIENT=httpx  # wrk -v exits 1
echo "client: $CLIENT" | tee -a "$OUT/machine.txt"
ROUNDS=${ROUNDS:-3}; SECS=${SECS:-4}; LROUNDS=2; LSECS=6
[ "${QUICK:-0}" = 1 ] && { ROUNDS=1; SECS=1; LROUNDS=1; LSECS=1; }
timeout 260 $PY -m benchmarks.serve "${MODEL_OPT[@]}" --data "$STS" --client $CLIENT \
  --shapes 1-sentence --rounds $ROUNDS --seconds $SECS --out "$OUT/serve-cores.json" 2>&1 | tail -12
C=$(nproc)
[ "${LAYOUTS:-}" = none ] && exit 0
timeout 220 $PY -m benchmarks.serve_layout "${MODEL_OPT[@]}" --data "$STS" \
  --layouts "${LAYOUTS:-1x$C,2x$((C / 2)),4x$((C / 4)),8x$((C / 8))}" --rounds $LROUNDS --seconds $LSECS \
  --out "$OUT/serve-layout-cores.json" 2>&1 | tail -8
