#!/usr/bin/env bash
# The method's effect on a GPU: fit generator recipes, then the objectives at scale and the
# demo's own settings, every run scored by the trainer's own dev evaluation, within BUDGET
# seconds (default 540). Writes JSON and logs to $OUT (default ./gpu-out). Run from the
# repository root on any CUDA machine: `bash benchmarks/gpu/quality.sh` (settings: session.sh).
# QUICK=1 shrinks every budget to a few steps (DEV=cpu QUICK=1: a check of the script on CPU).
set -u
BUDGET=${BUDGET:-540}; THREADS=2
source "$(dirname "$0")/session.sh" || exit 1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  $PY -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
  nproc; } > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
if [ "${QUICK:-0}" = 1 ]; then GSTEPS="--max-steps 0 --min-accuracy-gain 0"; S1=4; E1=2; S2=4; E2=2; else GSTEPS=""; S1=553; E1=50; S2=100; E2=25; fi

# 0. smoke: a few steps of each generator-free objective on the device, to fail in a minute
# (and give the machine back) rather than after the whole budget
for aug in none replace; do
  lam=0.005; [ $aug = none ] && lam=0
  $PY -m diffcse_train --config configs/demo_cpu.yaml --overwrite --quiet --set device=$DEV --set compare_with=none \
    --set model_name_or_path=$MODEL --set train_file=$CORPUS --set augmentation=$aug \
    --set lambda_weight=$lam --set max_steps=3 --set eval_data_dir=null --set export_dir=null \
    --set precision=bf16 --set output_dir=$WORK/smoke-$aug > "$OUT/smoke-$aug.log" 2>&1 \
    || { echo "smoke $aug failed"; tail -n 40 "$OUT/smoke-$aug.log"; exit 1; }
done
echo "smoke passed: $(( $(date +%s) - START )) s"

# 1. generator recipes, side by side (each prints its fit report; fit_report.json is kept)
declare -A GEN=(
  [default]=""
  [epochs2]="--epochs 2"
  [elr3e-4]="--encoder-lr 3e-4"
  [mask30]="--mask-ratio 0.3"
  [elr2e-4-mask30]="--encoder-lr 2e-4 --mask-ratio 0.3"
)
[ "${QUICK:-0}" = 1 ] && GEN=([default]="" [elr3e-4]="--encoder-lr 3e-4")
for name in "${!GEN[@]}"; do
  timeout $(( $(left) - 330 )) $PY -m diffcse_train fit-generator --encoder $MODEL --corpus $CORPUS \
    --out $WORK/gen-$name --device $DEV --quiet $GSTEPS ${GEN[$name]} > "$OUT/gen-$name.log" 2>&1 &
done
wait
$PY - "$WORK" <<'PY' > "$OUT/generators.json"
import json, sys, pathlib
rows = {}
for p in sorted(pathlib.Path(sys.argv[1]).glob("gen-*/fit_report.json")):
    r = json.loads(p.read_text())
    rows[p.parent.name[4:]] = {"fill": r["after"]["accuracy"], "copy": r["after"]["copy_accuracy"],
        "ppl": r["after"]["perplexity"], "steps": r["steps"], "seconds": r["seconds"]}
print(json.dumps(rows, indent=1))
PY
cat "$OUT/generators.json"
# the experiment's generator: the best one-epoch recipe that copies >= 90% (the CPU budget
# allows one epoch); the others only say how accuracy grows with epochs
BEST=$($PY -c '
import json,sys; g=json.load(open(sys.argv[1]))
ok={k:v for k,v in g.items() if "epochs" not in k and v["copy"]>=0.9} or g
print(max(ok, key=lambda k: ok[k]["fill"]) if ok else "")' "$OUT/generators.json")
echo "generator for the runs: ${BEST:-none}"; echo "${BEST:-none}" > "$OUT/generator_used.txt"
RUNS=simcse,diffcse-mlm,diffcse-replace; SWEEP=0.05,0.5
if [ -z "$BEST" ]; then RUNS=simcse,diffcse-replace; SWEEP=""; tail -n 30 "$OUT"/gen-default.log; fi

COMMON=(--device $DEV --score trainer --generator $WORK/gen-$BEST --data $STS
  --set model_name_or_path=$MODEL --set train_file=$CORPUS --set fit_generator=false)
# 2. the objectives at scale: one pass over the corpus at batch 64 (553 steps), bf16
# autocast, fp32 evaluation every 50 steps; 3 seeds; lambda sweep
timeout $(( $(left) - 5 )) $PY -m benchmarks.quality "${COMMON[@]}" --steps $S1 --batch-size 64 \
  --learning-rate 3e-5 --eval-steps $E1 --precision bf16 --seeds 42,43,44 --runs $RUNS --sweep "$SWEEP" \
  --jobs 6 --deadline $(( $(left) - 150 )) --work $WORK/q-scale --out "$OUT/quality_scale.json" \
  > "$OUT/quality_scale.log" 2>&1 &
# 3. the demo's own settings (configs/demo_cpu.yaml: batch 32, 100 steps, fp32), 3 seeds
for lr in 3e-5 1e-5; do
  runs=diffcse-mlm; [ $lr = 3e-5 ] && runs=$RUNS
  [ -z "$BEST" ] && [ $lr != 3e-5 ] && continue
  timeout $(( $(left) - 5 )) $PY -m benchmarks.quality "${COMMON[@]}" --steps $S2 --batch-size 32 \
    --learning-rate $lr --eval-steps $E2 --precision fp32 --seeds 42,43,44 --runs $runs \
    --jobs 2 --deadline $(( $(left) - 90 )) --work $WORK/q-demo-$lr --out "$OUT/quality_demo_$lr.json" \
    > "$OUT/quality_demo_$lr.log" 2>&1 &
done
wait
tail -n 30 "$OUT"/quality_*.log
echo "done in $(( $(date +%s) - START )) s"
