#!/usr/bin/env bash
# Train on the packaged MiniLM and Wikipedia sentences, export through the parity gate, then
# serve the result and embed one text through it. Nothing is downloaded.
#
#   bash examples/train_then_serve.sh            # a short run: STEPS=20 by default
#   STEPS=100 bash examples/train_then_serve.sh  # the demo's budget
#
# It uses configs/demo_cpu.yaml with random-token replacement (no generator to fit) and no
# dev-set evaluation, so it runs anywhere in minutes; drop those --set lines for the
# paper's MLM objective and the best-step selection (see docs/training.md).
set -euo pipefail

STEPS=${STEPS:-20}
RUN=${RUN:-runs/example}
PORT=${PORT:-8090}

diffcse-train --config configs/demo_cpu.yaml --overwrite \
  --set output_dir="$RUN" --set export_dir="$RUN/model" \
  --set max_steps="$STEPS" --set eval_steps="$STEPS" --set save_steps="$STEPS" \
  --set augmentation=replace --set fit_generator=false --set generator_name_or_path=null \
  --set eval_data_dir=null --set keep_initial=false --set gain_on_every_task=false \
  --set eval_tasks=STSBenchmark --set compare_with=none

diffcse-serve --model "$RUN/model" --port "$PORT" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT

for _ in $(seq 1 120); do
  curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null && break
  sleep 0.5
done
curl -sf "http://127.0.0.1:$PORT/v1/embeddings" -H "Content-Type: application/json" \
  -d '{"model": "model", "input": ["A man plays a guitar."]}' \
  | python -c "import json, sys; print(len(json.load(sys.stdin)['data'][0]['embedding']), 'dimensions')"
