# Sourced by the device scripts (quality.sh, demo_grid.sh): the part every call shares.
# It also widens the carried fp16 MiniLM into /tmp/minilm. The caller sets BUDGET (seconds)
# and THREADS (OMP threads per training process) first.
# Everything is written under $OUT=/tmp/gpu-results and packed into the real $OUT (or
# ./gpu-out) as results.tar.gz plus the JSON files at exit: a device call returns 8 files.
RES=/tmp/gpu-results; rm -rf "$RES"; mkdir -p "$RES"
DEST=${OUT:-$PWD/gpu-out}; mkdir -p "$DEST"
trap 'tar -czf "$DEST/results.tar.gz" -C "$RES" . ; cp "$RES"/*.json "$DEST"/ 2>/dev/null' EXIT
OUT=$RES
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=$THREADS
PY=${PY:-python3}; DEV=${DEV:-cuda}
START=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
# the checkout as installed packages, without pip
export PYTHONPATH="$PWD"
CORPUS=.gpu/wiki_en.txt
$PY benchmarks/gpu/pack.py unpack .gpu /tmp/minilm || exit 1
