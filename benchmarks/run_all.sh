#!/usr/bin/env bash
# Re-run every benchmark with its defaults, one after another (they must not overlap: each
# times the CPU). Results land in benchmarks/results/*.json; logs in benchmarks/results/*.log.
# Usage: bash benchmarks/run_all.sh [NAME ...]   (default: all, in the order below)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}  # PY=python with a venv activated
mkdir -p benchmarks/results
[ -x benchmarks/.venv-st/bin/python ] || bash benchmarks/setup_st_venv.sh
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(encode profile_encoder cold_start footprint train_step retrieval_scale quality run_plan serve serve_layout)
for name in "${names[@]}"; do
  echo "== $name (load: $(cut -d' ' -f1-3 /proc/loadavg))"
  "$PY" -m "benchmarks.$name" 2>"benchmarks/results/$name.log" | tee "benchmarks/results/$name.txt"
  echo "   exit ${PIPESTATUS[0]}"
done
