# Sourced by benchmarks/gpu/serve.sh when PACKED names a folder that transfer/serve_pack.py
# made: for a machine with Python 3.12, onnxruntime, tokenizers and numpy but no registry, no
# FastAPI/uvicorn and no wrk, reached through a transfer that carries at most 64 MiB and
# returns only a few files.
#   here:  python -m benchmarks.gpu.transfer.serve_pack pack runs/demo_cpu/model .serve
#   there: PACKED=.serve bash benchmarks/gpu/serve.sh      (with .serve carried)
# The checkout is used in place with the carried wheels, wrk and widened model, and
# everything written under $OUT goes at exit into the real $OUT (default ./gpu-out) as
# results.tar.gz plus the JSON and text files, with the servers' logs inside the tarball.
PY=${PY:-python3}
PACKED=$(cd "$PACKED" && pwd) || return 1
W=/tmp/serve-wheels
export PYTHONPATH="$PWD:$W" PATH="$PACKED/bin:$PATH"
export LD_LIBRARY_PATH="$PACKED/lib:${LD_LIBRARY_PATH:-}"
DEST=${OUT:-$PWD/gpu-out}; OUT=/tmp/serve-results
rm -rf "$OUT"; mkdir -p "$OUT" "$DEST"
trap 'cp /tmp/serve-[0-9]*.log "$OUT"/ 2>/dev/null; tar -czf "$DEST/results.tar.gz" -C "$OUT" . ; cp "$OUT"/*.json "$OUT"/*.txt "$DEST"/ 2>/dev/null' EXIT
$PY -c "import fastapi, uvicorn" 2>/dev/null ||
  $PY -m pip install --quiet --no-index --no-deps --target "$W" "$PACKED"/wheels/*.whl || return 1
$PY -m benchmarks.gpu.transfer.serve_pack unpack "$PACKED" /tmp/minilm-onnx || return 1
MODEL=/tmp/minilm-onnx STS=$PACKED/sts
