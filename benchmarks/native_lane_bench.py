"""Weight-read throughput of the native CPU expert lane (one call per layer step) against the torch path.

    PYTHONPATH=. python3 benchmarks/native_lane_bench.py            # Mixtral-shaped experts, bf16
    PYTHONPATH=. python3 benchmarks/native_lane_bench.py --tiny     # seconds: a smoke run

One "step" is what the CPU lane does for one MoE layer: ``--experts`` experts (H x I gate, up and down
matrices each), each with the step's tokens routed to it and a routing weight per token, added into one fp32
output. GB/s counts the weight bytes read per step (3 * H * I * element size per expert) over the step's
wall time. Steps rotate over ``--sets`` groups of experts so that the weights come from DRAM, not the last
level cache (a Xeon's L3 holds 300 MiB or more: the default keeps >= 2 GiB of weights in rotation).

Columns: ``native`` = :class:`hf_hybrid.kernels.native.NativeExpertLane`; ``torch`` = the per-expert torch
ops the CPU lane used before (linear, chunk, silu, mul, linear, mul, index_add), with the same thread count;
``read`` = a plain multi-threaded read of a large buffer by torch (``sum``), a rough reference only (the
kernel beats it on the Xeon below); ``p1``/``p2`` = the last call's gate/up and down phases.

Measured on a 16-core Xeon with AVX-512 BF16 (DRAM reads about 126 GB/s), 16 threads, defaults:
121/117/113/80/49/24 GB/s for 1/2/4/8/16/32 tokens per expert, the torch ops 53/51/36/36/36/46 GB/s. Past
about 16 tokens the kernel is compute-bound and torch's oneDNN GEMMs catch up.
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


def _experts(
    count: int, hidden: int, inter: int, dtype: torch.dtype
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for i in range(count):
        gen = torch.Generator().manual_seed(i)
        gate_up = (torch.randn(2 * inter, hidden, generator=gen) * 0.02).to(dtype)
        down = (torch.randn(hidden, inter, generator=gen) * 0.02).to(dtype)
        out.append((gate_up, down))
    return out


def _torch_step(x, experts, routes, out) -> None:
    for (gate_up, down), (tok, w) in zip(experts, routes):
        xs = x[tok]
        gate, up = F.linear(xs, gate_up).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down) * w[:, None]
        out.index_add_(0, tok, y.float())


def _native_step(lane, groups, routes, x, out, i: int) -> None:
    jobs = [
        native.ExpertJob(gu, dn, tokens=tok, weights=w)
        for (gu, dn), (tok, w) in zip(groups[i % len(groups)], routes)
    ]
    lane.run(x, jobs, out)


def _torch_rotating(groups, routes, x, out, i: int) -> None:
    _torch_step(x, groups[i % len(groups)], routes, out)


def _time(fn, steps: int, warmup: int) -> float:
    """Median seconds of one call of ``fn(step_index)``."""
    for i in range(warmup):
        fn(i)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        fn(warmup + i)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _read_ceiling(gib: float, threads: int) -> float:
    """GB/s of torch summing a large fp32 buffer with ``threads`` threads (a rough DRAM read ceiling)."""
    n = int(gib * 2**30) // 4
    buf = torch.ones(n, dtype=torch.float32)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        seconds = _time(lambda i: buf.sum(), steps=5, warmup=1)
    finally:
        torch.set_num_threads(before)
    return buf.nbytes / seconds / 1e9


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _call_latency(lane: native.NativeExpertLane, calls: int = 2000) -> float:
    """Microseconds of one call with a tiny job and every thread taking part (wake-up, barrier, done)."""
    gate_up = torch.zeros(2 * 64, 64, dtype=torch.bfloat16)
    down = torch.zeros(64, 64, dtype=torch.bfloat16)
    x = torch.zeros(1, 64, dtype=torch.bfloat16)
    out = torch.zeros(1, 64)
    jobs = [native.ExpertJob(gate_up, down)]
    lane.configure(min_bytes_per_thread=0)
    try:
        return _time(lambda i: lane.run(x, jobs, out), steps=calls, warmup=50) * 1e6
    finally:
        lane.configure(min_bytes_per_thread=256 * 1024)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="small shapes and few steps (a smoke run)")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--inter", type=int, default=14336)
    parser.add_argument("--experts", type=int, default=2, help="experts per step")
    parser.add_argument("--tokens", default="1,2,4,8", help="tokens routed to each expert, comma-separated")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--threads", default=str(os.cpu_count() or 1), help="thread counts, comma-separated")
    parser.add_argument("--sets", type=int, default=0, help="expert groups in rotation (0: enough for 2 GiB)")
    parser.add_argument("--steps", type=int, default=0, help="timed steps per row (0: 20, or 5 with --tiny)")
    parser.add_argument("--variant", choices=("native", "avx2", "scalar"), default="native")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch column")
    parser.add_argument(
        "--prefetch", default="1024", help="software prefetch distances in bytes, comma-separated"
    )
    parser.add_argument("--dpbf16", default="0", help="VDPBF16PS off/on (0,1), where compiled in")
    parser.add_argument("--barrier-spin-us", default="50", help="spin before sleeping at the phase barrier")
    parser.add_argument(
        "--short-row",
        default="16384",
        help="rows of at most this many bytes prefetched a pass ahead (0: none)",
    )
    args = parser.parse_args(argv)

    if args.tiny:
        args.hidden, args.inter = 256, 512
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    esz = 2 if dtype == torch.bfloat16 else 4
    step_bytes = 3 * args.hidden * args.inter * esz * args.experts
    sets = args.sets or (2 if args.tiny else max(2, -(-(2 * 2**30) // step_bytes)))
    steps = args.steps or (5 if args.tiny else 20)
    token_counts = _ints(args.tokens)
    configs = [
        {"prefetch_bytes": pf, "dpbf16": bool(dp), "barrier_spin_us": spin, "short_row_bytes": short}
        for pf in _ints(args.prefetch)
        for dp in _ints(args.dpbf16)
        for spin in _ints(args.barrier_spin_us)
        for short in _ints(args.short_row)
    ]

    flags = {"native": None, "avx2": native.AVX2_FLAGS, "scalar": native.SCALAR_FLAGS}[args.variant]
    library = native.load(flags)
    groups = [_experts(args.experts, args.hidden, args.inter, dtype) for _ in range(sets)]
    thread_counts = _ints(args.threads)
    read = _read_ceiling(0.25 if args.tiny else 2.0, max(thread_counts))
    print(
        f"# {args.experts} experts H={args.hidden} I={args.inter} {args.dtype}, {step_bytes / 1e6:.1f} MB of "
        f"weights a step, {sets} groups in rotation; isa {library.isa}; torch sum reads {read:.1f} GB/s "
        f"with {max(thread_counts)} threads"
    )
    print(
        f"{'threads':>7} {'prefetch':>8} {'short':>6} {'dpbf16':>6} {'spin':>5} {'tokens':>6} {'native ms':>10} "
        f"{'native GB/s':>12} {'% of read':>10} {'p1 ms':>6} {'p2 ms':>6} {'torch ms':>9} {'torch GB/s':>11}"
    )
    for threads in thread_counts:
        lane = native.NativeExpertLane(threads, library=library)
        torch.set_num_threads(threads)
        torch_ms: dict[int, float] = {}
        for config in configs:
            lane.configure(**config)
            for tokens in token_counts:
                # each expert gets `tokens` of the step's rows, overlapping the way top-2 routing spreads a batch
                total = 2 * tokens if args.experts > 1 else tokens
                gen = torch.Generator().manual_seed(tokens)
                x = (torch.randn(total, args.hidden, generator=gen) * 0.5).to(dtype)
                routes = []
                for e in range(args.experts):
                    tok = (torch.arange(tokens) + e * tokens // 2) % total
                    routes.append((tok.to(torch.int64), torch.rand(tokens, generator=gen).to(dtype)))
                out = torch.zeros(total, args.hidden)

                native_step = functools.partial(_native_step, lane, groups, routes, x, out)
                torch_step = functools.partial(_torch_rotating, groups, routes, x, out)

                seconds = _time(native_step, steps, warmup=min(sets, 3))
                if not args.no_torch and tokens not in torch_ms:
                    with torch.inference_mode():
                        torch_ms[tokens] = _time(torch_step, steps, warmup=min(sets, 3)) * 1e3
                stats = lane.last_stats()
                gbs = step_bytes / seconds / 1e9
                row = (
                    f"{threads:>7} {config['prefetch_bytes']:>8} {config['short_row_bytes']:>6} "
                    f"{int(config['dpbf16']):>6} "
                    f"{config['barrier_spin_us']:>5} {tokens:>6} {seconds * 1e3:>10.3f} {gbs:>12.1f} "
                    f"{100 * gbs / read:>9.0f}% {stats['phase1_us'] / 1e3:>6.2f} {stats['phase2_us'] / 1e3:>6.2f}"
                )
                if tokens in torch_ms:
                    row += f" {torch_ms[tokens]:>9.3f} {step_bytes / torch_ms[tokens] / 1e6:>11.1f}"
                print(row, flush=True)
        print(f"# {threads} threads: a call with a tiny job takes {_call_latency(lane):.1f} us", flush=True)
        lane.close()


if __name__ == "__main__":
    main()
