# Sourced by the GPU scripts (quality.sh, demo_grid.sh): the part they share. Plain use, on
# any CUDA machine, from the repository root in a venv with diffcse[train,export,demo]:
#   bash benchmarks/gpu/quality.sh
# Settings (environment, all optional):
#   PY      the interpreter (default: python)       DEV    the torch device (default: cuda)
#   OUT     where JSON and logs go (default: gpu-out) WORK   scratch runs (default: /tmp/diffcse-gpu)
#   MODEL   the encoder to start from (default: builtin:all-MiniLM-L6-v2)
#   CORPUS  the training sentences (default: builtin:wiki_en)
#   STS     STS data in the SentEval layout (default: ../shared/data/sts)
#   PACKED  a folder made by transfer/pack.py: take everything from it instead, for a machine
#           with no registry or hub reached through a size-limited transfer (transfer/unpack.sh)
# The caller sets BUDGET (seconds) and THREADS (OMP threads per training process) first.
[ -f benchmarks/__init__.py ] || { echo "run this from the repository root" >&2; exit 1; }
if [ -n "${PACKED:-}" ]; then
  source benchmarks/gpu/transfer/unpack.sh || exit 1
fi
PY=${PY:-python}; DEV=${DEV:-cuda}
OUT=${OUT:-gpu-out}; WORK=${WORK:-/tmp/diffcse-gpu}
MODEL=${MODEL:-builtin:all-MiniLM-L6-v2}; CORPUS=${CORPUS:-builtin:wiki_en}
STS=${STS:-../shared/data/sts}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=$THREADS
START=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
