"""Measuring the machine: DRAM, the CPU expert kernel per token count, pinned copies, the CPU lane with
copies running, and the accelerator; and the per-machine cache of the result.

The CPU lane and the copy lane are driven through :mod:`hf_hybrid.lanes`, exactly as the executor runs
them, so the profile measures what a layer step will get.

Longer than most modules (about 570 lines): each measurement is a few short functions whose comments
record what was measured on which machine and why it is done this way; splitting them would scatter that.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.utils import logging
from transformers.utils.logging import tqdm

from .devices import default_device_name, resolve_device
from .expert_graphs import ExpertGraphs
from .kernels.cpu import CpuExpertKernel, available_methods, gated_mlp, pick_methods
from .kernels.native import available as native_available
from .lanes import CpuLane, DeviceLanes, cpu_lane_threads, run_with_copies, time_device, time_h2d
from .profile import (
    LANE_GEMM_TOKENS,
    PROFILE_FORMAT,
    TOKEN_COUNTS,
    HardwareProfile,
    _read_cache,
    _write_cache,
    format_profile,
)
from .system import cache_root, cpu_model, meminfo

logger = logging.get_logger(__name__)

_MiB = 1 << 20
_GiB = 1 << 30


@dataclass(frozen=True)
class _Plan:
    """Sizes and time budgets of one measurement run."""

    hidden: int  # expert shape: gate_up [2*inter, hidden], down [hidden, inter]
    inter: int
    rotation_bytes: int  # weights cycled through per pass, several times L3 so reads come from DRAM
    dram_bytes: int  # buffer of the DRAM read test
    copy_bytes: int  # one host->device (or host->host) copy
    min_time: float  # seconds spent per timed item at least
    min_passes: int
    overlap_time: float  # seconds the CPU kernel runs while copies are in flight
    copies_per_wait: int  # 64 MiB copies queued per blocking wait in the overlap test
    gpu_gemv_bytes: int
    gpu_gemm_n: int
    gpu_reps: int


def _l3_bytes() -> int:
    """Size of the largest CPU cache (sysfs), 32 MiB when unknown."""
    best = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip().upper()
            units = {"K": 1 << 10, "M": _MiB, "G": _GiB}
            size = int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
            best = max(best, size)
        except (OSError, ValueError, IndexError):
            continue
    return best or 32 * _MiB


def _available_ram() -> int:
    """Bytes of RAM available now (MemAvailable), falling back to free pages, then 8 GiB."""
    available = meminfo("MemAvailable")
    if available is not None:
        return available
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 * _GiB


def _make_plan(quick: bool) -> _Plan:
    l3 = _l3_bytes()
    ram = _available_ram()
    if quick:
        # small Llama-like expert (17 MB in bf16); rotation still several times L3 so DRAM is read
        return _Plan(
            hidden=1024,
            inter=2816,
            # capped: a server's L3 can be 300 MiB, and quick must stay quick
            rotation_bytes=min(max(2 * l3, 64 * _MiB), 512 * _MiB, ram // 16),
            dram_bytes=min(max(2 * l3, 256 * _MiB), _GiB, ram // 16),
            copy_bytes=32 * _MiB,
            min_time=0.02,
            min_passes=2,
            overlap_time=0.1,
            copies_per_wait=4,
            gpu_gemv_bytes=256 * _MiB,
            gpu_gemm_n=4096,
            gpu_reps=5,
        )
    # Mixtral-sized expert (4096 x 14336, 352 MB in bf16): the shape class the CPU lane runs in practice
    return _Plan(
        hidden=4096,
        inter=14336,
        rotation_bytes=min(max(4 * l3, _GiB), ram // 8),
        dram_bytes=min(max(8 * l3, 2 * _GiB), ram // 8),
        copy_bytes=256 * _MiB,
        min_time=0.25,
        min_passes=3,
        overlap_time=0.6,
        # H100 host, CPU lane busy: 2 x 64 MiB per wait gave 33 GB/s of H2D, 8 x 64 MiB 44-47 GB/s,
        # 32 x 64 MiB 49 GB/s, at the same CPU rate: each wake-up costs, so queue deep before waiting
        copies_per_wait=8,
        gpu_gemv_bytes=_GiB,
        gpu_gemm_n=8192,
        gpu_reps=20,
    )


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return value


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_device(device: str) -> torch.device:
    return resolve_device(device)


def _timed_median(fns: Sequence[Callable[[], object]], min_time: float, min_calls: int) -> float:
    """Median seconds of one call, cycling through ``fns``, over ``min_calls`` calls and ``min_time`` seconds.

    The median, not the best: a single lucky or unlucky call must not decide which kernel wins. Cycling
    through several experts' kernels keeps their weights out of cache. Slow items (compute-bound GEMMs)
    stop after 2 calls once 4 * ``min_time`` passed, which bounds the run on small machines.
    """
    max_calls = 50 * max(len(fns), min_calls)
    times: list[float] = []
    start = time.perf_counter()

    def more() -> bool:
        n, elapsed = len(times), time.perf_counter() - start
        if n < 2 or elapsed < min_time:
            return n < max_calls
        return n < min_calls and elapsed < 4 * min_time

    while more():
        fn = fns[len(times) % len(fns)]
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _measure_dram(plan: _Plan) -> float:
    # a reduction reads every byte once and writes nothing, so it is the plain DRAM read rate
    buf = torch.ones(plan.dram_bytes // 4, dtype=torch.float32)
    buf.sum()  # warm-up: page faults are already paid by ones(), this warms the thread pool
    seconds = _timed_median([buf.sum], plan.min_time, max(3, plan.min_passes))
    return buf.nbytes / seconds


def _make_experts(plan: _Plan, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    expert_bytes = 3 * plan.hidden * plan.inter * torch.empty((), dtype=dtype).element_size()
    count = max(2, math.ceil(plan.rotation_bytes / expert_bytes))
    gen = torch.Generator().manual_seed(0)
    experts = []
    for _ in range(count):
        # small values: no overflow, and no denormals (which would slow fp32 kernels and skew the rate)
        gate_up = (torch.randn(2 * plan.inter, plan.hidden, generator=gen) * 0.02).to(dtype)
        down = (torch.randn(plan.hidden, plan.inter, generator=gen) * 0.02).to(dtype)
        experts.append((gate_up, down))
    return experts


def _cpu_pass(kernels: list[CpuExpertKernel], x: torch.Tensor) -> None:
    for kernel in kernels:
        kernel(x)


def _measure_cpu_kernels(
    plan: _Plan, experts, dtype: torch.dtype, bar
) -> tuple[dict[int, dict[str, float]], dict[int, dict[str, float]], dict[str, list[CpuExpertKernel]]]:
    """Weight-read rate and FLOP rate of every available method per token count."""
    bw: dict[int, dict[str, float]] = {m: {} for m in TOKEN_COUNTS}
    flops: dict[int, dict[str, float]] = {m: {} for m in TOKEN_COUNTS}
    kernels_by_method: dict[str, list[CpuExpertKernel]] = {}
    gen = torch.Generator().manual_seed(1)
    inputs = {m: torch.randn(m, plan.hidden, generator=gen).to(dtype) for m in TOKEN_COUNTS}
    for method in available_methods(dtype):
        kernels = [CpuExpertKernel(gu, d, F.silu, method) for gu, d in experts]
        if any(k.method_for(1) != method for k in kernels):
            # packing failed after all (warned by the kernel): its numbers would be linear's twice over
            bar.update(len(TOKEN_COUNTS))
            continue
        kernels_by_method[method] = kernels
    # token count outermost, methods innermost: a slow spell of the machine (other load, clock changes)
    # then hits all methods of one token count alike instead of deciding the race
    for m in TOKEN_COUNTS:
        x = inputs[m]
        for method, kernels in kernels_by_method.items():
            bar.set_postfix_str(f"CPU {method} m={m}")
            kernels[0](x)  # warm-up: oneDNN/MKL create and JIT the primitive for this shape on first use
            calls = [functools.partial(k, x) for k in kernels]
            seconds = _timed_median(calls, plan.min_time, plan.min_passes * len(kernels))
            bw[m][method] = kernels[0].weight_bytes / seconds  # all experts have one shape
            flops[m][method] = kernels[0].flops(m) / seconds
            bar.update(1)
    return bw, flops, kernels_by_method


def _measure_copy_cpu(plan: _Plan) -> float:
    src = torch.ones(plan.copy_bytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch of dst
    seconds = _timed_median([functools.partial(dst.copy_, src)], plan.min_time, max(3, plan.min_passes))
    return src.nbytes / seconds


def _measure_h2d_cuda(plan: _Plan, lanes: DeviceLanes) -> float:
    return time_h2d(lanes, plan.copy_bytes, max(3, plan.min_passes + 2))


def _measure_overlap(
    plan: _Plan,
    lanes: DeviceLanes,
    cpu_lane: CpuLane,
    kernels: list[CpuExpertKernel],
    cpu_pass_seconds: float,
    tokens: int = 1,
    copies: bool = True,
) -> tuple[float, float]:
    """(CPU-lane seconds per pass over ``kernels`` at ``tokens`` tokens, copy rate) -- with copies running.

    The CPU kernel runs on the CPU lane with the executor's thread count, as the executor runs it; the
    calling thread only issues copies and waits on blocking events (or, with ``copies=False``, just
    waits). Spin-waiting here (``event.query()`` loops, ``synchronize()`` on non-blocking events) steals a
    core from the CPU lane: measured 60 -> 15-33 GB/s on a 16-core Xeon, and 29 -> 9 GB/s for an
    ``event.query()`` loop on the H100 test host.
    """
    x = torch.randn(tokens, kernels[0].hidden_size).to(kernels[0].gate_up.dtype)
    passes = max(2, math.ceil(plan.overlap_time / max(cpu_pass_seconds, 1e-6)))
    return run_with_copies(
        lanes,
        cpu_lane,
        warm_up=functools.partial(_cpu_pass, kernels, x),
        cpu_work=functools.partial(_cpu_pass, kernels, x),
        passes=passes,
        chunk_bytes=min(plan.copy_bytes, 64 * _MiB),
        copies_per_wait=plan.copies_per_wait,
        copies=copies,
    )


#: Token counts the native lane is measured at (the decode-sized jobs it runs; see cpu_kernels.NATIVE_MAX_TOKENS)
NATIVE_TOKEN_COUNTS = tuple(m for m in TOKEN_COUNTS if m <= 16)


@dataclass
class _NativeRates:
    """What :func:`_measure_native` found (empty/None where the native kernel is unavailable)."""

    bw: dict[int, float] = field(default_factory=dict)  # weight-read rate per decode-sized token count
    bw_during_copy: float | None = None  # at 1 token while copies run
    h2d_during: float | None = None  # the copies' rate meanwhile
    gemm_flops: float | None = None  # a prefill-sized job on AMX tiles, alone (None without AMX)
    gemm_flops_during_copy: float | None = None


def _measure_native(
    plan: _Plan, lanes: DeviceLanes, cpu_lane: CpuLane, experts, dtype: torch.dtype, library=None
) -> _NativeRates:
    """The native CPU lane as the executor runs it: one call per step over all experts, from the CPU-lane
    thread: decode-sized steps (alone, and at 1 token while copies run), and where the lane has AMX tiles
    a prefill-sized step of ``LANE_GEMM_TOKENS`` tokens per expert (alone and while copies run), the jobs
    the executor then gives it. ``library``: a loaded build (tests), default the machine's own."""
    from .kernels import native

    if not native.supports(dtype, F.silu):
        return _NativeRates()
    lane = native.NativeExpertLane(cpu_lane.threads, library=library)
    try:
        # two experts a step (top-2), rotating over the rest so that weights come from DRAM
        steps = [experts[i : i + 2] for i in range(0, len(experts) - 1, 2)] or [experts]
        step_bytes = sum(gu.nbytes + d.nbytes for gu, d in steps[0])
        rates = {
            m: step_bytes / _decode_calls(plan, lane, steps, m, dtype).seconds_alone(cpu_lane, plan)
            for m in NATIVE_TOKEN_COUNTS
        }
        calls = _decode_calls(plan, lane, steps, 1, dtype)
        per_call, h2d = calls.seconds_with_copies(lanes, cpu_lane, plan, step_bytes / rates[1])
        found = _NativeRates(rates, step_bytes / per_call, h2d)
        if lane.amx and dtype == torch.bfloat16:
            # a prefill-sized step on AMX tiles: the jobs the executor then gives this lane
            m = LANE_GEMM_TOKENS
            step_flops = sum(2 * m * (gu.numel() + d.numel()) for gu, d in steps[0])
            found.gemm_flops = step_flops / _native_steps_alone(plan, cpu_lane, lane, steps, m, dtype)
            per_pass, _ = _native_steps_with_copies(
                plan, lanes, cpu_lane, lane, steps, m, dtype, step_flops * len(steps) / found.gemm_flops
            )
            found.gemm_flops_during_copy = step_flops * len(steps) / per_pass
        return found
    finally:
        lane.close()


#: The pause between two native calls of decode steps as the profile makes them: between layer steps the
#: lane's threads sleep ~1 ms (the feeding thread runs the next attention and routing; H200 trace of S1),
#: and each call then pays their wake-up. Calls made back to back read ~10-25% faster than the lane does
#: inside decode steps (H200 machine: 134 against 102-111 GB/s), and the planner then predicted decode
#: 10-21% high.
DECODE_CALL_GAP_S = 1e-3


class _DecodeCalls:
    """Native-lane calls made as decode steps make them: one call per step over its experts, started from
    the calling thread and waited for (``NativeExpertLane.start``/``wait``, the executor's path), a pause
    of :data:`DECODE_CALL_GAP_S` after each. Times are the calls' own (the pool's clock around each), as
    the executor counts the CPU lane's time."""

    def __init__(self, lane, packed: list) -> None:
        self.lane = lane
        self.packed = packed
        self.seconds = 0.0
        self.calls = 0

    def one_pass(self) -> None:
        for packed in self.packed:
            self.lane.start(packed, zero_out=True)
            _, started, ended = self.lane.wait()
            self.seconds += ended - started
            self.calls += 1
            time.sleep(DECODE_CALL_GAP_S)

    def _reset(self) -> None:
        self.seconds, self.calls = 0.0, 0

    def seconds_alone(self, cpu_lane: CpuLane, plan: _Plan) -> float:
        """Mean seconds of one call, from the CPU-lane thread, over ``plan.min_time`` of calls."""

        def run() -> float:
            self.one_pass()  # warm-up
            self._reset()
            while self.seconds < plan.min_time or self.calls < plan.min_passes * len(self.packed):
                self.one_pass()
            return self.seconds / self.calls

        return cpu_lane.run(run)

    def seconds_with_copies(
        self, lanes: DeviceLanes, cpu_lane: CpuLane, plan: _Plan, call_s: float
    ) -> tuple[float, float]:
        """(mean seconds of one call, the copies' rate) with PCIe copies running meanwhile; ``call_s``: a
        call's time alone, which sizes the run to ``plan.overlap_time``."""

        def warm_up() -> None:
            self.one_pass()
            self._reset()

        pass_s = len(self.packed) * (call_s + DECODE_CALL_GAP_S)
        _, h2d = run_with_copies(
            lanes,
            cpu_lane,
            warm_up=warm_up,
            cpu_work=self.one_pass,
            passes=max(2, math.ceil(plan.overlap_time / pass_s)),
            chunk_bytes=min(plan.copy_bytes, 64 * _MiB),
            copies_per_wait=plan.copies_per_wait,
        )
        return self.seconds / self.calls, h2d


def _decode_calls(plan: _Plan, lane, steps, tokens: int, dtype: torch.dtype) -> _DecodeCalls:
    from .kernels.native import ExpertJob

    x = torch.randn(tokens, plan.hidden).to(dtype)
    out = torch.zeros(tokens, plan.hidden)
    return _DecodeCalls(lane, [lane.pack(x, [ExpertJob(gu, d) for gu, d in step], out) for step in steps])


def _native_step_calls(plan: _Plan, lane, steps, tokens: int, dtype: torch.dtype) -> list:
    """One native-lane call per step, every expert of the step on ``tokens`` random activation rows."""
    from .kernels.native import ExpertJob

    x = torch.randn(tokens, plan.hidden).to(dtype)
    out = torch.zeros(tokens, plan.hidden)
    return [functools.partial(lane.run, x, [ExpertJob(gu, d) for gu, d in step], out) for step in steps]


def _native_steps_alone(
    plan: _Plan, cpu_lane: CpuLane, lane, steps, tokens: int, dtype: torch.dtype
) -> float:
    """Median seconds of one native-lane step at ``tokens`` tokens per expert, from the CPU-lane thread."""
    calls = _native_step_calls(plan, lane, steps, tokens, dtype)
    return cpu_lane.run(lambda: _timed_median(calls, plan.min_time, plan.min_passes))


def _native_steps_with_copies(
    plan: _Plan, lanes: DeviceLanes, cpu_lane: CpuLane, lane, steps, tokens: int, dtype, pass_s: float
) -> tuple[float, float]:
    """(seconds per pass over every step, the copies' rate) with PCIe copies running meanwhile; ``pass_s``:
    a pass's time alone, which sizes the run to ``plan.overlap_time``."""
    calls = _native_step_calls(plan, lane, steps, tokens, dtype)

    def one_pass() -> None:
        for call in calls:
            call()

    return run_with_copies(
        lanes,
        cpu_lane,
        warm_up=one_pass,
        cpu_work=one_pass,
        passes=max(2, math.ceil(plan.overlap_time / pass_s)),
        chunk_bytes=min(plan.copy_bytes, 64 * _MiB),
        copies_per_wait=plan.copies_per_wait,
    )


@contextlib.contextmanager
def _closing(cpu_lane: CpuLane):
    try:
        yield cpu_lane
    finally:
        cpu_lane.close()


def _measure_gpu(plan: _Plan, dev: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    """(GEMV weight-read rate, GEMM FLOP rate) of the accelerator in ``dtype``, timed with CUDA events."""
    k = 8192
    n = max(1, plan.gpu_gemv_bytes // (k * torch.empty((), dtype=dtype).element_size()))
    weight = torch.randn(n, k, device=dev, dtype=dtype) * 0.02
    x = torch.randn(1, k, device=dev, dtype=dtype)

    gemv_bw = weight.nbytes / time_device(functools.partial(F.linear, x, weight), plan.gpu_reps)
    del weight  # free it before the GEMM operands are allocated
    size = plan.gpu_gemm_n
    a = torch.randn(size, size, device=dev, dtype=dtype)
    b = torch.randn(size, size, device=dev, dtype=dtype)
    gemm_flops = 2 * size**3 / time_device(lambda: a @ b, plan.gpu_reps)
    return gemv_bw, gemm_flops


#: Shape of the expert :func:`_measure_device_issue` issues (small: the GPU finishes each op before the host
#: has issued the next, so what is timed is the host's issuing, as in a decode step).
_ISSUE_HIDDEN, _ISSUE_INTER, _ISSUE_REPS, _ISSUE_BLOCKS = 1024, 256, 20, 9


def _median_issue_s(lanes: DeviceLanes, issue: Callable[[], None]) -> float:
    """Host seconds one call of ``issue`` takes the feeding thread: the median of a few blocks of calls,
    each block followed by a wait for the device (a preempted block does not count), after a warm-up
    (kernels chosen, allocator blocks cached, graphs recorded)."""
    for _ in range(10):
        issue()
    lanes.synchronize()
    blocks = []
    for _ in range(_ISSUE_BLOCKS):
        started = time.perf_counter()
        for _ in range(_ISSUE_REPS):
            issue()
        blocks.append((time.perf_counter() - started) / _ISSUE_REPS)
        lanes.synchronize()
    return statistics.median(blocks)


def _measure_device_issue(
    lanes: DeviceLanes, dev: torch.device, dtype: torch.dtype
) -> tuple[float, float, float, float]:
    """Host seconds the feeding thread spends issuing one decode-sized expert on the GPU lane: (resident,
    streamed) kernel by kernel, then (resident, streamed) as a one-token step issues a whole expert by
    default. Kernel by kernel: the ops of the executor's device unit (the token's rows and routing weight
    picked out, gate/up, activation, down, weighting, an fp32 ``index_add_`` into the step's sum), as
    multi-token steps and divided experts' GPU rows issue them. One-token: the routing weight copied into
    the expert graphs' static buffer and the expert's recorded CUDA graph replayed
    (:mod:`hf_hybrid.expert_graphs`). A streamed expert also issues its copy into a staging slot and the
    GPU lane's wait for it. This is launch overhead, the same whatever the expert's size (measured on CUDA
    only: on the CPU standing in, issuing is computing)."""
    hidden = torch.randn(1, _ISSUE_HIDDEN, device=dev, dtype=dtype)
    gate_up = torch.randn(2 * _ISSUE_INTER, _ISSUE_HIDDEN, device=dev, dtype=dtype) * 0.02
    down = torch.randn(_ISSUE_HIDDEN, _ISSUE_INTER, device=dev, dtype=dtype) * 0.02
    acc = torch.zeros(1, _ISSUE_HIDDEN, device=dev, dtype=torch.float32)
    rows = torch.zeros(4, dtype=torch.long, device=dev)
    flat_weights = torch.rand(4, device=dev, dtype=dtype)
    source = torch.randn(gate_up.shape, dtype=dtype, pin_memory=lanes.is_cuda) * 0.02
    slot = torch.empty_like(source, device=dev)
    graphs = ExpertGraphs(lanes, capture=lanes.is_cuda)
    # one step's static buffers for every graph issue below: its accumulator only grows (small weights)
    graphs.begin(hidden, dtype)
    weight = flat_weights[1:2, None]

    def device_unit() -> None:
        sel, tok = rows[0:1], rows[1:2]
        y = gated_mlp(hidden[tok], gate_up, down, F.silu) * flat_weights[sel, None]
        acc.index_add_(0, tok, y.float())

    def streamed_unit() -> None:
        lanes.wait(lanes.copy_into(slot, source))
        device_unit()

    def graph_unit() -> None:
        graphs.whole(gate_up, down, F.silu, weight)

    def graph_streamed_unit() -> None:
        lanes.wait(lanes.copy_into(slot, source))
        graphs.whole(slot, down, F.silu, weight)

    try:
        return tuple(
            _median_issue_s(lanes, issue)
            for issue in (device_unit, streamed_unit, graph_unit, graph_streamed_unit)
        )
    finally:
        graphs.clear()


def measure(
    device: str = "cpu", dtype: torch.dtype = torch.bfloat16, *, quick: bool = False, progress: bool = True
) -> HardwareProfile:
    """Measure this machine's rates and return a fully filled :class:`HardwareProfile`.

    Args:
        device: the accelerator, ``"cuda"``/``"cuda:N"``, or ``"cpu"`` when the CPU stands in for it
            (then "copies" are host memcpys and the accelerator rates are the CPU's own).
        dtype: weight dtype the CPU kernels and GPU rates are measured in.
        quick: small sizes and short timings (a few seconds on 2 cores; for tests and CI). Rates are
            rougher and less DRAM-bound than a full run (about 30-60 s on a GPU server).
        progress: show a progress bar (honours ``transformers`` progress-bar settings).

    The CPU expert kernel (:class:`~hf_hybrid.kernels.CpuExpertKernel`) is timed with every available
    method at every token count of ``TOKEN_COUNTS``, on several experts in turn so that the weights come
    from DRAM, not cache. Uses torch's current thread count (``torch.get_num_threads()``).
    """
    dev = _check_device(device)
    dtype = _as_dtype(dtype)
    plan = _make_plan(quick)
    is_cuda = dev.type == "cuda"
    methods = available_methods(dtype)
    steps = 1 + len(methods) * len(TOKEN_COUNTS) + 3 + (2 if is_cuda else 0)
    started = time.perf_counter()
    lanes = DeviceLanes(dev)
    cpu_lane = CpuLane(cpu_lane_threads(is_cuda))
    with (
        torch.inference_mode(),
        tqdm(total=steps, desc="Measuring hardware", disable=not progress) as bar,
        _closing(cpu_lane),
    ):
        bar.set_postfix_str("DRAM read")
        dram_bw = _measure_dram(plan)
        bar.update(1)

        experts = _make_experts(plan, dtype)
        bw, flops, kernels_by_method = _measure_cpu_kernels(plan, experts, dtype, bar)
        kernel = pick_methods(bw)
        gemv_bw = {m: bw[m].get(kernel[m], 0.0) for m in TOKEN_COUNTS}
        gemm_flops = {m: flops[m].get(kernel[m], 0.0) for m in TOKEN_COUNTS}

        bar.set_postfix_str("H2D copy")
        h2d_bw = _measure_h2d_cuda(plan, lanes) if is_cuda else _measure_copy_cpu(plan)
        bar.update(1)

        # the overlap is measured on the decode case (one token), the one streaming overlaps most with
        bar.set_postfix_str("CPU kernel + copy at once")
        decode_kernels = kernels_by_method.get(kernel[1]) or next(iter(kernels_by_method.values()))
        weight_bytes = sum(k.weight_bytes for k in decode_kernels)
        cpu_pass_seconds = weight_bytes / max(gemv_bw[1], 1.0)
        per_pass, h2d_during_cpu = _measure_overlap(plan, lanes, cpu_lane, decode_kernels, cpu_pass_seconds)
        cpu_during_copy = weight_bytes / per_pass
        # the lane alone (its thread and thread count cost something of their own), and a prefill-sized job
        lane_gemv = (
            weight_bytes / _measure_overlap(plan, lanes, cpu_lane, decode_kernels, per_pass, copies=False)[0]
        )
        m = LANE_GEMM_TOKENS
        prefill_kernels = kernels_by_method.get(kernel[m]) or decode_kernels
        flops_per_pass = sum(k.flops(m) for k in prefill_kernels)
        gemm_pass = flops_per_pass / max(gemm_flops[m], 1.0)
        lane_gemm = (
            flops_per_pass
            / _measure_overlap(plan, lanes, cpu_lane, prefill_kernels, gemm_pass, m, copies=False)[0]
        )
        lane_gemm_copy = (
            flops_per_pass / _measure_overlap(plan, lanes, cpu_lane, prefill_kernels, gemm_pass, m)[0]
        )
        bar.update(1)

        bar.set_postfix_str("native CPU lane")
        native_rates = _measure_native(plan, lanes, cpu_lane, experts, dtype)
        bar.update(1)
        del experts, kernels_by_method, decode_kernels, prefill_kernels

        if is_cuda:
            bar.set_postfix_str("device lane issue time")
            issue_resident, issue_streamed, graph_resident, graph_streamed = _measure_device_issue(
                lanes, dev, dtype
            )
            bar.update(1)
            bar.set_postfix_str("GPU GEMV/GEMM")
            with torch.cuda.device(dev):
                gpu_mem_bw, gpu_flops = _measure_gpu(plan, dev, dtype)
            bar.update(1)
        else:
            # the device lane of the CPU standing in is synchronous: issuing is computing, which the cost
            # model prices already
            issue_resident = issue_streamed = graph_resident = graph_streamed = None
            # the CPU is the accelerator: its rates are the best the CPU kernel reached
            gpu_mem_bw = max(gemv_bw.values())
            gpu_flops = max(gemm_flops.values())

    profile = HardwareProfile(
        device=str(device),
        dtype=_dtype_name(dtype),
        cpu_threads=torch.get_num_threads(),
        dram_read_bw=dram_bw,
        cpu_gemv_bw=gemv_bw,
        cpu_gemm_flops=gemm_flops,
        cpu_gemv_bw_during_copy=cpu_during_copy,
        h2d_bw=h2d_bw,
        h2d_bw_during_cpu=h2d_during_cpu,
        gpu_mem_bw=gpu_mem_bw,
        gpu_flops=gpu_flops,
        cpu_kernel=kernel,
        measured=True,
        cpu_method_bw=bw,
        cpu_lane_gemv_bw=lane_gemv,
        cpu_lane_gemm_flops=lane_gemm,
        cpu_lane_gemm_flops_during_copy=lane_gemm_copy,
        cpu_native_bw=native_rates.bw,
        cpu_native_bw_during_copy=native_rates.bw_during_copy,
        h2d_bw_during_native=native_rates.h2d_during,
        cpu_native_gemm_flops=native_rates.gemm_flops,
        cpu_native_gemm_flops_during_copy=native_rates.gemm_flops_during_copy,
        device_unit_issue_s=issue_resident,
        streamed_unit_issue_s=issue_streamed,
        graph_unit_issue_s=graph_resident,
        graph_streamed_issue_s=graph_streamed,
    )
    logger.info(
        "Measured hardware profile in %.1f s:\n%s", time.perf_counter() - started, format_profile(profile)
    )
    return profile


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return dev.type


def _cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir) if cache_dir is not None else cache_root()


def _cache_name(dev: torch.device, dtype: torch.dtype, quick: bool) -> str:
    parts = [
        "profile",
        f"v{PROFILE_FORMAT}",
        cpu_model(),
        f"{torch.get_num_threads()}t",
        f"torch{torch.__version__}",
        _device_name(dev),
        _dtype_name(dtype),
        # spinning OpenMP threads halve the CPU lane: rates measured under another policy do not apply
        f"omp-{os.environ.get('OMP_WAIT_POLICY', 'default').lower()}",
        # the CPU lane's decode rates differ by 2x between the native kernel and torch ops
        "native" if native_available() else "torch",
    ]
    if quick:
        parts.append("quick")  # a rough quick profile must never stand in for a full one
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(parts)).strip("._")
    return name[:200] + ".json"


def profile_cache_path(
    device: str = "cpu",
    dtype: torch.dtype | str = torch.bfloat16,
    *,
    cache_dir: str | os.PathLike | None = None,
    quick: bool = False,
) -> Path:
    """Where :func:`load_or_measure` keeps the profile for this machine, threads, torch, device and dtype."""
    return _cache_dir(cache_dir) / _cache_name(_check_device(device), _as_dtype(dtype), quick)


def load_or_measure(
    device: str = "cpu",
    dtype: torch.dtype | str = torch.bfloat16,
    *,
    refresh: bool = False,
    cache_dir: str | os.PathLike | None = None,
    quick: bool = False,
) -> HardwareProfile:
    """The cached profile of this machine, measuring (and caching) it when missing, unusable or ``refresh``.

    The cache is JSON in ``cache_dir``, else ``$HF_HYBRID_CACHE``, else ``~/.cache/hf_hybrid``; its file
    name is keyed by CPU model, ``torch.get_num_threads()``, torch version, device name, dtype and
    ``OMP_WAIT_POLICY``, so a change of any of them measures again. Quick and full profiles are cached separately.
    """
    dtype = _as_dtype(dtype)
    path = profile_cache_path(device, dtype, cache_dir=cache_dir, quick=quick)
    if not refresh:
        cached = _read_cache(path)
        if cached is not None:
            return cached
    profile = measure(device, dtype, quick=quick)
    _write_cache(path, profile)
    return profile


_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _run_cli(args: argparse.Namespace) -> int:
    try:
        profile = load_or_measure(
            args.device, _DTYPES[args.dtype], refresh=args.refresh, cache_dir=args.cache_dir, quick=args.quick
        )
    except (RuntimeError, ValueError) as err:
        print(f"hf-hybrid profile: {err}", file=sys.stderr)
        return 1
    print(json.dumps(profile.to_dict(), indent=2) if args.json else format_profile(profile))
    return 0


def add_cli(subparsers) -> None:
    """Add the ``profile`` subcommand to an ``argparse`` subparsers object (``func`` returns an exit code)."""
    parser = subparsers.add_parser(
        "profile",
        help="measure (or show the cached) CPU, memory, PCIe and GPU rates of this machine",
        description="Measure this machine's rates for the planner, or print the cached measurement.",
    )
    parser.add_argument(
        "--device",
        default=default_device_name(),
        help="accelerator to measure: 'cuda', 'cuda:N', or 'cpu' to let the CPU stand in (default: %(default)s)",
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(_DTYPES),
        default="bfloat16",
        help="weight dtype to measure the kernels in (default: %(default)s)",
    )
    parser.add_argument(
        "--refresh", action="store_true", help="measure again even if a cached profile exists"
    )
    parser.add_argument("--quick", action="store_true", help="small, fast measurement (rougher numbers)")
    parser.add_argument("--json", action="store_true", help="print the profile as JSON instead of a table")
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="where profiles are cached (default: $HF_HYBRID_CACHE or ~/.cache/hf_hybrid)",
    )
    parser.set_defaults(func=_run_cli)
