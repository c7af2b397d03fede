#!/usr/bin/env bash
# A second GPU session: the demo's own budget (configs/demo_cpu.yaml: batch 32, 100 steps,
# lr 3e-5, fp32, dev evaluation every 25 steps) under variants that might keep SICK-R trial
# from falling, 3 seeds each, with the generator recipe chosen by quality.sh (--encoder-lr
# 3e-4). Same settings and output as quality.sh (session.sh); the in-domain variant trains on
# the unlabelled sentences of STS-B train and SICK train (no scores), written from $STS.
# GRID=1 (default) or GRID=2 picks the variants.
set -u
BUDGET=${BUDGET:-300}; THREADS=1
source "$(dirname "$0")/session.sh" || exit 1
$PY -m diffcse_train fit-generator --encoder $MODEL --corpus $CORPUS --out $WORK/gen \
  --device $DEV --quiet --encoder-lr 3e-4 > "$OUT/gen.log" 2>&1 || { tail -n 30 "$OUT/gen.log"; exit 1; }
tail -n 8 "$OUT/gen.log"
$PY - "$STS" "$WORK/indomain.txt" <<'PY' || exit 1
import sys
from diffcse_runtime.sts import load_task
pairs = [load_task(sys.argv[1], t, "train") for t in ("STSBenchmark", "SICKRelatedness")]
sentences = dict.fromkeys(s for p in pairs for s in p.sents1 + p.sents2)
open(sys.argv[2], "w", encoding="utf-8").write("\n".join(sentences) + "\n")
PY
COMMON=(--device $DEV --score trainer --generator $WORK/gen --data $STS --steps 100
  --batch-size 32 --learning-rate 3e-5 --eval-steps 25 --precision fp32 --seeds 42,43,44
  --jobs 3 --set model_name_or_path=$MODEL --set fit_generator=false)
variant() {  # name, runs, extra --set overrides
  local name=$1 runs=$2; shift 2
  timeout $(( $(left) - 5 )) $PY -m benchmarks.quality "${COMMON[@]}" --runs "$runs" "$@" \
    --deadline $(( $(left) - 60 )) --work $WORK/q-$name --out "$OUT/demo_$name.json" \
    > "$OUT/demo_$name.log" 2>&1 &
}
if [ "${GRID:-1}" = 1 ]; then
  variant proj-none simcse,diffcse-mlm --set train_file=$CORPUS --set projector=none
  variant proj-none-lam0.05 diffcse-mlm@0.05 --set train_file=$CORPUS --set projector=none
  variant lam0.05 diffcse-mlm@0.05 --set train_file=$CORPUS
  variant indomain simcse,diffcse-mlm --set train_file=$WORK/indomain.txt
else  # GRID=2: larger lambda at the demo budget, and a gentler, longer run
  variant lam0.5 diffcse-mlm@0.5 --set train_file=$CORPUS
  variant lam0.1 diffcse-mlm@0.1 --set train_file=$CORPUS
  variant lr1e-5-200 diffcse-mlm,simcse --set train_file=$CORPUS --learning-rate 1e-5 --steps 200
fi
wait
for f in "$OUT"/demo_*.log; do echo "== $f"; grep -A12 "| *run | seeds" "$f"; done
echo "done in $(( $(date +%s) - START )) s"
