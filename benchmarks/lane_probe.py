"""Where decode time goes: per-lane counters of the executor under each token-assignment mode.

Usage (GPU machine): PYTHONPATH=. python3 benchmarks/lane_probe.py [--scenario S0] [--profile PATH]
Loads the scenario once, then for each mode measures prefill and decode and prints the CPU lane's achieved
weight-read rate, the copy lane's bytes and the feeding thread's wait time per decode step.
"""

from __future__ import annotations

# first, before torch: hf_hybrid sets OMP_WAIT_POLICY=PASSIVE, which OpenMP reads once, when torch loads it
import hf_hybrid  # noqa: F401

# isort: split

import argparse
import json
import time

import torch

from hf_hybrid import HardwareProfile, HybridModelForCausalLM, Workload
from hf_hybrid.bench import build_checkpoint
from hf_hybrid.bench.scenarios import default_cache_dir, get_scenario


def timed_generate(model, ids, new_tokens: int) -> tuple[float, list[float]]:
    """Total seconds of one generate call and the seconds of each forward (prefill first).

    Per-forward times come from hooks on the model, so decode steps are timed directly instead of as a
    difference of two noisy generate calls.
    """
    forwards: list[float] = []

    def start(module, args, kwargs):
        torch.cuda.synchronize()
        forwards.append(time.perf_counter())

    def end(module, args, kwargs, output):
        torch.cuda.synchronize()
        forwards[-1] = time.perf_counter() - forwards[-1]

    handles = [
        model.register_forward_pre_hook(start, with_kwargs=True),
        model.register_forward_hook(end, with_kwargs=True),
    ]
    try:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t0, forwards
    finally:
        for handle in handles:
            handle.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenario", default="S0")
    parser.add_argument("--profile", default=None, help="a HardwareProfile JSON (skips measuring)")
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=17)
    parser.add_argument("--cache-dir", default=str(default_cache_dir()))
    args = parser.parse_args()
    scenario = get_scenario(args.scenario)
    path = build_checkpoint(args.scenario, cache_dir=args.cache_dir)
    profile = HardwareProfile.from_dict(json.load(open(args.profile))) if args.profile else "auto"
    t0 = time.perf_counter()
    model = HybridModelForCausalLM.from_pretrained(
        path,
        gpu_memory=scenario.gpu_memory,
        device="cuda",
        dtype=torch.bfloat16,
        max_context=args.prompt + args.new_tokens + 8,
        profile=profile,
        workload=Workload(args.prompt, args.new_tokens, 1),
        progress=False,
    )
    print(f"loaded in {time.perf_counter() - t0:.1f} s")
    print(model.hybrid_plan.to_dict()["homes"], model.hybrid_plan.to_dict()["budget"])
    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt), device="cuda")
    timed_generate(model, ids, 2)  # warm-up
    ex = model.hybrid.executor

    # the CPU kernel alone in the CPU lane's thread, out of cache (rotating over every CPU-home unit)
    group = next(g for g in model.hybrid.loaded.groups.values() if "cpu" in g.homes)
    kernels = [ex.cpu_kernels.kernel(group, i) for i, h in enumerate(group.homes) if h == "cpu"]
    x = torch.randn(1, model.config.hidden_size, dtype=torch.bfloat16)

    def spin(n=12):
        t = time.perf_counter()
        for j in range(n):
            kernels[j % len(kernels)](x)
        return n * kernels[0].weight_bytes / (time.perf_counter() - t)

    ex.cpu_lane.run(lambda: spin(3))
    rate = ex.cpu_lane.run(spin)
    print(
        f"CPU kernel in the CPU lane thread ({kernels[0].method_for(1)}, {len(kernels)} units): {rate / 1e9:.1f} GB/s"
    )

    rows = []
    for mode in ("adaptive", "static", "cpu", "stream"):
        ex.token_assignment = mode
        timed_generate(model, ids, 1)
        ex.stats.reset()
        ring_bytes = ex.expert_ring.bytes_copied if ex.expert_ring else 0
        _, forwards = timed_generate(model, ids, args.new_tokens)
        prefill_s = forwards[0]
        decode_s = sum(forwards[1:]) / len(forwards[1:])
        st = ex.stats
        copied = (ex.expert_ring.bytes_copied if ex.expert_ring else 0) - ring_bytes
        rows.append(
            {
                "mode": mode,
                "prefill_tok_s": args.prompt / prefill_s,
                "decode_tok_s": 1 / decode_s,
                "cpu_lane_ms_per_step": 1e3 * st.cpu_lane_s / args.new_tokens,
                "cpu_lane_GBps": st.cpu_bytes / st.cpu_lane_s / 1e9 if st.cpu_lane_s else 0,
                "join_wait_ms_per_step": 1e3 * st.join_wait_s / args.new_tokens,
                "copied_GB_per_step": copied / args.new_tokens / 1e9,
                "cpu_units": st.cpu_units,
                "streamed": st.streamed_units,
                "cached": st.cached_units,
                "gpu_units": st.gpu_units,
            }
        )
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")


if __name__ == "__main__":
    main()
