# Sourced by benchmarks/gpu/session.sh when PACKED names a folder that transfer/pack.py made:
# for a machine with PyTorch and transformers but no registry and no hub, reached through a
# transfer that carries at most 64 MiB and returns only a few files.
#   here:  python -m benchmarks.gpu.transfer.pack pack .gpu
#   there: PACKED=.gpu bash benchmarks/gpu/quality.sh      (with .gpu carried)
# The checkout is used in place (no pip install), the carried fp16 MiniLM is widened to fp32,
# and everything written under $OUT goes at exit into the real $OUT (default ./gpu-out) as
# results.tar.gz plus the JSON files.
PY=${PY:-python3}
export PYTHONPATH="$PWD"
DEST=${OUT:-$PWD/gpu-out}; OUT=/tmp/gpu-results
rm -rf "$OUT"; mkdir -p "$OUT" "$DEST"
trap 'tar -czf "$DEST/results.tar.gz" -C "$OUT" . ; cp "$OUT"/*.json "$DEST"/ 2>/dev/null' EXIT
$PY -m benchmarks.gpu.transfer.pack unpack "$PACKED" /tmp/minilm || return 1
MODEL=/tmp/minilm CORPUS=$PACKED/wiki_en.txt STS=$PACKED/sts
