"""Prefill-sized expert jobs on the native CPU lane: AMX-BF16 tiles against its vector path and torch.

    PYTHONPATH=. python3 benchmarks/native_amx_bench.py                 # Mixtral-shaped experts, bf16
    PYTHONPATH=. python3 benchmarks/native_amx_bench.py --tiny          # seconds: a smoke run

One "step" is what the CPU lane does for one MoE layer: ``--experts`` experts (H x I gate, up and down
matrices each, random bf16), each with ``tokens`` of the step's rows routed to it and a routing weight per
token, added into one fp32 output. TFLOP/s counts 2 * tokens * 3 * H * I per expert over the step's wall
time; GB/s counts the weight bytes read once per step (3 * H * I * 2 per expert).

Columns: ``amx`` = :class:`hf_hybrid.kernels.native.NativeExpertLane` with its AMX path (where the CPU
has AMX-BF16 and Linux grants the tile state; the header says whether it does); ``vector`` = the same lane
with AMX off (``amx_min_tokens=0``: its AVX-512 path); ``torch`` = the torch path the CPU lane uses for big
jobs without AMX (:class:`hf_hybrid.kernels.cpu.CpuExpertKernel`, ``F.linear`` per expert, then the routing
weight and ``index_add_``), with the same thread count. ``max diff`` = the AMX result against
:func:`hf_hybrid.kernels.native.torch_reference` (bf16 rounding as torch does; only sums' order differs).

Measured on a 16-core Xeon with AMX-BF16, 16 threads, torch 2.11: 2.21/3.94/3.45 TFLOP/s with AMX at
32/128/512 tokens per expert, 0.73/0.71/0.66 for the vector path, 1.35/2.49/2.88 for torch (from the main
thread here; about 0.8 in-process from the CPU lane's worker thread). With ``--amx-min-tokens 1``: 11.1/9.7/13.0
ms with AMX against 10.0/17.1/25.5 ms for the vector path at 8/16/24 tokens.
"""

from __future__ import annotations

# first, before torch: hf_hybrid sets OMP_WAIT_POLICY=PASSIVE, which OpenMP reads once, when torch loads it
import hf_hybrid  # noqa: F401

# isort: split

import argparse
import functools
import os
import statistics
import time

import torch
import torch.nn.functional as F

from hf_hybrid.kernels import native
from hf_hybrid.kernels.cpu import CpuExpertKernel


def _experts(count: int, hidden: int, inter: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for i in range(count):
        gen = torch.Generator().manual_seed(i)
        gate_up = (torch.randn(2 * inter, hidden, generator=gen) * 0.02).bfloat16()
        down = (torch.randn(hidden, inter, generator=gen) * 0.02).bfloat16()
        out.append((gate_up, down))
    return out


def _time(fn, steps: int, warmup: int = 1) -> float:
    """Median seconds of one call of ``fn()``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _torch_step(kernels, routes, x, out) -> None:
    for kernel, (tok, w) in zip(kernels, routes):
        y = kernel(x[tok]) * w[:, None]
        out.index_add_(0, tok, y.float())


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _row(tokens: int, path: str, seconds: float, flops: int, weight_bytes: int, stats=None, diff: str = ""):
    phases = ""
    if stats:
        phases = (
            f"{stats['phase1_us'] / 1e3:>7.2f} {stats['phase2_us'] / 1e3:>7.2f} {int(stats['amx_jobs']):>8}"
        )
    text = (
        f"{tokens:>6} {path:>7} {seconds * 1e3:>9.2f} {flops / seconds / 1e12:>8.2f} "
        f"{weight_bytes / seconds / 1e9:>7.1f} {phases} {diff}"
    )
    print(text.rstrip(), flush=True)


def _bench_tokens(args, lane, experts, kernels, tokens: int) -> None:
    """The rows of one token count: the lane with AMX and without, then torch; the lane's results checked."""
    # each expert gets `tokens` of the step's rows, overlapping the way top-2 routing spreads a batch
    total = 2 * tokens if args.experts > 1 else tokens
    gen = torch.Generator().manual_seed(tokens)
    x = (torch.randn(total, args.hidden, generator=gen) * 0.5).bfloat16()
    routes = []
    for e in range(args.experts):
        tok = ((torch.arange(tokens) + e * tokens // 2) % total).to(torch.int64)
        routes.append((tok, torch.rand(tokens, generator=gen).bfloat16()))
    jobs = [native.ExpertJob(gu, dn, tokens=tok, weights=w) for (gu, dn), (tok, w) in zip(experts, routes)]
    flops = 2 * tokens * 3 * args.hidden * args.inter * args.experts
    weight_bytes = sum(gu.nbytes + dn.nbytes for gu, dn in experts)
    row = functools.partial(_row, tokens, flops=flops, weight_bytes=weight_bytes)
    with torch.inference_mode():
        ref = native.torch_reference(x, jobs, torch.zeros(total, args.hidden))
    out = torch.zeros(total, args.hidden)
    modes = [("amx", args.amx_min_tokens)] + ([] if args.no_vector else [("vector", 0)])
    for path, threshold in modes:
        lane.configure(amx_min_tokens=threshold)
        seconds = _time(functools.partial(lane.run, x, jobs, out), args.steps)
        stats = lane.last_stats()
        out.zero_()
        lane.run(x, jobs, out)
        err = float((out - ref).abs().max())
        row(path, seconds, stats=stats, diff=f"{err:>9.2e} {err / float(ref.abs().max()):>8.1e}")
    lane.configure(amx_min_tokens=native.DEFAULT_AMX_MIN_TOKENS)
    if not args.no_torch:
        with torch.inference_mode():
            seconds = _time(functools.partial(_torch_step, kernels, routes, x, out), args.steps)
        row("torch", seconds)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for flag, default, text in (
        ("--hidden", 4096, "hidden size H (Mixtral's)"),
        ("--inter", 14336, "intermediate size I (Mixtral's)"),
        ("--experts", 2, "experts per step"),
    ):
        parser.add_argument(flag, type=int, default=default, help=text)
    parser.add_argument("--tiny", action="store_true", help="H 256, I 512: a smoke run of seconds")
    parser.add_argument(
        "--tokens", default="32,128,512", help="tokens routed to each expert, comma-separated"
    )
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="threads (default: all cores)"
    )
    parser.add_argument("--steps", type=int, default=3, help="timed steps per cell (median)")
    parser.add_argument("--no-vector", action="store_true", help="skip the lane's vector path (slow at 512)")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch column")
    parser.add_argument(
        "--amx-min-tokens", type=int, default=native.DEFAULT_AMX_MIN_TOKENS, help="the amx column's threshold"
    )
    args = parser.parse_args(argv)
    if args.tiny:
        args.hidden, args.inter = 256, 512

    library = native.load()
    experts = _experts(args.experts, args.hidden, args.inter)
    kernels = [CpuExpertKernel(gu, dn, F.silu, "linear") for gu, dn in experts]
    weight_bytes = sum(gu.nbytes + dn.nbytes for gu, dn in experts)
    torch.set_num_threads(args.threads)
    lane = native.NativeExpertLane(args.threads, library=library)
    print(
        f"# {args.experts} experts H={args.hidden} I={args.inter} bf16, {weight_bytes / 1e6:.0f} MB of weights a "
        f"step; {args.threads} threads; isa {library.isa}; AMX usable: {library.amx} "
        f"(amx_min_tokens {lane.amx_min_tokens}); torch {torch.__version__}"
    )
    print(
        f"{'tokens':>6} {'path':>7} {'ms':>9} {'TFLOP/s':>8} {'GB/s':>7} {'p1 ms':>7} {'p2 ms':>7} "
        f"{'amx jobs':>8} {'max diff':>9} {'of max':>8}"
    )
    for tokens in _ints(args.tokens):
        _bench_tokens(args, lane, experts, kernels, tokens)
    lane.close()


if __name__ == "__main__":
    main()
