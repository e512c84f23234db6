"""Save a Chrome/Perfetto timeline of one prefill and a few decode steps on a benchmark scenario.

    PYTHONPATH=. python3 benchmarks/trace_scenario.py --scenario S1 --modes adaptive,stream --out s1.trace.json

Builds (or reuses) the scenario's synthetic checkpoint, loads it with the scenario's GPU budget and
calls ``model.trace``. Open the file at https://ui.perfetto.dev: one row per lane (host, CPU lane,
PCIe copies, GPU compute) shows which lane bounds each layer.
"""

from __future__ import annotations

# first, before torch: hf_hybrid sets OMP_WAIT_POLICY=PASSIVE, which OpenMP reads once, when torch loads it
import hf_hybrid  # noqa: F401

# isort: split

import argparse
from pathlib import Path

import torch
from scenario_model import load_scenario_model

from hf_hybrid.bench.timing import lane_stats as _lane_stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="S1")
    parser.add_argument("--skew", default=None)
    parser.add_argument("--gpu-memory", default=None, help="default: the scenario's budget")
    parser.add_argument("--prompt", type=int, default=None, help="default: the scenario's prompt")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--modes", default="adaptive", help="comma list of token-assignment modes to trace")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    _, model, input_ids = load_scenario_model(
        args.scenario,
        new_tokens=args.new_tokens,
        prompt=args.prompt,
        gpu_memory=args.gpu_memory,
        skew=args.skew,
    )
    print(model.hybrid_plan)
    executor = model.hybrid.executor
    for mode in args.modes.split(","):
        model.set_token_assignment(mode)  # the plan's predictions follow the mode
        with torch.inference_mode():
            # warm up: kernels, cuBLAS handles, the CPU lane's threads and the learned CPU rate (a cold first
            # call spends hundreds of ms on one-time setup that a served model never sees again)
            model.generate(input_ids.to(model.device), max_new_tokens=args.new_tokens, do_sample=False)
        executor.stats.reset()
        out = Path(args.out.replace(".json", f".{mode}.json"))
        model.trace(out, input_ids, max_new_tokens=args.new_tokens)
        print(f"{mode}: lanes {_lane_stats(model)}")
        print(f"{mode}: trace written to {out}")


if __name__ == "__main__":
    main()
