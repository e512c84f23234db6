"""The only place that touches streams, events, pinned buffers and the CPU worker.

Three lanes run at once:

* the **copy lane**: a side CUDA stream copying pinned host weights into a ring of device staging slots
  (:class:`StagingRing`); this is where weights cross PCIe;
* the **GPU lane**: the model's own (current) stream computing resident units and arrived streamed units;
* the **CPU lane**: one worker thread computing CPU units with the host weights in place.

Events order them: the GPU lane waits for a slot's copy event, the copy lane waits for a slot's "free"
event before overwriting it, and the CPU worker sleeps on a blocking event until the activations it needs
have arrived in pinned memory. Nothing spin-waits. With ``device="cpu"`` (the CPU standing in for the
accelerator) the same code runs: copies become host memcpy into staging slots, events are no-ops, and the
CPU worker still runs concurrently with the main thread.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .errors import ExecutionError
from .kernels.cpu import PLAIN_METHODS, CpuExpertKernel, fix_thread_count, pick_methods, plain_linear
from .planner import (
    SPLIT_MAX_TOKENS,
    TOKEN_ASSIGNMENTS,
    HostWork,
    assign_tokens,
    cpu_lane_time,
    split_fraction,
)
from .profile import HardwareProfile
from .units import CPU, GPU, STREAM, Unit

ALIGN = 64  # bytes; keeps every carved tensor aligned for vector loads and oneDNN


def align(n: int) -> int:
    """Round ``n`` up to a multiple of :data:`ALIGN`."""
    return (n + ALIGN - 1) // ALIGN * ALIGN


# ------------------------------------------------------------------------------------------- memory
def can_pin() -> bool:
    """Pinned host memory needs a CUDA build with a device."""
    return torch.cuda.is_available()


class HostArena:
    """One pinned (when possible) host allocation carved into aligned, typed tensors.

    One big allocation per layer instead of one per expert: pinning is slow per call and a contiguous
    region per unit lets a streamed unit cross PCIe in a single copy.
    """

    def __init__(self, nbytes: int, pin: bool):
        self.buffer = torch.empty(max(nbytes, ALIGN), dtype=torch.uint8, pin_memory=pin)
        self.offset = 0

    def take(self, nbytes: int) -> torch.Tensor:
        """The next ``nbytes`` bytes as a uint8 view (aligned)."""
        start = self.offset
        self.offset = start + align(nbytes)
        if self.offset > self.buffer.numel():
            raise RuntimeError("HostArena overflow: the layout was computed for fewer bytes")
        return self.buffer[start : start + nbytes]


def carve(region: torch.Tensor, shapes: list[tuple[int, ...]], dtype: torch.dtype) -> list[torch.Tensor]:
    """Typed tensors of ``shapes`` laid out back to back (aligned) inside the uint8 ``region``."""
    out, offset = [], 0
    elt = torch.empty((), dtype=dtype).element_size()
    for shape in shapes:
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * elt
        out.append(region[offset : offset + nbytes].view(dtype).view(shape))
        offset = align(offset + nbytes)
    return out


def layout_bytes(shapes: list[tuple[int, ...]], dtype: torch.dtype) -> int:
    """Bytes :func:`carve` needs for ``shapes``."""
    elt = torch.empty((), dtype=dtype).element_size()
    total = 0
    for shape in shapes:
        numel = 1
        for s in shape:
            numel *= s
        total = align(total + numel * elt)
    return total


# -------------------------------------------------------------------------------------------- lanes
class _NoEvent:
    """Stands in for a CUDA event when the CPU stands in for the accelerator: everything is already done."""

    def record(self, stream=None):
        return None

    def synchronize(self):
        return None


class DeviceLanes:
    """Streams and events of the accelerator, or synchronous stand-ins on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.is_cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.is_cuda else None
        self.tracer = None  # a hf_hybrid.trace.Tracer while a trace is recorded

    def span(self, lane: str, name: str, stream=None):
        """A trace span of device work (a no-op unless a trace is being recorded)."""
        if self.tracer is None:
            return nullcontext()
        return self.tracer.device_span(lane, name, stream)

    def host_span(self, lane: str, name: str):
        """A trace span of host work (a no-op unless a trace is being recorded)."""
        if self.tracer is None:
            return nullcontext()
        return self.tracer.host_span(lane, name)

    def event(self):
        """A fresh event; blocking so a host wait sleeps instead of spinning."""
        return torch.cuda.Event(blocking=True) if self.is_cuda else _NoEvent()

    def compute_stream(self):
        """The stream the model computes on (the current one)."""
        return torch.cuda.current_stream(self.device) if self.is_cuda else None

    def copy_into(self, dst: torch.Tensor, src: torch.Tensor, wait_for=None, label: str = "copy"):
        """Copy ``src`` (pinned host) into ``dst`` (device) on the copy lane; returns the arrival event."""
        if not self.is_cuda:
            with self.span("PCIe copy", label):
                dst.copy_(src)
            return _NoEvent()
        with torch.cuda.stream(self.copy_stream):
            if wait_for is not None:
                self.copy_stream.wait_event(wait_for)
            with self.span("PCIe copy", label, self.copy_stream):
                dst.copy_(src, non_blocking=True)
            ev = torch.cuda.Event(blocking=True)
            ev.record(self.copy_stream)
        return ev

    def wait(self, event) -> None:
        """Make the GPU lane wait for ``event`` (no host blocking)."""
        if self.is_cuda and event is not None:
            self.compute_stream().wait_event(event)

    def record(self):
        """An event marking 'everything issued so far on the GPU lane'."""
        ev = self.event()
        if self.is_cuda:
            ev.record(self.compute_stream())
        return ev


# ------------------------------------------------------------------------------------------ staging
@dataclass
class _Slot:
    buffer: torch.Tensor
    tag: object = None
    ready: object = None  # copy finished
    free: object = None  # last reader finished


def _label(tag: object) -> str:
    if isinstance(tag, tuple) and len(tag) == 2:
        return f"L{tag[0]} unit {tag[1]}"
    return str(tag)


class StagingRing:
    """Reusable device slots for streamed weights, least recently used first.

    A slot keeps its weights after use, so a unit requested again before its slot is reused (experts
    the next decode steps still route to) costs no copy.
    """

    #: room for the alignment padding between a unit's tensors (the planner counts weight bytes only)
    PADDING = ALIGN * 32

    def __init__(self, lanes: DeviceLanes, slot_bytes: int, slots: int):
        self.lanes = lanes
        slot_bytes = align(slot_bytes) + self.PADDING
        self.slot_bytes = slot_bytes
        self.slots = [
            _Slot(torch.empty(slot_bytes, dtype=torch.uint8, device=lanes.device)) for _ in range(slots)
        ]
        self.lru: OrderedDict[int, None] = OrderedDict((i, None) for i in range(slots))
        self.by_tag: dict[object, int] = {}
        self.hits = 0
        self.misses = 0
        self.bytes_copied = 0

    def fetch(
        self, tag: object, host_region: torch.Tensor | list[torch.Tensor]
    ) -> tuple[torch.Tensor, object, bool]:
        """Make ``host_region`` available on the device; returns (slot bytes view, ready event, was cached).

        A list of regions is laid out back to back at aligned offsets (as :func:`carve` reads them), one
        copy each: how a row range of an expert that is not contiguous on the host crosses PCIe.
        """
        parts = host_region if isinstance(host_region, list) else [host_region]
        total = sum(align(p.numel()) for p in parts[:-1]) + parts[-1].numel()
        if total > self.slot_bytes:
            raise ExecutionError(f"staging slot of {self.slot_bytes} B is too small for {tag} ({total} B)")
        index = self.by_tag.get(tag)
        if index is not None:
            self.lru.move_to_end(index)
            self.hits += 1
            slot = self.slots[index]
            return slot.buffer[:total], slot.ready, True
        index = next(iter(self.lru))
        self.lru.move_to_end(index)
        slot = self.slots[index]
        if slot.tag is not None:
            self.by_tag.pop(slot.tag, None)
        view = slot.buffer[:total]
        offset = 0
        for part in parts:
            # every part waits for the slot's last reader; the copy stream keeps them in order
            slot.ready = self.lanes.copy_into(
                view[offset : offset + part.numel()], part, wait_for=slot.free, label=_label(tag)
            )
            offset = align(offset + part.numel())
        slot.tag = tag
        self.by_tag[tag] = index
        self.misses += 1
        self.bytes_copied += sum(p.numel() for p in parts)
        return view, slot.ready, False

    def release(self, tag: object) -> None:
        """Mark the slot holding ``tag`` as read by everything issued so far on the GPU lane."""
        index = self.by_tag.get(tag)
        if index is not None:
            self.slots[index].free = self.lanes.record()

    def forget(self) -> None:
        """Drop all cached tags (e.g. after a failed step, when slot contents may be partial)."""
        self.by_tag.clear()
        for slot in self.slots:
            slot.tag = None


# ---------------------------------------------------------------------------------- expert groups
@dataclass
class ExpertGroup:
    """The gated-MLP units of one layer: the experts of a MoE layer, or the row slices of a dense MLP.

    ``device_weights[i]`` holds (gate_up, down) of resident units; ``host_regions[i]`` the pinned bytes of
    host units and ``host_weights[i]`` typed views of them.
    """

    layer: int
    units: list[Unit]
    homes: list[str]
    act_fn: object
    dtype: torch.dtype
    routed: bool  # MoE (tokens routed with weights) or dense (every token to every slice, weight 1)
    device_weights: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    host_regions: dict[int, torch.Tensor] = field(default_factory=dict)
    host_weights: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    cpu_kernels: dict[int, CpuExpertKernel] = field(default_factory=dict)
    shapes: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)


@dataclass
class StepStats:
    """Counters of what the executor did, for tests, traces and the benchmark."""

    cpu_units: int = 0
    streamed_units: int = 0
    gpu_units: int = 0
    cached_units: int = 0
    cpu_tokens: int = 0
    cpu_lane_s: float = 0.0  # time the CPU worker spent computing
    cpu_bytes: int = 0  # weight bytes the CPU lane read
    join_wait_s: float = 0.0  # time the feeding thread slept waiting for the CPU lane
    groups: int = 0  # expert groups run (layer steps)
    split_units: int = 0  # units whose rows were split between the CPU lane and the copy lane
    prefetched_units: int = 0  # next-layer units copied ahead during a prefill step

    def reset(self) -> None:
        """Zero every counter."""
        for name in self.__dataclass_fields__:
            setattr(self, name, type(getattr(self, name))())


class Executor:
    """Runs expert groups and streamed modules of one model across the CPU, PCIe and GPU lanes."""

    def __init__(
        self,
        device: torch.device,
        profile: HardwareProfile,
        *,
        expert_slots: tuple[int, int] | None = None,
        module_slots: tuple[int, int] | None = None,
        token_assignment: str = "adaptive",
        cpu_threads: int | None = None,
        cpu_methods: dict[int, str] | str = "linear",
    ):
        self.device = device
        self.profile = profile
        self.lanes = DeviceLanes(device)
        self.expert_ring = StagingRing(self.lanes, *expert_slots) if expert_slots else None
        self.module_ring = StagingRing(self.lanes, *module_slots) if module_slots else None
        if token_assignment not in TOKEN_ASSIGNMENTS:
            raise ValueError(f"token_assignment must be one of {', '.join(TOKEN_ASSIGNMENTS)}")
        self.token_assignment = token_assignment
        self.cpu_threads = cpu_threads
        self.cpu_methods: dict[int, str] | str = cpu_methods
        self.plain_cpu_methods = plain_methods(profile) if cpu_methods != "linear" else "linear"
        self._worker: ThreadPoolExecutor | None = None
        self._pinned: dict[tuple, torch.Tensor] = {}
        self.stats = StepStats()
        self.fault_injector = None  # tests: a callable(lane: str) that may raise
        self.closed = False
        # routing statistics, recorded while ``record_routing`` is on (see ``calibrate``)
        # measured CPU-lane time / predicted, smoothed: corrects the profile's CPU rate to what this process
        # really gets (spinning OpenMP threads, a busy machine), so assignment follows the lanes' real speed.
        # One factor per regime: GEMV-like steps (decode, few tokens per expert) and GEMM-like ones (prefill)
        # miss the profile by different amounts, and a prefill must not teach decode to avoid the CPU.
        self.cpu_scales = {"small": 1.0, "large": 1.0}
        self.groups: dict[int, ExpertGroup] = {}  # by layer, set when the hooks attach (for prefetching)
        self.record_routing = False
        self.routed_counts: dict[tuple[int, int], int] = {}
        self.routed_tokens: dict[int, int] = {}

    # ------------------------------------------------------------------ resources
    @property
    def worker(self) -> ThreadPoolExecutor:
        """The CPU lane: one thread whose torch ops use the intra-op thread pool."""
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf_hybrid-cpu-lane")
            # torch's intra-op thread count is per calling thread under OpenMP: set it in the worker. With a
            # GPU, one core is left to the thread that feeds it (its spinning OpenMP team would otherwise
            # compete with the CPU lane's threads).
            threads = self.cpu_threads or max(1, torch.get_num_threads() - (1 if self.lanes.is_cuda else 0))
            self._worker.submit(fix_thread_count, threads).result()
        return self._worker

    @property
    def cpu_scale(self) -> float:
        """The learned CPU-rate correction of decode-sized steps (see :attr:`cpu_scales`)."""
        return self.cpu_scales["small"]

    def pinned(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A reusable pinned host buffer of at least ``shape`` (per-step buffers are reused, not re-made)."""
        numel = 1
        for s in shape:
            numel *= s
        buf = self._pinned.get((key, dtype))
        if buf is None or buf.numel() < numel:
            # a plain tensor even when the first call runs under inference_mode: an inference tensor could
            # not be written by a later call made under no_grad (calibrate, a user's loop)
            with torch.inference_mode(False):
                buf = torch.empty(max(numel, 1), dtype=dtype, pin_memory=can_pin() and self.lanes.is_cuda)
            self._pinned[(key, dtype)] = buf
        return buf[:numel].view(shape)

    def close(self) -> None:
        """Stop the CPU worker and drop staging and pinned buffers."""
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
        self._pinned.clear()
        self.expert_ring = None
        self.module_ring = None
        self.closed = True

    def recover(self) -> None:
        """Bring the lanes back to a clean state after a failed or interrupted step."""
        if self.lanes.is_cuda:
            torch.cuda.synchronize(self.device)
        for ring in (self.expert_ring, self.module_ring):
            if ring is not None:
                ring.forget()

    def _maybe_fault(self, lane: str) -> None:
        if self.fault_injector is not None:
            self.fault_injector(lane)

    # ---------------------------------------------------------- streamed modules
    def stage_module(self, tag: object, host_region: torch.Tensor) -> torch.Tensor:
        """Bring a streamed module's pinned bytes into a module slot; the GPU lane waits for the copy."""
        view, ready, _ = self.module_ring.fetch(tag, host_region)
        self.lanes.wait(ready)
        return view

    def prefetch_module(self, tag: object, host_region: torch.Tensor) -> None:
        """Start copying a streamed module ahead of its use (the copy lane runs ahead of compute)."""
        self.module_ring.fetch(tag, host_region)

    def release_module(self, tag: object) -> None:
        """The GPU lane has issued everything that reads ``tag``'s slot."""
        self.module_ring.release(tag)

    # -------------------------------------------------------------- expert groups
    def run_group(
        self,
        group: ExpertGroup,
        hidden: torch.Tensor,
        top_k_index: torch.Tensor | None = None,
        top_k_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Compute the gated-MLP units of ``group`` for ``hidden`` [T, H] across the three lanes.

        MoE groups take the router's ``top_k_index``/``top_k_weights`` [T, k]; dense groups send every token
        to every slice. Resident units run on the GPU lane, host units on the CPU lane or streamed, as the
        token-assignment policy decides; the results are summed in float32 and returned in ``hidden``'s dtype.
        """
        tokens, width = hidden.shape
        dev = hidden.device
        # 1. which tokens go to which unit (host-side index lists: tiny, and the policy needs the counts)
        if group.routed:
            k = top_k_index.shape[1]
            flat = top_k_index.reshape(-1).to("cpu")
            order = torch.argsort(flat, stable=True)
            counts = torch.bincount(flat, minlength=len(group.units)).tolist()
            starts = [0]
            for c in counts:
                starts.append(starts[-1] + c)
            token_of = order // k
            if self.record_routing:
                self.routed_tokens[group.layer] = self.routed_tokens.get(group.layer, 0) + tokens
                for i, c in enumerate(counts):
                    if c:
                        self.routed_counts[(group.layer, i)] = self.routed_counts.get((group.layer, i), 0) + c
        else:
            counts = [tokens] * len(group.units)

        def rows(i: int) -> tuple[torch.Tensor, torch.Tensor] | None:
            # (token ids, flat positions into top_k_weights) of unit i, from the sorted routing
            if not group.routed:
                return None
            return token_of[starts[i] : starts[i + 1]], order[starts[i] : starts[i + 1]]

        active = [i for i, c in enumerate(counts) if c > 0 and i < len(group.units)]
        host = [i for i in active if group.homes[i] != GPU]
        resident = [i for i in active if group.homes[i] == GPU]

        # 2. token assignment: which host units run on the CPU, which are streamed to the GPU
        streamed: list[int] = []
        on_cpu: list[int] = []
        split: dict[int, int] = {}  # unit -> intermediate rows [0, r) the CPU lane computes
        regime = "small"
        if host:
            ring = self.expert_ring
            regime = "small" if max(counts[i] for i in host) <= SPLIT_MAX_TOKENS else "large"
            work = [
                HostWork(
                    group.units[i].name,
                    counts[i],
                    group.units[i].nbytes,
                    group.units[i].flops_per_token,
                    staged=ring is not None and (group.layer, i) in ring.by_tag,
                    home=group.homes[i],
                )
                for i in host
            ]
            if self.token_assignment == "split" and ring is not None:
                split = self._choose_splits(group, host, counts, work)
                work = [w for i, w in zip(host, work) if i not in split]
            gpu_busy = sum(group.units[i].nbytes for i in resident) / self.profile.gpu_mem_bw
            mode = "adaptive" if self.token_assignment == "split" else self.token_assignment
            names = assign_tokens(
                work, self.profile, gpu_busy_s=gpu_busy, mode=mode, cpu_scale=self.cpu_scales[regime]
            )
            if ring is None:
                names = set()
            streamed = [i for i in host if i not in split and group.units[i].name in names]
            on_cpu = [i for i in host if i not in split and group.units[i].name not in names]
            if not on_cpu and not split and mode == "adaptive":
                # nothing ran on the CPU, so nothing corrects the factor: drift back toward the profile, so
                # one slow measurement cannot keep the CPU lane idle for good (a real slowdown is re-learned
                # by the next CPU job)
                self.cpu_scales[regime] += self.CPU_SCALE_DECAY * (1.0 - self.cpu_scales[regime])

        acc = torch.zeros(tokens, width, dtype=torch.float32, device=dev)
        device_rows = (
            order.to(dev, non_blocking=True) if group.routed and (resident or streamed or split) else None
        )
        device_tokens = token_of.to(dev, non_blocking=True) if device_rows is not None else None
        flat_weights = top_k_weights.reshape(-1) if group.routed else None

        # 3. CPU lane first, so it starts while the GPU lane and the copies are issued
        cpu_future: Future | None = None
        split_future: Future | None = None
        host_inputs = None
        if on_cpu or split:
            host_inputs = self._host_inputs(hidden, flat_weights)
        if on_cpu:
            cpu_future = self._submit_cpu(group, on_cpu, hidden, host_inputs, rows)

        def on_device(i: int, gate_up: torch.Tensor, down: torch.Tensor) -> None:
            self._device_unit(
                group,
                i,
                gate_up,
                down,
                hidden,
                acc,
                device_rows,
                device_tokens,
                flat_weights,
                starts if group.routed else None,
            )

        try:
            # 4. streamed units: copy (copy lane) then compute (GPU lane), interleaved so slots recycle safely
            for i in streamed:
                self._maybe_fault("stream")
                gate_up_shape, down_shape = group.shapes[i]
                view, ready, cached = self.expert_ring.fetch((group.layer, i), group.host_regions[i])
                gate_up, down = carve(view, [gate_up_shape, down_shape], group.dtype)
                self.lanes.wait(ready)
                with self.lanes.span("GPU", f"L{group.layer} streamed {i}"):
                    on_device(i, gate_up, down)
                self.expert_ring.release((group.layer, i))
                self.stats.streamed_units += 1
                self.stats.cached_units += int(cached)

            # 4b. split units: the copy lane brings gate/up rows [r, I), the GPU computes their activations,
            # which return to the CPU lane; it adds rows [0, r) and the whole down projection
            if split:
                halves = [
                    (
                        i,
                        r,
                        self._split_gpu_half(
                            group, i, r, hidden, device_tokens, starts if group.routed else None
                        ),
                    )
                    for i, r in split.items()
                ]
                split_future = self._submit_split(
                    group, halves, hidden, host_inputs, rows, self.lanes.record()
                )

            # 5. resident units on the GPU lane
            for i in resident:
                self._maybe_fault("gpu")
                gate_up, down = group.device_weights[i]
                with self.lanes.span("GPU", f"L{group.layer} resident {i}"):
                    on_device(i, gate_up, down)
                self.stats.gpu_units += 1
        except BaseException:
            # the step is abandoned: let the CPU lane finish before the error leaves, so no task of this
            # step still writes the shared buffers when the next call starts
            for future in (cpu_future, split_future):
                if future is not None:
                    wait_futures([future])
            raise

        # 5b. a prefill-sized step uses nearly every expert of the next layer: start copying its streamed
        # experts now, so the copy lane works through this layer's tail, the attention and the routing
        if tokens > SPLIT_MAX_TOKENS and self.expert_ring is not None and self.token_assignment != "cpu":
            self._prefetch_next(group)

        # 6. join the CPU lane (the main thread sleeps on the future, it does not spin)
        self.stats.groups += 1
        if cpu_future is not None:
            waited = time.perf_counter()
            with self.lanes.host_span("host", f"L{group.layer} wait for CPU lane"):
                wait_futures([cpu_future])  # a Ctrl-C while the main thread sleeps here propagates as is
            self.stats.join_wait_s += time.perf_counter() - waited
            exc = cpu_future.exception()
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise exc
            if exc is not None:
                raise ExecutionError(f"the CPU lane failed in layer {group.layer}: {exc!r}") from exc
            cpu_out, seconds = cpu_future.result()
            self._learn_cpu_rate(
                cpu_lane_time([(group.units[i], counts[i]) for i in on_cpu], self.profile), seconds, regime
            )
            acc += cpu_out.to(dev, non_blocking=True)
        if split_future is not None:
            with self.lanes.host_span("host", f"L{group.layer} wait for CPU lane (split)"):
                wait_futures([split_future])
            exc = split_future.exception()
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise exc
            if exc is not None:
                raise ExecutionError(f"the CPU lane failed in layer {group.layer}: {exc!r}") from exc
            acc += split_future.result()[0].to(dev, non_blocking=True)
        return acc.to(hidden.dtype)

    #: smoothing and limits of :attr:`cpu_scales`, and the drift back toward 1 per step without CPU work
    CPU_SCALE_WEIGHT = 0.2
    CPU_SCALE_DECAY = 0.02
    CPU_SCALE_RANGE = (0.25, 8.0)
    #: jobs predicted shorter than this are dominated by fixed overheads and teach nothing about the rate
    CPU_SCALE_MIN_JOB_S = 1e-3

    def _learn_cpu_rate(self, predicted_s: float, measured_s: float, regime: str = "small") -> None:
        if predicted_s < self.CPU_SCALE_MIN_JOB_S or measured_s <= 0:
            return
        lo, hi = self.CPU_SCALE_RANGE
        ratio = min(hi, max(lo, measured_s / predicted_s))
        self.cpu_scales[regime] += self.CPU_SCALE_WEIGHT * (ratio - self.cpu_scales[regime])

    def rehome(self, group: ExpertGroup, i: int, home: str) -> None:
        """Move unit ``i`` of ``group`` to ``home`` (weights cross PCIe once; for re-planning).

        A unit leaving the device gets its own pinned host region; a unit arriving drops its host views
        (the layer's host arena itself is shared, so its bytes stay allocated until the model is freed).
        """
        old = group.homes[i]
        if old == home:
            return
        shapes = list(group.shapes[i])
        if old == GPU:
            gate_up, down = group.device_weights.pop(i)
            region = torch.empty(
                layout_bytes(shapes, group.dtype), dtype=torch.uint8, pin_memory=self.lanes.is_cuda
            )
            host_gate_up, host_down = carve(region, shapes, group.dtype)
            host_gate_up.copy_(gate_up)
            host_down.copy_(down)
            group.host_regions[i] = region
            group.host_weights[i] = (host_gate_up, host_down)
        elif home == GPU:
            host_gate_up, host_down = group.host_weights.pop(i)
            group.host_regions.pop(i)
            group.device_weights[i] = (host_gate_up.to(self.device), host_down.to(self.device))
        group.cpu_kernels.pop(i, None)
        if self.expert_ring is not None and (group.layer, i) in self.expert_ring.by_tag:
            self.expert_ring.by_tag.pop((group.layer, i))
        group.homes[i] = home

    def _device_unit(
        self, group, i, gate_up, down, hidden, acc, device_rows, device_tokens, flat_weights, starts
    ):
        if group.routed:
            sel = device_rows[starts[i] : starts[i + 1]]
            tok = device_tokens[starts[i] : starts[i + 1]]
            x = hidden[tok]
        else:
            x = hidden
        gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
        y = F.linear(group.act_fn(gate) * up, down)
        if group.routed:
            y = y * flat_weights[sel, None]
            acc.index_add_(0, tok, y.float())
        else:
            acc += y.float()

    def _cpu_kernel(self, group: ExpertGroup, i: int) -> CpuExpertKernel:
        kernel = group.cpu_kernels.get(i)
        if kernel is None:
            gate_up, down = group.host_weights[i]
            # CPU-home units may hold a packed copy (the profile's fastest kernel per token count); units
            # streamed by default run the fastest plain kernel when assignment sends them to the CPU
            methods = self.cpu_methods if group.homes[i] == CPU else self.plain_cpu_methods
            kernel = CpuExpertKernel(gate_up, down, group.act_fn, methods)
            group.cpu_kernels[i] = kernel
        return kernel

    def prepare_cpu_kernels(self, groups, progress: bool = True) -> int:
        """Build the kernels (and packed copies) of every CPU-home unit now, not in the first step.

        Returns the extra host bytes the kernels hold.
        """
        from transformers.utils.logging import tqdm

        todo = [(g, i) for g in groups for i, h in enumerate(g.homes) if h == CPU]
        extra = 0
        for g, i in tqdm(todo, desc="Preparing CPU kernels", unit="unit", disable=not progress or not todo):
            extra += self._cpu_kernel(g, i).extra_bytes
        return extra

    def _prefetch_next(self, group: ExpertGroup) -> None:
        """Copy the next layer's first stream-home units into the staging slots this layer no longer needs."""
        later = [g for layer, g in self.groups.items() if layer > group.layer]
        if not later:
            return
        following = min(later, key=lambda g: g.layer)
        budget = len(self.expert_ring.slots) - 1  # leave one slot for what the next step decides
        for i, home in enumerate(following.homes):
            if budget == 0:
                break
            if home == STREAM and i in following.host_regions:
                self.expert_ring.fetch((following.layer, i), following.host_regions[i])
                self.stats.prefetched_units += 1
                budget -= 1

    def _host_inputs(self, hidden, flat_weights) -> tuple:
        """(activations, routing weights, arrival event) on the host for the CPU lane."""
        if not self.lanes.is_cuda:
            return hidden, flat_weights, None
        # activations cross PCIe in reusable pinned buffers, asynchronously on the GPU lane
        x_host = self.pinned("x", tuple(hidden.shape), hidden.dtype)
        x_host.copy_(hidden, non_blocking=True)
        w_host = None
        if flat_weights is not None:
            w_host = self.pinned("w", tuple(flat_weights.shape), flat_weights.dtype)
            w_host.copy_(flat_weights, non_blocking=True)
        return x_host, w_host, self.lanes.record()

    def _choose_splits(self, group, host, counts, work) -> dict[int, int]:
        """Host units of a small step to divide between the lanes, with the CPU lane's share of rows."""
        fraction = split_fraction(self.profile, self.cpu_scale)
        split = {}
        for i, w in zip(host, work):
            inter = group.shapes[i][0][0] // 2
            rows_on_cpu = round(fraction * inter)
            if counts[i] <= SPLIT_MAX_TOKENS and not w.staged and 0 < rows_on_cpu < inter:
                split[i] = rows_on_cpu
        return split

    def _split_gpu_half(self, group, i, r, hidden, device_tokens, starts) -> torch.Tensor:
        """Stream gate/up rows [r, I) of unit i, compute their activations, start them towards the host."""
        gate_up_host, _ = group.host_weights[i]
        inter, width = gate_up_host.shape[0] // 2, gate_up_host.shape[1]
        parts = [gate_up_host[r:inter], gate_up_host[inter + r :]]
        tag = (group.layer, i, r)
        view, ready, cached = self.expert_ring.fetch(tag, [p.view(torch.uint8).reshape(-1) for p in parts])
        gate, up = carve(view, [(inter - r, width), (inter - r, width)], group.dtype)
        self.lanes.wait(ready)
        with self.lanes.span("GPU", f"L{group.layer} split {i} rows {r}:{inter}"):
            x = hidden[device_tokens[starts[i] : starts[i + 1]]] if group.routed else hidden
            half = group.act_fn(F.linear(x, gate)) * F.linear(x, up)
            if self.lanes.is_cuda:
                host_half = self.pinned(f"split{i}", tuple(half.shape), half.dtype)
                host_half.copy_(half, non_blocking=True)
                half = host_half
        self.expert_ring.release(tag)
        self.stats.split_units += 1
        self.stats.cached_units += int(cached)
        return half

    def _submit_split(self, group, halves, hidden, host_inputs, rows, halves_arrived) -> Future:
        """The CPU lane's part of split units: rows [0, r) of gate/up, then the whole down projection."""
        x_host, w_host, arrived = host_inputs
        out = self.pinned("split_out", tuple(hidden.shape), torch.float32)
        jobs = [(group.host_weights[i], r, half, rows(i)) for i, r, half in halves]
        act, linear, methods = group.act_fn, plain_linear, self.plain_cpu_methods
        lanes, stats, injector = self.lanes, self.stats, self.fault_injector
        stats.cpu_bytes += sum(gu[:r].nbytes * 2 + down.nbytes for (gu, down), r, _, _ in jobs)

        def split_lane():
            if injector is not None:
                injector("cpu")
            if arrived is not None:
                arrived.synchronize()
            started = time.perf_counter()
            with lanes.host_span("CPU lane", f"L{group.layer} split units"), torch.inference_mode():
                out.zero_()
                for (gate_up, down), r, half, routed_rows in jobs:
                    inter = gate_up.shape[0] // 2
                    xs = x_host if routed_rows is None else x_host[routed_rows[0]]
                    mine = act(linear(xs, gate_up[:r], methods)) * linear(
                        xs, gate_up[inter : inter + r], methods
                    )
                    halves_arrived.synchronize()  # the GPU's rows of the activations are in pinned memory
                    y = linear(torch.cat([mine, half], dim=1), down, methods)
                    if routed_rows is None:
                        out.add_(y.float())
                    else:
                        tok, sel = routed_rows
                        out.index_add_(0, tok, (y * w_host[sel, None]).float())
            seconds = time.perf_counter() - started
            stats.cpu_lane_s += seconds
            return out, seconds

        return self.worker.submit(split_lane)

    def _submit_cpu(self, group, on_cpu, hidden, host_inputs, rows) -> Future:
        tokens, width = hidden.shape
        x_host, w_host, arrived = host_inputs
        out = self.pinned("cpu_out", (tokens, width), torch.float32)
        kernels = [self._cpu_kernel(group, i) for i in on_cpu]
        row_lists = [rows(i) for i in on_cpu]
        self.stats.cpu_units += len(on_cpu)
        self.stats.cpu_tokens += sum(tokens if r is None else r[0].numel() for r in row_lists)
        injector = self.fault_injector

        stats = self.stats
        stats.cpu_bytes += sum(k.weight_bytes for k in kernels)
        lanes = self.lanes
        label = f"L{group.layer} cpu units {','.join(str(i) for i in on_cpu)}"

        def cpu_lane() -> torch.Tensor:
            if injector is not None:
                injector("cpu")
            if arrived is not None:
                arrived.synchronize()  # blocking event: this thread sleeps until the activations are here
            started = time.perf_counter()
            try:
                with lanes.host_span("CPU lane", label):
                    result = compute()
                return result, time.perf_counter() - started
            finally:
                stats.cpu_lane_s += time.perf_counter() - started

        def compute() -> torch.Tensor:
            with torch.inference_mode():
                out.zero_()
                for kernel, routed_rows in zip(kernels, row_lists):
                    if routed_rows is None:
                        out.add_(kernel(x_host).float())
                    else:
                        tok, sel = routed_rows
                        y = kernel(x_host[tok]) * w_host[sel, None]
                        out.index_add_(0, tok, y.float())
            return out

        return self.worker.submit(cpu_lane)


def plain_methods(profile: HardwareProfile) -> dict[int, str] | str:
    """The fastest kernel per token count among those that need no packed copy of the weights."""
    if not profile.cpu_method_bw:
        return "linear"
    plain = {
        m: {k: v for k, v in rates.items() if k in PLAIN_METHODS}
        for m, rates in profile.cpu_method_bw.items()
    }
    return pick_methods(plain)
