#!/usr/bin/env bash
# One pass on a GPU machine, in the order a change should be checked: every CUDA test, the S1 bench rows
# (with the variants named in $VARIANTS, side by side on one loaded model), an S1 trace, the S3 rows.
# Results go to $OUT (default ./gpu-check); compare rows of one pass only (machines differ).
#
#     OUT=/tmp/out VARIANTS=wait_spin,lane_thread bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-$PWD/gpu-check}"
VARIANTS="${VARIANTS:-wait_spin,lane_thread}"
mkdir -p "$OUT"
start=$(date +%s)
step() { echo "[$(($(date +%s) - start)) s] $*"; }

step "CUDA tests"
timeout 300 python3 -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider >"$OUT/cuda-tests.txt" 2>&1
tail -1 "$OUT/cuda-tests.txt"
step "bench S1"
timeout 300 python3 -m hf_hybrid.cli bench --engines hf_hybrid --scenario S1 --variants "$VARIANTS" \
  --json "$OUT/S1.json" >"$OUT/S1.txt" 2>&1
grep "^| hf" "$OUT/S1.txt" | cut -c1-200
step "S1 trace"
timeout 200 python3 benchmarks/trace_scenario.py --scenario S1 --modes adaptive --new-tokens 4 \
  --out "$OUT/s1.trace.json" >"$OUT/trace.txt" 2>&1
tail -1 "$OUT/trace.txt" | cut -c1-200
step "bench S3"  # --cleanup: the disk of the GPU machine holds two or three of these checkpoints at most
timeout 300 python3 -m hf_hybrid.cli bench --engines hf_hybrid --scenario S3 --new-tokens 64 \
  --variants "$VARIANTS" --cleanup --json "$OUT/S3.json" >"$OUT/S3.txt" 2>&1
grep "^| hf" "$OUT/S3.txt" | cut -c1-200
step done
