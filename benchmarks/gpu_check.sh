#!/usr/bin/env bash
# One pass on a GPU machine, in the order a change should be checked: every CUDA test, the bench rows of
# each scenario in $SCENARIOS (with the variants named in $VARIANTS, side by side on one loaded model), S1 at
# batch 8 with $BATCH8_VARIANTS (when set), the streamed-expert issue probe (PROBE=1) and a trace of
# $TRACE_TOKENS new tokens (default 4) of $TRACE. Results go to $OUT (default ./gpu-check); compare rows of
# one pass only (machines differ). Every step prints the machine's MemTotal: the device machines are VMs
# whose memory grows as it is first touched (about 3 s per 8 GiB), a candidate for the first bench
# process's slower prefill; PRETOUCH=N first touches N GiB of host memory (and frees it) to test that.
#
#     OUT=/tmp/out VARIANTS=eager_experts SCENARIOS="S3 S4 S1" TRACE=S3 bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-$PWD/gpu-check}"
VARIANTS="${VARIANTS:-eager_experts}"
SCENARIOS="${SCENARIOS:-S1 S3}"
TRACE="${TRACE:-S1}"
TRACE_TOKENS="${TRACE_TOKENS:-4}"
BATCH8_VARIANTS="${BATCH8_VARIANTS:-}"
PROBE="${PROBE:-0}"
PRETOUCH="${PRETOUCH:-0}"
mkdir -p "$OUT"
start=$(date +%s)
step() { echo "[$(($(date +%s) - start)) s, MemTotal $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)] $*"; }

if [ "$PRETOUCH" != 0 ]; then
  step "touching $PRETOUCH GiB of host memory"
  python3 - "$PRETOUCH" <<'PY'
import sys, time
import torch
started, held = time.perf_counter(), []
for _ in range(int(sys.argv[1])):
    held.append(torch.ones(2**30, dtype=torch.uint8))  # written, so every page is backed
print(f"touched {len(held)} GiB in {time.perf_counter() - started:.1f} s")
PY
fi

step "CUDA tests"
timeout 300 python3 -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider >"$OUT/cuda-tests.txt" 2>&1
tail -1 "$OUT/cuda-tests.txt"
for scenario in $SCENARIOS; do
  step "bench $scenario"
  # S3 decodes 64 tokens (its decode is fast; the prompt's prefill dominates otherwise). --cleanup: the
  # disk of the GPU machine holds two or three of these checkpoints at most
  new_tokens=128
  [ "$scenario" = S3 ] && new_tokens=64
  cleanup=--cleanup
  [ "$scenario" = "$TRACE" ] && cleanup=
  [ "$scenario" = S1 ] && [ -n "$BATCH8_VARIANTS" ] && cleanup=  # the batch-8 run below reuses it
  timeout 300 python3 -m hf_hybrid.cli bench --engines hf_hybrid --scenario "$scenario" \
    --new-tokens "$new_tokens" --variants "$VARIANTS" $cleanup --json "$OUT/$scenario.json" \
    >"$OUT/$scenario.txt" 2>&1
  grep "^| hf" "$OUT/$scenario.txt" | cut -c1-200
done
if [ -n "$BATCH8_VARIANTS" ]; then
  step "bench S1 batch 8"
  timeout 300 python3 -m hf_hybrid.cli bench --engines hf_hybrid --scenario S1 --batch 8 --new-tokens 32 \
    --variants "$BATCH8_VARIANTS" --json "$OUT/S1-batch8.json" >"$OUT/S1-batch8.txt" 2>&1
  grep "^| hf" "$OUT/S1-batch8.txt" | cut -c1-200
fi
if [ "$PROBE" = 1 ]; then
  step "streamed-expert issue probe"
  timeout 120 python3 benchmarks/streamed_issue.py --cpu-load 2>&1 | tail -1 | tee "$OUT/streamed-issue.txt"
fi
if [ -n "$TRACE" ]; then
  step "$TRACE trace"
  timeout 200 python3 benchmarks/trace_scenario.py --scenario "$TRACE" --modes adaptive --new-tokens "$TRACE_TOKENS" \
    --out "$OUT/$TRACE.trace.json" >"$OUT/trace.txt" 2>&1
  tail -1 "$OUT/trace.txt" | cut -c1-200
fi
step done
