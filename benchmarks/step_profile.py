"""Where the host time of a decode step goes, per token-assignment mode, on a benchmark scenario.

    PYTHONPATH=. python3 benchmarks/step_profile.py --scenario S1 --out-dir out/

For each mode it times every forward of a greedy generate with hooks -- forward start to the first decoder
layer, layer by layer, the experts call, forward end, and the gap to the next forward -- and prints the
medians over decode steps. Then it records a few decode steps under ``torch.profiler`` and prints the ops
by host time (the Chrome trace is saved in ``--out-dir``).
"""

from __future__ import annotations

# first, before torch: hf_hybrid sets OMP_WAIT_POLICY=PASSIVE, which OpenMP reads once, when torch loads it
import hf_hybrid  # noqa: F401

# isort: split

import argparse
import statistics
import time
from pathlib import Path

import torch
from scenario_model import load_scenario_model


def _sync(model) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


def timed_steps(model, input_ids, new_tokens: int) -> dict[str, float]:
    """Median milliseconds of the parts of a decode step (host clock)."""
    marks: list[tuple[str, float]] = []
    layers = model.model.layers

    def mark(label):
        def hook(*_args, **_kwargs):
            marks.append((label, time.perf_counter()))

        return hook

    handles = [
        model.register_forward_pre_hook(mark("start")),
        model.register_forward_hook(mark("end")),
        layers[0].register_forward_pre_hook(mark("layer0")),
        layers[0].mlp.register_forward_pre_hook(mark("mlp0")),
        layers[0].register_forward_hook(mark("layer0_end")),
        layers[-1].register_forward_hook(mark("last_layer_end")),
    ]
    try:
        _sync(model)
        began = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        _sync(model)
        total = time.perf_counter() - began
    finally:
        for h in handles:
            h.remove()
    steps: list[dict[str, float]] = []
    for label, t in marks:
        if label == "start":
            steps.append({"start": t})
        else:
            steps[-1][label] = t
    parts: dict[str, list[float]] = {}
    decode = steps[1:]
    for n, s in enumerate(decode):
        parts.setdefault("start -> layer 0", []).append(s["layer0"] - s["start"])
        parts.setdefault("layer 0 -> its MoE block", []).append(s["mlp0"] - s["layer0"])
        parts.setdefault("layer 0 total", []).append(s["layer0_end"] - s["layer0"])
        parts.setdefault("layer 0 -> last layer end", []).append(s["last_layer_end"] - s["layer0"])
        parts.setdefault("last layer end -> forward end", []).append(s["end"] - s["last_layer_end"])
        parts.setdefault("forward", []).append(s["end"] - s["start"])
        if n + 1 < len(decode):
            parts.setdefault("forward end -> next forward", []).append(decode[n + 1]["start"] - s["end"])
    out = {k: statistics.median(v) * 1e3 for k, v in parts.items()}
    out["prefill forward"] = (steps[0]["end"] - steps[0]["start"]) * 1e3
    out["generate total"] = total * 1e3
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="S1")
    parser.add_argument("--gpu-memory", default=None)
    parser.add_argument("--prompt", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--modes", default="adaptive,stream")
    parser.add_argument(
        "--profile-steps", type=int, default=4, help="decode steps under torch.profiler (0: none)"
    )
    parser.add_argument(
        "--stack", action="store_true", help="record Python stacks in the profiler trace (slower steps)"
    )
    parser.add_argument("--out-dir", default=".")
    args = parser.parse_args()

    scenario, model, ids = load_scenario_model(
        args.scenario,
        new_tokens=args.new_tokens,
        prompt=args.prompt,
        gpu_memory=args.gpu_memory,
        context_slack=8,
    )
    ids = ids.to(model.device)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, do_sample=False)  # warm up kernels, buffers and threads
    ex = model.hybrid.executor
    table = {}
    for mode in args.modes.split(","):
        ex.token_assignment = mode
        ex.stats.reset()
        table[mode] = timed_steps(model, ids, args.new_tokens)
        table[mode]["cpu units / step"] = ex.stats.cpu_units / args.new_tokens
        table[mode]["streamed units / step"] = ex.stats.streamed_units / args.new_tokens
    rows = list(next(iter(table.values())).keys())
    print("| ms (median over decode steps) | " + " | ".join(table) + " |")
    print("|---|" + "---|" * len(table))
    for r in rows:
        print(f"| {r} | " + " | ".join(f"{table[m][r]:.2f}" for m in table) + " |")

    if args.profile_steps:
        from torch.profiler import ProfilerActivity, profile

        ex.token_assignment = args.modes.split(",")[0]
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if model.device.type == "cuda" else [])
        short = ids[:, :16]
        with torch.inference_mode():
            model.generate(short, max_new_tokens=2, do_sample=False)
            with profile(activities=activities, with_stack=args.stack) as prof:
                model.generate(
                    short,
                    max_new_tokens=args.profile_steps,
                    min_new_tokens=args.profile_steps,
                    do_sample=False,
                )
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
        out = Path(args.out_dir) / f"{scenario.name}-steps.profile.json"
        prof.export_chrome_trace(str(out))
        print("profiler trace:", out)


if __name__ == "__main__":
    main()
