"""Does the CPU lane read weights slower from pinned (page-locked) memory than from ordinary memory?

    PYTHONPATH=. python3 benchmarks/cpu_lane_memory.py

The executor's host arenas are pinned so that they can be streamed by DMA; the profile measures the CPU
kernel on ordinary tensors. This times the same bf16 GEMV (one token, gate/up then down of Mixtral-sized
experts, several experts in turn so the weights come from DRAM) in a worker thread with the CPU lane's
thread count, on ordinary and on pinned weights, with ``F.linear`` and with oneDNN-packed copies.
"""

from __future__ import annotations

# first, before torch: hf_hybrid sets OMP_WAIT_POLICY=PASSIVE, which OpenMP reads once, when torch loads it
import hf_hybrid  # noqa: F401

# isort: split

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

from hf_hybrid.kernels.cpu import CpuExpertKernel, available_methods
from hf_hybrid.lanes import fix_thread_count


def _experts(count: int, hidden: int, inter: int, pin: bool):
    out = []
    for i in range(count):
        gen = torch.Generator().manual_seed(i)
        gate_up = (torch.randn(2 * inter, hidden, generator=gen) * 0.02).to(torch.bfloat16)
        down = (torch.randn(hidden, inter, generator=gen) * 0.02).to(torch.bfloat16)
        if pin:
            gate_up, down = gate_up.pin_memory(), down.pin_memory()
        out.append((gate_up, down))
    return out


def _rate(kernels, x, seconds: float = 1.5) -> float:
    for k in kernels:
        k(x)
    done = passes = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for k in kernels:
            k(x)
            done += k.weight_bytes
        passes += 1
    return done / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--inter", type=int, default=14336)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=1.5, help="timing per row")
    args = parser.parse_args()
    hidden, inter, count = args.hidden, args.inter, args.experts
    threads = max(1, torch.get_num_threads() - (1 if torch.cuda.is_available() else 0))
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    print("transparent hugepages:", thp.read_text().strip() if thp.exists() else "unknown")
    print(f"threads: {threads} in a worker thread; {count} experts of {hidden}x{inter}")
    x = torch.randn(1, hidden).to(torch.bfloat16)
    rows = []
    for pin in (False, True):
        if pin and not torch.cuda.is_available():
            continue
        experts = _experts(count, hidden, inter, pin)
        for method in available_methods(torch.bfloat16):
            kernels = [CpuExpertKernel(gu, d, F.silu, method) for gu, d in experts]
            with ThreadPoolExecutor(max_workers=1) as pool:
                pool.submit(fix_thread_count, threads).result()
                with torch.inference_mode():
                    rate = pool.submit(_rate, kernels, x, args.seconds).result()
            rows.append((("pinned" if pin else "ordinary"), method, rate))
            del kernels
        del experts
    print("| weights | method | GB/s |\n|---|---|---|")
    for weights, method, rate in rows:
        print(f"| {weights} | {method} | {rate:.1f} |")


if __name__ == "__main__":
    main()
