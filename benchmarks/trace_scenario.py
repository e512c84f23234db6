"""Save a Chrome/Perfetto timeline of one prefill and a few decode steps on a benchmark scenario.

    PYTHONPATH=. python3 benchmarks/trace_scenario.py --scenario S1 --modes adaptive,stream --out s1.trace.json

Builds (or reuses) the scenario's synthetic checkpoint, loads it with the scenario's GPU budget and
calls ``model.trace``. Open the file at https://ui.perfetto.dev: one row per lane (host, CPU lane,
PCIe copies, GPU compute) shows which lane bounds each layer.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import hf_hybrid
from hf_hybrid.bench.checkpoint import build_checkpoint
from hf_hybrid.bench.runner import _lane_stats
from hf_hybrid.bench.scenarios import get_scenario


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

    scenario = get_scenario(args.scenario)
    prompt = args.prompt or scenario.prompt
    path = build_checkpoint(scenario, skew=args.skew)
    model = hf_hybrid.HybridModelForCausalLM.from_pretrained(
        path,
        gpu_memory=args.gpu_memory or scenario.gpu_memory,
        dtype=torch.bfloat16,
        max_context=prompt + args.new_tokens,
    )
    print(model.hybrid_plan)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=generator)
    executor = model.hybrid.executor
    for mode in args.modes.split(","):
        executor.token_assignment = mode
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
