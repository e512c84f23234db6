"""Host time the feeding thread spends issuing one streamed expert of a one-token decode step (CUDA only).

    PYTHONPATH=. python3 benchmarks/streamed_issue.py [--experts 48 --slots 6]

What the executor's ``_stream`` does per expert, alone: fetch the expert's pinned bytes into a staging slot
(a copy on the copy lane), make the GPU lane wait for it, replay the expert's recorded CUDA graph, release the
slot. Qwen3-MoE expert shapes (hidden 2048, intermediate 768, bf16). Every fetch misses (more experts than
slots), so each one issues its copy. Prints the median and best of 15 blocks, microseconds per expert. Run it
with ``PYTHONPATH`` pointing at another checkout to compare two versions on one machine.

``--cpu-load`` measures it a second time while the native CPU lane (all cores but one, as in a decode step)
computes experts from host memory beside it, as it does in the benchmark's decode steps: whether the CPU
lane's DRAM traffic or its threads slow the feeding thread's issuing.
"""

from __future__ import annotations

# first, before torch: hf_hybrid sets OMP_WAIT_POLICY=PASSIVE, which OpenMP reads once, when torch loads it
import hf_hybrid  # noqa: F401

# isort: split

import argparse
import statistics
import threading
import time

import torch
import torch.nn.functional as F

from hf_hybrid.expert_graphs import ExpertGraphs
from hf_hybrid.lanes import DeviceLanes
from hf_hybrid.staging import StagingRing
from hf_hybrid.weights import carve, layout_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=48)
    parser.add_argument("--slots", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=768)
    parser.add_argument(
        "--cpu-load", action="store_true", help="measure again with the native CPU lane computing beside it"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    dev, dtype = torch.device("cuda"), torch.bfloat16
    lanes = DeviceLanes(dev)
    shapes = ((2 * args.intermediate, args.hidden), (args.hidden, args.intermediate))
    nbytes = layout_bytes(list(shapes), dtype)
    regions = [
        torch.randn(nbytes // 2, dtype=dtype).view(torch.uint8).pin_memory() for _ in range(args.experts)
    ]
    ring = StagingRing(lanes, nbytes, args.slots)
    graphs = ExpertGraphs(lanes, capture=True)
    hidden = torch.randn(1, args.hidden, device=dev, dtype=dtype)
    weights = torch.rand(8, device=dev, dtype=dtype)

    def issue(i: int) -> None:
        if hasattr(ring, "fetch_carved"):
            (gate_up, down), ready, _ = ring.fetch_carved(("L", i), regions[i], shapes, dtype)
        else:  # versions before the slots kept their typed views
            view, ready, _ = ring.fetch(("L", i), regions[i])
            gate_up, down = carve(view, list(shapes), dtype)
        lanes.wait(ready)
        graphs.whole(gate_up, down, F.silu, weights[1:2, None])
        ring.release(("L", i))

    def measure() -> list[float]:
        blocks = []
        for _ in range(15):
            started = time.perf_counter()
            for i in range(args.experts):
                issue(i)
            blocks.append((time.perf_counter() - started) / args.experts)
            torch.cuda.synchronize()
        return blocks

    with torch.inference_mode():
        graphs.begin(hidden, dtype)
        for _ in range(3):  # warm-up: graphs recorded, kernels chosen
            for i in range(args.experts):
                issue(i)
        torch.cuda.synchronize()
        blocks = measure()
        loaded = _beside_cpu_lane(measure, args.hidden, args.intermediate) if args.cpu_load else None
    line = (
        f"issue per streamed expert: median {statistics.median(blocks) * 1e6:.1f} us, best "
        f"{min(blocks) * 1e6:.1f} us ({graphs.replays} replays, {graphs.captures} graphs recorded)"
    )
    if loaded is not None:
        times, rate = loaded
        line += (
            f"; beside the CPU lane: median {statistics.median(times) * 1e6:.1f} us, best "
            f"{min(times) * 1e6:.1f} us (lane at {rate:.0f} GB/s)"
        )
    print(line)


def _beside_cpu_lane(measure, hidden: int, intermediate: int, experts: int = 96) -> tuple[list[float], float]:
    """``measure()`` while the native CPU lane computes one-token steps of ``experts`` host experts (96:
    about 0.9 GiB at Qwen3-MoE sizes, more than any cache) in a loop; returns its result and the lane's
    GB/s."""
    from hf_hybrid.kernels.native import ExpertJob, NativeExpertLane
    from hf_hybrid.lanes import cpu_lane_threads

    experts = [
        (
            torch.randn(2 * intermediate, hidden, dtype=torch.bfloat16),
            torch.randn(hidden, intermediate).bfloat16(),
        )
        for _ in range(experts)
    ]
    jobs = [ExpertJob(gate_up, down) for gate_up, down in experts]
    x, out = torch.randn(1, hidden, dtype=torch.bfloat16), torch.zeros(1, hidden)
    step_bytes = sum(g.numel() * 2 + d.numel() * 2 for g, d in experts)
    lane = NativeExpertLane(cpu_lane_threads(is_cuda=True))
    stop, seconds, steps = threading.Event(), [0.0], [0]

    def compute() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            lane.run(x, jobs, out)  # releases the interpreter lock while it computes
            seconds[0] += time.perf_counter() - started
            steps[0] += 1

    worker = threading.Thread(target=compute, daemon=True)
    worker.start()
    try:
        time.sleep(0.2)  # the lane at its pace before the measurement
        times = measure()
    finally:
        stop.set()
        worker.join()
        lane.close()
    return times, step_bytes * steps[0] / seconds[0] / 1e9 if seconds[0] else 0.0


if __name__ == "__main__":
    main()
