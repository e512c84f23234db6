"""One layer step across the three lanes, as named stages.

:meth:`Executor.run_group` computes a layer's gated-MLP units (the experts of a MoE layer or the row
slices of a dense MLP) for its tokens:

1. **route**: which tokens go to which unit (host-side index lists);
2. **assign**: which host units run on the CPU lane, which are streamed to the GPU, which are divided
   between the two (the policy is :func:`hf_hybrid.planner.assign_tokens`; this is where a token is
   assigned to a lane);
3. **submit CPU**: the CPU lane's job (whole units and the CPU's rows of divided ones) starts first, so
   it runs while the rest is issued;
4. **stream**: streamed units, and the streamed rows of divided ones, are copied into staging slots
   (:mod:`hf_hybrid.staging`: where a weight crosses PCIe) and computed on the GPU lane;
5. **resident**: resident units on the GPU lane;
6. **join**: the CPU lane's fp32 partial sums are added to the GPU's, rounded once to the model dtype.

Rounding: every lane adds into fp32. An expert's down output is rounded to the model dtype before it is
weighted, as transformers rounds it; the row slices of a dense MLP, and the lanes' parts of a divided
unit, keep their down outputs in fp32 (:func:`hf_hybrid.kernels.cpu.fp32_linear`; the native lane's
``partial`` jobs), so a dense MLP spread over several homes is rounded once, like transformers' single
matmul. A dense MLP held whole on the device runs as one piece: the same bits as transformers.

Streams, events, threads and pinned buffers belong to :mod:`hf_hybrid.lanes`; the host weight layout to
:mod:`hf_hybrid.weights`; what the CPU lane computes to :mod:`hf_hybrid.cpu_work`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .assignment import HostWork, assign_tokens, lane_shares, unit_costs
from .costs import (
    CPU_ROUND_TRIP_S,
    SPLIT_MAX_TOKENS,
    divides,
    divides_in_prefill,
    issue_times,
    prefill_split_fraction,
    split_fraction,
    split_rates,
)
from .cpu_kernels import CpuKernels
from .cpu_work import HostInputs, RowPart, Rows, native_units_job, whole_units_job
from .errors import ExecutionError
from .expert_graphs import ExpertGraphs
from .kernels.cpu import gated_mlp, partial_gated_mlp
from .lanes import CpuLane, DeviceLanes, PinnedPool, cpu_lane_threads
from .options import DIVIDING_ASSIGNMENTS, TOKEN_ASSIGNMENTS
from .profile import HardwareProfile
from .staging import StagingRing
from .units import GPU, STREAM
from .weights import ExpertGroup, merge_resident_slices, rehome_unit


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
    split_units: int = 0  # units divided between the CPU lane and the copy lane (by intermediate rows)
    prefetched_units: int = 0  # next-layer units copied ahead during a prefill step
    predicted_units: int = 0  # next-layer units copied ahead in a decode step from a routing prediction
    # experts a decode step predicted for the next layer (predict_next_layer), and how many of them that
    # layer's step then routed tokens to: the guess rate that decides whether copying ahead can pay
    guessed_experts: int = 0
    guessed_right: int = 0
    native_units: int = 0  # CPU units computed by the native kernel (the rest by torch ops)
    direct_native_jobs: int = 0  # native jobs the feeding thread started itself (CpuLane.start_native)
    # the feeding thread between one layer step's return and the next one's start (attention, router,
    # routing read back: the serial host path while the expert lanes idle), and how many such gaps
    host_gap_s: float = 0.0
    host_gaps: int = 0
    # the feeding thread inside run_group before it sleeps on the CPU lane (routing, assignment, issuing)
    issue_s: float = 0.0
    # streamed experts of decode-sized steps on an accelerator: the feeding thread's time for each one in
    # all (stream_issue_s) and in its staging fetch alone (the copy's issue, stream_fetch_s), and how many
    stream_issue_s: float = 0.0
    stream_fetch_s: float = 0.0
    stream_issues: int = 0

    def reset(self) -> None:
        """Zero every counter."""
        for name in self.__dataclass_fields__:
            setattr(self, name, type(getattr(self, name))())


@dataclass
class Routing:
    """Stage 1's result: per unit, how many tokens it gets and which (sorted by unit)."""

    counts: list[int]
    starts: list[int] | None = None  # unit i's positions are order[starts[i]:starts[i+1]]; None: dense
    order_list: list[int] | None = None  # ``order`` as a list, where the routing was sorted in Python
    top_k: int = 1
    # flat (token, k) positions sorted by unit, and the token of each; from ``order_list`` when first asked
    # for (a one-token step needs only the list)
    sorted_positions: torch.Tensor | None = None
    sorted_tokens: torch.Tensor | None = None

    @property
    def routed(self) -> bool:
        """Whether tokens were routed (a MoE layer), as opposed to every unit taking every token."""
        return self.starts is not None

    @property
    def order(self) -> torch.Tensor | None:
        """Flat (token, k) positions sorted by unit (None for a dense group)."""
        if self.sorted_positions is None and self.order_list is not None:
            self.sorted_positions = torch.tensor(self.order_list, dtype=torch.long)
        return self.sorted_positions

    @property
    def token_of(self) -> torch.Tensor | None:
        """The token of each sorted position (None for a dense group)."""
        if self.sorted_tokens is None and self.order_list is not None:
            k = self.top_k
            self.sorted_tokens = torch.tensor([p // k for p in self.order_list], dtype=torch.long)
        return self.sorted_tokens

    def rows(self, i: int) -> Rows:
        """(token ids, flat positions into the routing weights) of unit ``i``; None for a dense group."""
        if not self.routed:
            return None
        a, b = self.starts[i], self.starts[i + 1]
        return self.token_of[a:b], self.order[a:b]


@dataclass
class Assignment:
    """Stage 2's result: the lane of every unit with tokens in this step."""

    resident: list[int] = field(default_factory=list)
    streamed: list[int] = field(default_factory=list)
    on_cpu: list[int] = field(default_factory=list)
    # divided units: unit -> r; gate/up rows and down columns [0, r) on the CPU lane, the rest streamed
    split: dict[int, int] = field(default_factory=dict)
    regime: str = "small"  # "small" (decode-like, few tokens per unit) or "large" (prefill-like)
    # the divided units' two parts are summed before they are weighted (Executor._combine_divided)
    combine: bool = False


@dataclass
class DeviceBatch:
    """What the GPU lane needs to compute one unit: the inputs, routing and the fp32 accumulator."""

    hidden: torch.Tensor
    acc: torch.Tensor
    routing: Routing
    flat_weights: torch.Tensor | None
    device_rows: torch.Tensor | None = None
    device_tokens: torch.Tensor | None = None
    # the routing weight of every routed (token, unit) pair in unit order (flat_weights at device_rows),
    # gathered once per multi-token step: a unit's weights are then a slice, not a gather of its own
    device_weights: torch.Tensor | None = None
    # a one-token routed step: each unit's one routing-weight position, known on the host (no index tensors
    # cross to the device, and a unit's input is the step's one row; see DeviceBatch.one_token_weight)
    positions: list[int] | None = None
    # a one-token step whose GPU-lane experts replay CUDA graphs on static buffers (Executor.expert_graphs);
    # ``acc`` is then the graphs' static accumulator
    graphs: bool = False
    # a routed step's divided units: unit -> (GPU part, token ids or None in a one-token step, routing-weight
    # positions), each part kept in fp32 until the CPU lane's part joins it (Executor._combine_divided);
    # None: each part added at once (combine_divided off)
    combine: dict | None = None

    def gather_routing(self) -> None:
        """The gathered path's index tensors on the device (a multi-token routed step): each routed pair's
        row in ``flat_weights`` and token, in unit order, and their routing weights."""
        dev = self.hidden.device
        self.device_rows = self.routing.order.to(dev, non_blocking=True)
        self.device_tokens = self.routing.token_of.to(dev, non_blocking=True)
        self.device_weights = self.flat_weights.index_select(0, self.device_rows)

    def one_token_weight(self, i: int) -> torch.Tensor:
        """Unit ``i``'s routing weight in a one-token step, as a [1, 1] view (no gather on the device)."""
        p = self.positions[self.routing.starts[i]]
        return self.flat_weights[p : p + 1, None]


@dataclass
class GroupStep:
    """A layer step whose lanes are working (:meth:`Executor.start_group`), or its result (``done``)."""

    group: ExpertGroup
    hidden: torch.Tensor
    cpu_future: Future | None = None
    lanes: Assignment | None = None
    routing: Routing | None = None
    acc: torch.Tensor | None = None
    done: torch.Tensor | None = None
    issue_device: Callable[[], None] | None = None  # GPU-lane work left to issue when the step is taken
    divided_done: object | None = None  # event after the GPU lane's parts of divided units (balancing)
    combine: dict | None = None  # DeviceBatch.combine of the step
    flat_weights: torch.Tensor | None = None  # the step's routing weights, flat (for combine)


def _rows_in_blocks(fraction: float, inter: int) -> tuple[int, int]:
    """(``fraction`` of a divided unit's ``inter`` intermediate rows rounded to whole blocks, the block): 64
    rows where ``inter`` >= 1024, so the streamed down columns start on a 128-byte boundary, else 1."""
    block = 64 if inter >= 1024 else 1
    return round(fraction * inter / block) * block, block


class StepStarted(Exception):
    """Raised by :meth:`Executor.run_group` in start-only mode once the step is started (it unwinds the
    MoE block that called it; the step waits in :attr:`Executor.ahead`)."""


class Executor:
    """Runs expert groups and streamed modules of one model across the CPU, PCIe and GPU lanes."""

    #: smoothing and limits of :attr:`cpu_scales`, and the drift back toward 1 per step without CPU work
    CPU_SCALE_WEIGHT = 0.2
    CPU_SCALE_DECAY = 0.02
    CPU_SCALE_RANGE = (0.25, 8.0)
    #: jobs predicted shorter than this are dominated by fixed overheads and teach nothing about the rate
    CPU_SCALE_MIN_JOB_S = 1e-3
    #: smoothing and ceiling of :attr:`issue_seconds`
    ISSUE_WEIGHT = 0.2
    ISSUE_MAX_S = 5e-3
    #: how far (in blocks of rows) the observed lane finish order may move divided units' split from the one
    #: the rates give
    SPLIT_BIAS_MAX_BLOCKS = 32
    #: a pause between layer steps longer than this is not one forward's host path (a new call, sampling)
    HOST_GAP_MAX_S = 0.1
    #: routings of at most this many (token, k) pairs are sorted in Python (see _route)
    PYTHON_ROUTING_MAX = 64
    #: one-token native jobs kept packed at most (see _one_token_packed; S3 uses ~16k: layers x experts x k)
    PACKED_JOBS_MAX = 65536

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
        cpu_backend: str = "auto",
        predict_next_layer: bool = False,
    ):
        if token_assignment not in TOKEN_ASSIGNMENTS:
            raise ValueError(f"token_assignment must be one of {', '.join(TOKEN_ASSIGNMENTS)}")
        self.device = device
        self.profile = profile
        self.lanes = DeviceLanes(device)
        self.cpu_lane = CpuLane(cpu_lane_threads(self.lanes.is_cuda, cpu_threads))
        self.pinned_pool = PinnedPool(pin=self.lanes.is_cuda)
        self.expert_ring = StagingRing(self.lanes, *expert_slots) if expert_slots else None
        self.module_ring = StagingRing(self.lanes, *module_slots) if module_slots else None
        self.token_assignment = token_assignment
        self.cpu_kernels = CpuKernels(profile, cpu_methods, cpu_backend, self.cpu_lane.threads)
        self.stats = StepStats()
        self.fault_injector = None  # tests: a callable(lane: str) that may raise
        # measured CPU-lane time / predicted, smoothed: corrects the profile's CPU rate to what this process
        # really gets (spinning OpenMP threads, a busy machine), so assignment follows the lanes' real speed.
        # One factor per regime: GEMV-like steps (decode, few tokens per expert) and GEMM-like ones (prefill)
        # miss the profile by different amounts, and a prefill must not teach decode to avoid the CPU.
        self.cpu_scales = {"small": 1.0, "large": 1.0}
        # host seconds the feeding thread really spends issuing one expert of a decode-sized step on the GPU
        # lane, resident and streamed, smoothed: it starts from the profile's measurement of the launches
        # alone; inside a step the thread shares the cores and the interpreter with the CPU lane and takes
        # longer (on S3 on the H200 machine, several times longer), and assignment must see what it costs
        # (the one-token figures: the steps that learn it are mostly batch-1 decode steps)
        self.issue_seconds = dict(zip(("resident", "streamed"), issue_times(profile, tokens=1)))
        # the same for prefill-sized steps, whose experts are issued kernel by kernel with their tokens'
        # gathers and scatters (no graph replays): an S3 trace on the H200 machine had the feeding thread
        # ~350 us per such expert against ~120 us per decode-step expert, and a prefill assigned by the
        # decode figure streamed so many experts that issuing them, not PCIe or the CPU lane, bound its layers
        self.prefill_issue_seconds = dict(zip(("resident", "streamed"), issue_times(profile)))
        self.groups: dict[int, ExpertGroup] = {}  # by layer, set when the hooks attach (for prefetching)
        # set by generate while a chunked prompt's forward is not its last: the last layer's prefill step then
        # copies the first layer's stream-home units ahead for the next chunk (see _prefetch_next)
        self.prefill_follows = False
        # router weight [experts, hidden] by MoE layer, set when the hooks attach: a decode step applies the
        # next layer's router to its own input to predict, and start copying, the next layer's experts
        self.router_weights: dict[int, torch.Tensor] = {}
        self.predict_next_layer = predict_next_layer
        # routing statistics, recorded while ``record_routing`` is on (see ``calibrate``)
        self.record_routing = False
        self._left_step: float | None = None  # when the last layer step returned (for host_gap_s)
        # (group, assignment, token counts, seconds) of the last CPU-lane job, not yet learned from
        self._last_cpu_job: tuple | None = None
        self._one_token_row_cache: dict[object, Rows] = {}  # see _one_token_rows and _kept_row
        self._packed_jobs: dict[tuple, tuple] = {}  # see _one_token_packed
        self._divisible: dict[int, bool] = {}  # see _may_divide
        self._parts_ahead: dict[int, set] = {}  # layer -> (unit, rows) copied ahead for it (_choose_splits)
        # (next layer, experts predicted) by the last step, see _score_guess
        self._guesses: tuple[int, list[int]] | None = None
        # unit costs assign_tokens keeps between steps, valid for one profile (see _assignment_memo)
        self._memo_profile = None
        self._unit_costs: dict = {}
        self._split_rows: dict[int, int] = {}  # intermediate size -> the CPU lane's rows of divided units
        # intermediate size -> blocks of rows moved to the CPU lane (negative: to the GPU lane) because the
        # GPU lane's parts finished after (before) the CPU lane in recent steps; see _balance_splits
        self.split_bias: dict[int, int] = {}
        # off by default: on S1 on the H200 machine it lost 9% of decode (17.8 vs 19.5 tok/s, one run): each
        # move is a new GEMM shape for the GPU lane (a BLAS heuristic lookup on the feeding thread) and rows
        # moved to the copy lane slow the CPU lane's DRAM reads (68 vs 75 GB/s)
        self.balance_splits = False
        # prefill-sized steps divide large host experts between the CPU lane's GEMMs and the copy lane
        # (_choose_prefill_splits); off until measured on the device machine
        self.prefill_splits = False
        # a divided expert's parts are summed before the expert is weighted (Assignment.combine); off: each
        # part weighted on its own (fewer launches, 1-2 ulps, another greedy token now and then)
        self.combine_divided = True
        # a decode-sized step's native CPU job is started by the feeding thread on the native pool's leader
        # (CpuLane.start_native) rather than handed to the CPU lane's Python thread: no thread wake-up and
        # no wait for the interpreter lock between the routing and the kernel, or between its end and the join
        self.direct_native_start = True
        # one-token decode steps replay each GPU-lane expert as a CUDA graph (hf_hybrid.expert_graphs): one
        # copy and one replay per expert instead of 6-9 kernel launches on the feeding thread. On the CPU
        # standing in the same static-buffer path runs eagerly
        self.graph_experts = True
        self.expert_graphs = ExpertGraphs(self.lanes, capture=self.lanes.is_cuda)
        # a decode lookahead (hf_hybrid.decode_lookahead) starts the next forward's first layer step early
        self.start_only = False  # run_group only starts its step (kept in ``ahead``) and raises StepStarted
        self.ahead: GroupStep | None = None
        self.ahead_verified = False  # the next forward's inputs were checked equal to the lookahead's
        self.routed_counts: dict[tuple[int, int], int] = {}
        self.routed_tokens: dict[int, int] = {}

    # ------------------------------------------------------------------ resources
    @property
    def cpu_scale(self) -> float:
        """The learned CPU-rate correction of decode-sized steps (see :attr:`cpu_scales`)."""
        return self.cpu_scales["small"]

    @property
    def closed(self) -> bool:
        """True after :meth:`close`: the model must be loaded again to run."""
        return self.cpu_lane.closed

    def pinned(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A reusable pinned host buffer of at least ``shape``."""
        return self.pinned_pool.get(key, shape, dtype)

    def close(self) -> None:
        """Stop the CPU lane and drop staging and pinned buffers; later calls raise ``ExecutionError``."""
        self.cpu_lane.close()
        self.cpu_kernels.close()
        self.pinned_pool.clear()
        self.expert_graphs.clear()
        self._packed_jobs.clear()
        self.expert_ring = None
        self.module_ring = None

    def check_open(self) -> None:
        """Raise a clear error when the executor was closed."""
        if self.closed:
            raise ExecutionError("this hybrid model was closed: load it again with from_pretrained to run it")

    def recover(self) -> None:
        """Bring the lanes back to a clean state after a failed or interrupted step."""
        self.start_only = False
        self.drop_ahead()
        self.lanes.synchronize()
        for ring in (self.expert_ring, self.module_ring):
            if ring is not None:
                ring.forget()
        self._parts_ahead.clear()
        self._guesses = None

    def _maybe_fault(self, lane: str) -> None:
        if self.fault_injector is not None:
            self.fault_injector(lane)

    # ---------------------------------------------------------- streamed modules
    def stage_module(self, tag: object, host_region: torch.Tensor) -> torch.Tensor:
        """Bring a streamed module's pinned bytes into a module slot; the GPU lane waits for the copy."""
        self.check_open()
        view, ready, _ = self.module_ring.fetch(tag, host_region)
        self.lanes.wait(ready)
        return view

    def prefetch_module(self, tag: object, host_region: torch.Tensor) -> None:
        """Start copying a streamed module ahead of its use (the copy lane runs ahead of compute)."""
        self.module_ring.fetch(tag, host_region)

    def release_module(self, tag: object) -> None:
        """The GPU lane has issued everything that reads ``tag``'s slot."""
        self.module_ring.release(tag)

    # -------------------------------------------------------------- one layer step
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

        While :attr:`start_only` is set (a decode lookahead, see :mod:`hf_hybrid.decode_lookahead`), the
        step is only started: it is kept as :attr:`ahead` and :class:`StepStarted` is raised. A later call
        for the same group with :attr:`ahead_verified` set finishes that step instead of starting another.
        """
        ahead = self.ahead
        if ahead is not None and ahead.group is group and self.ahead_verified:
            self.ahead, self.ahead_verified = None, False
            return self.finish_group(ahead)
        self.settle_ahead()
        step = self.start_group(group, hidden, top_k_index, top_k_weights)
        if self.start_only:
            self.ahead = step
            raise StepStarted()
        return self.finish_group(step)

    def settle_ahead(self) -> None:
        """Finish a step started ahead that no forward took (a wrong lookahead, the end of a call) and drop
        its result, so no lane still works for it when the next step starts."""
        ahead, self.ahead, self.ahead_verified = self.ahead, None, False
        if ahead is not None:
            self.finish_group(ahead)

    def drop_ahead(self) -> None:
        """Forget a step started ahead without raising (a call that is failing anyway): its CPU job is
        waited for, so it never writes the shared buffers of a later step."""
        ahead, self.ahead, self.ahead_verified = self.ahead, None, False
        if ahead is not None:
            CpuLane.settle(ahead.cpu_future)

    def start_group(
        self,
        group: ExpertGroup,
        hidden: torch.Tensor,
        top_k_index: torch.Tensor | None = None,
        top_k_weights: torch.Tensor | None = None,
    ) -> GroupStep:
        """Stages 1-5 of :meth:`run_group`: the lanes are working on the step when this returns."""
        self.check_open()
        entered = time.perf_counter()
        if self._left_step is not None and entered - self._left_step < self.HOST_GAP_MAX_S:
            self.stats.host_gap_s += entered - self._left_step
            self.stats.host_gaps += 1
            if self.lanes.tracer is not None:
                self.lanes.tracer.add_host_span(
                    "host", f"L{group.layer} between steps", self._left_step, entered
                )
        merged = merge_resident_slices(group)
        if merged is not None:
            # a dense MLP held whole on the device: one piece, bit-identical to transformers' own MLP
            self.stats.groups += 1
            self.stats.gpu_units += len(group.units)
            with self.lanes.span("GPU", f"L{group.layer} resident MLP"):
                return GroupStep(group, hidden, done=gated_mlp(hidden, merged[0], merged[1], group.act_fn))
        predicting = self._next_to_predict(group, hidden.shape[0])
        span = self.lanes.host_span
        early_inputs = None
        if self._copies_inputs_early(group, hidden):
            # the CPU lane's inputs cross PCIe before the routing is read back: that read-back then waits
            # for them too, so the CPU job can start as soon as the routing has been assigned
            with span("host", f"L{group.layer} inputs to host"):
                # no arrival event: the routing read-back below is a blocking copy on the same stream, so
                # when it returns these copies are done (an event would cost a create, a record and a wait)
                early_inputs = self._host_inputs(
                    self._early_rows(group, hidden, top_k_index),
                    top_k_weights.reshape(-1),
                    arrival_event=False,
                )
        with span("host", f"L{group.layer} route"):  # includes the wait for the router's result
            routing, predicted = self._route(group, hidden, top_k_index, predicting)
        self._score_guess(group, routing)
        if predicting is not None:
            self._guesses = (predicting.layer, predicted)
        with span("host", f"L{group.layer} assign"):
            lanes = self._assign(group, routing)
        flat_weights = top_k_weights.reshape(-1) if routing.routed else None
        cpu_future = None
        if lanes.on_cpu or lanes.split:
            # the CPU lane first: it is the longest lane of a decode step, and it starts only when its job
            # is in (the device lanes' issuing below runs while it computes)
            with span("host", f"L{group.layer} submit CPU job"):
                if lanes.combine and early_inputs is not None and early_inputs.x.shape[0] > len(lanes.split):
                    # a one-token step: the copies of its row crossed with it (_early_rows)
                    cpu_hidden, host_inputs = hidden.expand(early_inputs.x.shape[0], -1), early_inputs
                elif lanes.combine:
                    cpu_hidden = self._with_divided_rows(hidden, lanes, routing)
                    host_inputs = self._host_inputs(cpu_hidden, flat_weights)
                else:
                    cpu_hidden = hidden
                    host_inputs = early_inputs or self._host_inputs(hidden, flat_weights)
                cpu_future = self._submit_cpu(group, lanes, cpu_hidden, host_inputs, routing)
        batch = self._device_batch(hidden, routing, lanes, flat_weights)
        if lanes.combine:
            batch.combine = {}
        step = GroupStep(group, hidden, cpu_future=cpu_future, lanes=lanes, routing=routing, acc=batch.acc)
        step.combine, step.flat_weights = batch.combine, flat_weights
        try:
            # the divided units' copies first (as many as there are staging slots): the copy lane starts at
            # once, whatever is issued after
            split = list(lanes.split.items())
            slots = len(self.expert_ring.slots) if self.expert_ring is not None else 0
            divided = self._copy_divided(group, split[:slots])

            def issue_device() -> None:
                self._compute_divided(group, divided, batch)
                for item in split[slots:]:  # each waits for a slot the ones before it release
                    self._compute_divided(group, self._copy_divided(group, [item]), batch)
                if split and self.balance_splits and self.lanes.is_cuda and lanes.regime == "small":
                    step.divided_done = self.lanes.record()
                self._stream(group, lanes.streamed, batch)
                if predicted:
                    self._prefetch_predicted(predicting, predicted, len(lanes.streamed) + len(lanes.split))
                self._resident(group, lanes.resident, batch)

            if self.start_only:
                # a step started ahead: its GPU-lane work is issued when it is taken, so the feeding thread
                # returns to the caller while the CPU and copy lanes already work
                step.issue_device = issue_device
            else:
                issue_device()
        except BaseException:
            # the step is abandoned: let the CPU lane finish before the error leaves, so no job of this
            # step still writes the shared buffers when the next call starts
            CpuLane.settle(cpu_future)
            raise
        if hidden.shape[0] > SPLIT_MAX_TOKENS:
            self._prefetch_next(group)
        self.stats.groups += 1
        self.stats.issue_s += time.perf_counter() - entered
        return step

    def finish_group(self, step: GroupStep) -> torch.Tensor:
        """Stage 6 of :meth:`run_group` (after the GPU-lane work a step started ahead left for now): join
        the CPU lane and return the step's output."""
        if step.done is not None:
            return step.done
        if step.issue_device is not None:
            issue, step.issue_device = step.issue_device, None
            entered = time.perf_counter()
            try:
                issue()
            except BaseException:
                CpuLane.settle(step.cpu_future)
                raise
            self.stats.issue_s += time.perf_counter() - entered
        divided_rows = self._join(step.group, step.cpu_future, step.lanes, step.routing, step.acc)
        if step.combine:
            self._combine_divided(step, divided_rows)
        if step.divided_done is not None:
            self._balance_splits(step)
        out = step.acc.to(step.hidden.dtype)
        self._left_step = time.perf_counter()
        return out

    # stage 1
    def _route(
        self, group: ExpertGroup, hidden: torch.Tensor, top_k_index, predicting: ExpertGroup | None
    ) -> tuple[Routing, list[int]]:
        """The routing of this step on the host, and the experts predicted for the next layer (read back in
        the same transfer, so the prediction costs no extra wait on the device)."""
        tokens = hidden.shape[0]
        if not group.routed:
            return Routing(counts=[tokens] * len(group.units)), []
        k = top_k_index.shape[1]
        flat = top_k_index.reshape(-1)
        n = flat.numel()
        if predicting is not None:
            # softmax keeps the order of the logits: the top-k of the logits are the router's choice
            guess = F.linear(hidden, self.router_weights[predicting.layer]).topk(k, dim=-1).indices
            flat = torch.cat([flat, guess.reshape(-1).to(flat.dtype)])
        # a blocking copy on the GPU lane's stream: the CPU lane's inputs copied before it (start_group's
        # early copies, which carry no arrival event) are on the host when it returns
        flat = flat.to("cpu")
        predicted = sorted(set(flat[n:].tolist())) if predicting is not None else []
        flat = flat[:n]
        order_list = None
        if n <= self.PYTHON_ROUTING_MAX:
            # a decode step's few (token, k) pairs: sorted and counted in Python, cheaper than four torch
            # ops on the feeding thread (the same stable order: equal experts keep their positions' order)
            experts = flat.tolist()
            order_list = sorted(range(n), key=experts.__getitem__)
            counts = [0] * max(len(group.units), max(experts) + 1)
            for e in experts:
                counts[e] += 1
            order = token_of = None  # made from the list if the step needs them (Routing.order)
        else:
            order = torch.argsort(flat, stable=True)
            counts = torch.bincount(flat, minlength=len(group.units)).tolist()
            token_of = order // k
        starts = [0]
        for c in counts:
            starts.append(starts[-1] + c)
        if self.record_routing:
            self.routed_tokens[group.layer] = self.routed_tokens.get(group.layer, 0) + tokens
            for i, c in enumerate(counts):
                if c:
                    self.routed_counts[(group.layer, i)] = self.routed_counts.get((group.layer, i), 0) + c
        routing = Routing(
            counts=counts,
            starts=starts,
            order_list=order_list,
            top_k=k,
            sorted_positions=order,
            sorted_tokens=token_of,
        )
        return routing, predicted

    def _score_guess(self, group: ExpertGroup, routing: Routing) -> None:
        """Count how many of the experts the last step predicted for this layer got tokens now."""
        if self._guesses is None:
            return
        layer, guessed = self._guesses
        self._guesses = None
        if layer != group.layer:
            return  # another call or layer ran in between: nothing to score
        counts = routing.counts
        self.stats.guessed_experts += len(guessed)
        self.stats.guessed_right += sum(1 for i in guessed if i < len(counts) and counts[i] > 0)

    def _next_to_predict(self, group: ExpertGroup, tokens: int) -> ExpertGroup | None:
        """The next MoE layer's group when a decode-sized step should predict its routing: it has host units
        that could be copied ahead, a router weight to predict with, and the copy lane may take them."""
        if (
            not self.predict_next_layer
            or not group.routed
            or tokens > SPLIT_MAX_TOKENS
            or self.expert_ring is None
            or self.token_assignment == "cpu"
        ):
            return None
        following = self.groups.get(group.layer + 1)
        if following is None or not following.routed or following.layer not in self.router_weights:
            return None
        if all(home == GPU for home in following.homes):
            return None
        return following

    def _prefetch_predicted(self, following: ExpertGroup, predicted: list[int], streamed_now: int) -> None:
        """Copy the next layer's predicted host experts into staging slots this step does not use, after this
        step's own copies; a right guess makes them free to run on the GPU there (assignment sees them
        staged), a wrong one costs only copy-lane time. Exact either way: only what is staged changes.

        An expert the next step will divide (S1, S4) gets only its GPU part copied, with the rows that step
        will choose (:meth:`_cpu_rows`), into the one slot this step leaves free: its copy then runs
        through the host's serial path between the two steps, when the copy lane would idle, and the next
        step finds the part staged (:meth:`_copy_divided`'s fetch hits)."""
        # slots this step leaves free; a whole expert keeps one of them for the next step's own choice, a
        # part need not (a wrong guess leaves the next step the slots this step used)
        free = len(self.expert_ring.slots) - streamed_now
        dividing = self.token_assignment in DIVIDING_ASSIGNMENTS and self.lanes.can_copy_column_blocks()
        fraction = split_fraction(self.profile, self.cpu_scale) if dividing else 0.0
        for i in predicted:
            if i >= len(following.homes) or following.homes[i] == GPU or i not in following.host_regions:
                continue
            if self.token_assignment == "static" and following.homes[i] != STREAM:
                continue  # static runs CPU-home units on the CPU whatever is staged
            if (following.layer, i) in self.expert_ring.by_tag:
                continue
            if dividing and divides(following.units[i], 1):
                rows = self._cpu_rows(following.shapes[i][0][0] // 2, fraction, remember=False)
                if free <= 0 or rows is None or (following.layer, i, rows) in self.expert_ring.by_tag:
                    continue
                self._copy_divided(following, [(i, rows)])
                self._parts_ahead.setdefault(following.layer, set()).add((i, rows))
            else:
                if free <= 1:
                    continue
                self.expert_ring.fetch((following.layer, i), following.host_regions[i])
            self.stats.predicted_units += 1
            free -= 1

    # stage 2
    def _assign(self, group: ExpertGroup, routing: Routing) -> Assignment:
        counts = routing.counts
        active = [i for i, c in enumerate(counts) if c > 0 and i < len(group.units)]
        host = [i for i in active if group.homes[i] != GPU]
        out = Assignment(resident=[i for i in active if group.homes[i] == GPU])
        if not host:
            return out
        ring = self.expert_ring
        out.regime = "small" if max(counts[i] for i in host) <= SPLIT_MAX_TOKENS else "large"
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
        if (
            self.token_assignment in DIVIDING_ASSIGNMENTS
            and ring is not None
            and self.lanes.can_copy_column_blocks()
        ):
            out.split = self._choose_splits(group, host, counts, work)
            if out.regime == "large" and self.prefill_splits:
                out.split.update(self._choose_prefill_splits(group, host, counts, work, out.split))
            # a divided expert's parts are summed, then rounded and weighted as transformers does a whole
            # expert's output (without: a tiny Mixtral's 8-token prompts drew up to 61 ulps, a routing
            # choice flipped by an unrounded expert output, and greedy bf16 generations left transformers'
            # tokens after 8-22 steps on 1-2 prompts of 6)
            out.combine = bool(out.split) and group.routed and self.combine_divided
            work = [w for i, w in zip(host, work) if i not in out.split]
        gpu_busy = sum(group.units[i].nbytes for i in out.resident) / self.profile.gpu_mem_bw
        issue = self._issue_times(out.regime)
        issue_resident, issue_streamed = issue["resident"], issue["streamed"]
        host_busy = len(out.resident) * issue_resident + len(out.split) * issue_streamed
        mode = "adaptive" if self.token_assignment == "whole" else self.token_assignment
        names = assign_tokens(
            work,
            self.profile,
            gpu_busy_s=gpu_busy,
            host_busy_s=host_busy,
            issue_s=issue_streamed,
            mode=mode,
            cpu_scale=self.cpu_scales[out.regime],
            memo=self._assignment_memo(),
        )
        if ring is None:
            names = set()
        whole = [i for i in host if i not in out.split]
        out.streamed = [i for i in whole if group.units[i].name in names]
        out.on_cpu = [i for i in whole if group.units[i].name not in names]
        profile_issue = issue_times(self.profile, tokens=1 if out.regime == "small" else None)[1]
        if not out.streamed and issue_streamed > profile_issue:
            # nothing was streamed, so nothing re-measures the issue time: drift back toward the profile's, so
            # one slow stretch (a busy machine) cannot keep the copy lane idle for good
            issue["streamed"] += self.CPU_SCALE_DECAY * (profile_issue - issue_streamed)
        if not out.on_cpu and not out.split and mode == "adaptive":
            # nothing ran on the CPU, so nothing corrects the factor: drift back toward the profile, so one
            # slow measurement cannot keep the CPU lane idle for good (a real slowdown is re-learned by the
            # next CPU job)
            self.cpu_scales[out.regime] += self.CPU_SCALE_DECAY * (1.0 - self.cpu_scales[out.regime])
        return out

    def _assignment_memo(self) -> dict:
        """The unit costs :func:`assign_tokens` keeps between steps, for the executor's current profile."""
        if self._memo_profile is not self.profile:
            self._memo_profile, self._unit_costs = self.profile, {}
        return self._unit_costs

    def _device_batch(self, hidden, routing: Routing, lanes: Assignment, flat_weights) -> DeviceBatch:
        dev = hidden.device
        batch = DeviceBatch(hidden=hidden, acc=None, routing=routing, flat_weights=flat_weights)
        if routing.routed and (lanes.resident or lanes.streamed or lanes.split):
            if hidden.shape[0] == 1:
                # every unit has the one token: its input is the step's row and its weight a host-known
                # position. The same values, shapes and ops as the gathered path, so the same bits (an
                # index_add_ of one row is an add), with two host-to-device copies and, per unit, three
                # kernel launches fewer on the feeding thread
                batch.positions = routing.order_list or routing.order.tolist()
                if self.graph_experts and not self.start_only:
                    # not for a step started ahead: it may overlap another step, and the buffers are shared
                    batch.acc = self.expert_graphs.begin(hidden, flat_weights.dtype)
                    batch.graphs = True
            else:
                batch.gather_routing()
        if batch.acc is None:
            batch.acc = torch.zeros(hidden.shape, dtype=torch.float32, device=dev)
        return batch

    # stage 3
    def _copies_inputs_early(self, group: ExpertGroup, hidden: torch.Tensor) -> bool:
        """Whether a step copies the CPU lane's inputs to the host before reading its routing back: a routed
        decode-sized step on an accelerator, of a layer with host units, whose CPU job the feeding thread
        starts itself (:attr:`direct_native_start`)."""
        tokens = hidden.shape[0]
        if tokens > 1 and self.combine_divided and self._may_divide(group):
            # its divided units (most steps of S1 batch 8 have some) send the CPU lane their tokens' rows
            # again after routing (_with_divided_rows): an early copy would be made for nothing
            return False
        return (
            self._starts_native_directly(tokens)
            and self.lanes.is_cuda
            and group.routed
            and group.homes.count(GPU) != len(group.homes)
        )

    def _early_rows(self, group: ExpertGroup, hidden: torch.Tensor, top_k_index) -> torch.Tensor:
        """What a one-token step copies to the host before its routing is known: the row, and where the layer
        may divide host units, top-k copies of it after it (a divided expert's CPU part reads and writes
        one of those rows, see _with_divided_rows: in a one-token step they are the step's row again)."""
        if hidden.shape[0] == 1 and self.combine_divided and self._may_divide(group):
            return hidden.expand(1 + top_k_index.shape[1], -1)
        return hidden

    def _may_divide(self, group: ExpertGroup) -> bool:
        """Whether decode-sized steps of ``group`` may divide a host unit (kept per layer until a re-homing)."""
        if self.token_assignment not in DIVIDING_ASSIGNMENTS:
            return False
        may = self._divisible.get(group.layer)
        if may is None:
            may = any(home != GPU and divides(unit, 1) for unit, home in zip(group.units, group.homes))
            self._divisible[group.layer] = may
        return may

    def _starts_native_directly(self, tokens: int) -> bool:
        """Whether a native CPU job of a step of ``tokens`` tokens is started by the feeding thread
        (CpuLane.start_native): decode-sized steps, with :attr:`direct_native_start`, not started ahead by a
        lookahead."""
        return self.direct_native_start and tokens <= SPLIT_MAX_TOKENS and not self.start_only

    def _host_inputs(self, hidden, flat_weights, arrival_event: bool = True) -> HostInputs:
        """Activations and routing weights on the host for the CPU lane, with their arrival event (none
        with ``arrival_event=False``: the caller synchronizes the stream before the CPU lane reads them)."""
        if not self.lanes.is_cuda:
            return HostInputs(hidden, flat_weights, None)
        # activations cross PCIe in reusable pinned buffers, asynchronously on the GPU lane
        x_host = self.pinned("x", tuple(hidden.shape), hidden.dtype)
        x_host.copy_(hidden, non_blocking=True)
        w_host = None
        if flat_weights is not None:
            w_host = self.pinned("w", tuple(flat_weights.shape), flat_weights.dtype)
            w_host.copy_(flat_weights, non_blocking=True)
        return HostInputs(x_host, w_host, self.lanes.record() if arrival_event else None)

    def _submit_cpu(self, group, lanes: Assignment, hidden, inputs: HostInputs, routing: Routing) -> Future:
        """Start the CPU lane on its units: whole units, and rows [0, r) of the divided ones (their down
        outputs stay fp32 until the GPU's rows are added)."""
        units = lanes.on_cpu + list(lanes.split)
        positions = None
        step_tokens = routing.starts[-1] // routing.top_k if routing.routed else hidden.shape[0]
        if step_tokens == 1 and routing.order_list is not None:
            # a one-token step: every unit has row 0 and one routing-weight position; index tensors made
            # once per position, not sliced per unit and step
            positions = [routing.order_list[routing.starts[i]] for i in units]
            row_lists = [self._one_token_rows(p) for p in positions]
        else:
            row_lists = [routing.rows(i) for i in units]
        if lanes.combine:
            # divided units read their tokens' copies past the step's rows and write their parts there,
            # unweighted (see _with_divided_rows): (rows, no routing-weight positions)
            row = step_tokens
            for n, i in enumerate(lanes.split, start=len(lanes.on_cpu)):
                count = routing.counts[i]
                if positions is not None:
                    row_lists[n], positions[n] = self._kept_row(row), ("row", row)
                else:
                    row_lists[n] = (torch.arange(row, row + count), None)
                row += count
        self.stats.cpu_units += len(lanes.on_cpu)
        self.stats.cpu_tokens += sum(hidden.shape[0] if r is None else r[0].numel() for r in row_lists)
        label = f"L{group.layer} cpu units {','.join(str(i) for i in lanes.on_cpu)}"
        if lanes.split:
            label += " rows of " + ",".join(f"{i}[:{r}]" for i, r in lanes.split.items())
        out = self.pinned("cpu_out", tuple(hidden.shape), torch.float32)
        self.stats.cpu_bytes += sum(self._cpu_bytes(group, i, lanes.split.get(i)) for i in units)
        weights = inputs.weights
        if self.cpu_kernels.native_applies(group, [routing.counts[i] for i in units]) and (
            weights is None or weights.dtype in (torch.bfloat16, torch.float32)
        ):
            native_lane = self.cpu_kernels.native_lane
            if positions is not None and weights is not None:
                packed = self._one_token_packed(group, lanes, units, positions, row_lists, inputs, out)
            else:
                packed = native_lane.pack(
                    inputs.x, self._native_jobs(group, lanes, units, row_lists, weights), out
                )
            self.stats.native_units += len(units)
            if self._starts_native_directly(step_tokens):
                self.stats.direct_native_jobs += 1
                return self.cpu_lane.start_native(
                    native_lane,
                    packed,
                    arrived=inputs.arrived,
                    on_start=self._fault_hook("cpu"),
                    label=label + " (native, direct)",
                    tracer=self.lanes.tracer,
                )
            job = native_units_job(
                native_lane,
                packed,
                inputs,
                out,
                on_start=self._fault_hook("cpu"),
                span=lambda: self.lanes.host_span("CPU lane", label + " (native)"),
            )
            return self.cpu_lane.submit(job)
        kernels = [self.cpu_kernels.kernel(group, i) for i in lanes.on_cpu]
        parts = []
        for n, (i, r) in enumerate(lanes.split.items(), start=len(lanes.on_cpu)):
            gate_up, down = group.host_weights[i]
            inter = gate_up.shape[0] // 2
            parts.append(RowPart(gate_up[:r], gate_up[inter : inter + r], down[:, :r], row_lists[n]))
        job = whole_units_job(
            kernels,
            row_lists[: len(lanes.on_cpu)],
            inputs,
            out,
            parts=parts,
            act_fn=group.act_fn,
            on_start=self._fault_hook("cpu"),
            span=lambda: self.lanes.host_span("CPU lane", label),
        )
        return self.cpu_lane.submit(job)

    @staticmethod
    def _native_jobs(group, lanes: Assignment, units, row_lists, weights) -> list:
        """The native lane's jobs of a step: whole units, and rows [0, r) of the divided ones."""
        from .kernels.native import ExpertJob

        jobs = []
        for i, rows in zip(units, row_lists):
            gate_up, down = group.host_weights[i]
            r = lanes.split.get(i)
            # rows of a divided unit, or a dense MLP's slice: a part of a sum, its down output stays fp32
            partial = r is not None or not group.routed
            # routed tokens pick their routing weight by position when the kernel runs: the device copy
            # filling ``weights`` may still be in flight now
            # (a divided unit's part kept apart, see _with_divided_rows, has rows and no positions: weight 1)
            tokens, index = (None, None) if rows is None else rows
            jobs.append(
                ExpertJob(
                    gate_up,
                    down,
                    rows=r,
                    tokens=tokens,
                    weights=None if index is None else weights,
                    weight_index=index,
                    partial=partial,
                )
            )
        return jobs

    def _one_token_packed(
        self, group, lanes: Assignment, units, positions, row_lists, inputs: HostInputs, out
    ):
        """A one-token step's native jobs, laid out from bytes kept per (unit, rows, routing-weight
        position, weights buffer): the same jobs repeat from step to step, and validating and packing each
        one again cost the feeding thread ~8 us a job on a 2-core machine. An entry holds the unit's
        weight tensors and is used only while they are still the unit's (a re-homed unit gets new ones)."""
        from .kernels.native import packed_job

        x, weights = inputs.x, inputs.weights
        if not self.lanes.is_cuda:
            # on the CPU standing in the routing weights are the router's own output, a new tensor every
            # step: a kept buffer keeps the bytes valid from step to step, as the pinned copy does on a GPU
            kept = self.pinned("w", tuple(weights.shape), weights.dtype)
            kept.copy_(weights)
            weights = kept
        shape = (x.dtype, x.shape[0], x.shape[1], weights.data_ptr(), weights.dtype, weights.numel())
        parts = []
        for i, position, rows in zip(units, positions, row_lists):
            gate_up, down = group.host_weights[i]
            key = (group.layer, i, lanes.split.get(i), position, shape)
            entry = self._packed_jobs.get(key)
            if entry is None or entry[0] is not gate_up or entry[1] is not down:
                job = self._native_jobs(group, lanes, [i], [rows], weights)[0]
                entry = (gate_up, down, packed_job(job, x.dtype, x.shape[0], x.shape[1]))
                if len(self._packed_jobs) >= self.PACKED_JOBS_MAX:
                    self._packed_jobs.clear()  # splits that moved on, buffers made again: start afresh
                self._packed_jobs[key] = entry
            parts.append(entry[2])
        return self.cpu_kernels.native_lane.pack_bytes(x, parts, out, [weights])

    def _kept_row(self, row: int) -> Rows:
        """``([row], None)``: a one-token step's divided unit reading and writing row ``row`` unweighted."""
        rows = self._one_token_row_cache.get(("row", row))
        if rows is None:
            rows = (torch.tensor([row], dtype=torch.long), None)
            self._one_token_row_cache[("row", row)] = rows
        return rows

    def _one_token_rows(self, position: int) -> Rows:
        """(token ids, routing-weight positions) of a unit in a one-token step: ``([0], [position])``."""
        rows = self._one_token_row_cache.get(position)
        if rows is None:
            rows = (torch.zeros(1, dtype=torch.long), torch.tensor([position], dtype=torch.long))
            self._one_token_row_cache[position] = rows
        return rows

    @staticmethod
    def _cpu_bytes(group: ExpertGroup, i: int, rows: int | None) -> int:
        """Weight bytes the CPU lane reads for unit ``i`` (all of it, or its rows [0, ``rows``))."""
        gate_up, down = group.host_weights[i]
        if rows is None:
            return gate_up.nbytes + down.nbytes
        return (gate_up.nbytes + down.nbytes) * rows // (gate_up.shape[0] // 2)

    # stage 4
    def _stream(self, group: ExpertGroup, streamed: list[int], batch: DeviceBatch) -> None:
        # copy (copy lane) then compute (GPU lane), interleaved so slots recycle safely
        regime = self._issue_regime(batch)  # whose issue times these experts teach (None: nobody's)
        for i in streamed:
            self._maybe_fault("stream")
            entered = time.perf_counter()
            (gate_up, down), ready, cached = self.expert_ring.fetch_carved(
                (group.layer, i), group.host_regions[i], group.shapes[i], group.dtype
            )
            fetched = time.perf_counter()
            self.lanes.wait(ready)
            with self.lanes.span("GPU", f"L{group.layer} streamed {i}"):
                self._device_unit(group, i, gate_up, down, batch)
            self.expert_ring.release((group.layer, i))
            if regime:
                issued = time.perf_counter()
                self._learn_issue("streamed", issued - entered, regime)
                if regime == "small":
                    self.stats.stream_issue_s += issued - entered
                    self.stats.stream_fetch_s += fetched - entered
                    self.stats.stream_issues += 1
            self.stats.streamed_units += 1
            self.stats.cached_units += int(cached)

    def _copy_divided(self, group: ExpertGroup, split: list[tuple[int, int]]) -> list:
        """The GPU's part of each divided unit crosses PCIe: gate/up rows [r, I) and down columns [r, I)
        (the down columns as one 2-D copy) go into a staging slot. Returns what
        :meth:`_compute_divided` needs."""
        copied = []
        for i, r in split:
            self._maybe_fault("stream")
            gate_up_host, down_host = group.host_weights[i]
            inter, hidden = gate_up_host.shape[0] // 2, gate_up_host.shape[1]
            tag = (group.layer, i, r)
            parts = [gate_up_host[r:inter], gate_up_host[inter + r :], down_host[:, r:]]
            shapes = ((inter - r, hidden), (inter - r, hidden), (down_host.shape[0], inter - r))
            tensors, ready, cached = self.expert_ring.fetch_carved(tag, parts, shapes, group.dtype)
            copied.append((i, r, inter, tag, tensors, ready, cached))
        return copied

    def _compute_divided(self, group: ExpertGroup, copied: list, batch: DeviceBatch) -> None:
        """The GPU lane computes each divided unit's part once its copy has landed; the down output is added
        in fp32, as the CPU lane adds its rows [0, r)."""
        for i, r, inter, tag, (gate, up, down), ready, cached in copied:
            self.lanes.wait(ready)
            with self.lanes.span("GPU", f"L{group.layer} unit {i} rows {r}:{inter}"):
                # kernel by kernel even where the step's whole experts replay graphs: a divided unit's shapes
                # follow its split, which moves with the learned rates, and recording a graph per split
                # cost S1 and S4 more than the replays saved (342 recordings for 1,317 replays on S1)
                if group.routed and batch.positions is not None:
                    y = partial_gated_mlp(batch.hidden, gate, up, down, group.act_fn)
                    if batch.combine is not None:
                        # added with the CPU lane's part after the join, weighted by its position
                        batch.combine[i] = (y, None, batch.positions[batch.routing.starts[i]])
                    else:
                        batch.acc.add_(y * batch.one_token_weight(i).float())
                elif group.routed:
                    first, end = batch.routing.starts[i], batch.routing.starts[i + 1]
                    tok = batch.device_tokens[first:end]
                    y = partial_gated_mlp(batch.hidden.index_select(0, tok), gate, up, down, group.act_fn)
                    if batch.combine is not None:
                        # added with the CPU lane's part after the join
                        batch.combine[i] = (y, tok, batch.device_rows[first:end])
                    else:
                        batch.acc.index_add_(0, tok, y * batch.device_weights[first:end, None].float())
                else:
                    batch.acc += partial_gated_mlp(batch.hidden, gate, up, down, group.act_fn)
            self.expert_ring.release(tag)
            self.stats.split_units += 1
            self.stats.cached_units += int(cached)

    # stage 5
    def _resident(self, group: ExpertGroup, resident: list[int], batch: DeviceBatch) -> None:
        regime = self._issue_regime(batch)
        for i in resident:
            self._maybe_fault("gpu")
            entered = time.perf_counter()
            gate_up, down = group.device_weights[i]
            with self.lanes.span("GPU", f"L{group.layer} resident {i}"):
                self._device_unit(group, i, gate_up, down, batch)
            if regime:
                self._learn_issue("resident", time.perf_counter() - entered, regime)
            self.stats.gpu_units += 1

    def _issue_regime(self, batch: DeviceBatch) -> str | None:
        """Which issue times this step's GPU-lane issuing teaches: "small" (:attr:`issue_seconds`) for a
        decode-sized MoE step on an accelerator, "large" (:attr:`prefill_issue_seconds`) for a prefill-sized
        one; None on the CPU standing in (issuing is computing there, which the cost model prices already)."""
        if not (self.lanes.is_cuda and batch.routing.routed):
            return None
        return "small" if batch.hidden.shape[0] <= SPLIT_MAX_TOKENS else "large"

    def _issue_times(self, regime: str) -> dict[str, float]:
        """The learned issue times of ``regime`` ("small": decode-sized steps, "large": prefill-sized)."""
        return self.issue_seconds if regime == "small" else self.prefill_issue_seconds

    def _learn_issue(self, kind: str, seconds: float, regime: str = "small") -> None:
        times = self._issue_times(regime)
        current = times[kind]
        seconds = min(seconds, self.ISSUE_MAX_S)
        times[kind] = current + self.ISSUE_WEIGHT * (seconds - current)

    def _device_unit(self, group, i, gate_up, down, batch: DeviceBatch) -> None:
        if batch.graphs:
            self.expert_graphs.whole(gate_up, down, group.act_fn, batch.one_token_weight(i))
            return
        if group.routed and batch.positions is not None:
            # an expert's output is rounded to the model dtype and weighted there, as transformers does;
            # adding in place promotes to fp32 exactly as .float() would
            y = gated_mlp(batch.hidden, gate_up, down, group.act_fn) * batch.one_token_weight(i)
            batch.acc.add_(y)
            return
        if group.routed:
            first, end = batch.routing.starts[i], batch.routing.starts[i + 1]
            tok = batch.device_tokens[first:end]
            x = batch.hidden.index_select(0, tok)
        else:
            x = batch.hidden
        if group.routed:
            # an expert's output is rounded to the model dtype and weighted there, as transformers does
            y = gated_mlp(x, gate_up, down, group.act_fn) * batch.device_weights[first:end, None]
            batch.acc.index_add_(0, tok, y.float())
        else:
            # a dense MLP's slice: its down output stays fp32, the slices are rounded once (after the join)
            batch.acc += gated_mlp(x, gate_up, down, group.act_fn, fp32_out=True)

    # stage 6
    def _join(self, group, cpu_future, lanes: Assignment, routing: Routing, acc) -> torch.Tensor | None:
        """Add the CPU lane's partial sums (the feeding thread sleeps on the future, it does not spin).
        Returns the rows of its output past the step's tokens, on the device: the divided units' CPU parts
        of a step that combines them (:meth:`_with_divided_rows`), None otherwise."""
        if cpu_future is None:
            return None
        # the last step's rate lesson, learned while this thread waits anyway (not between layer steps)
        self.learn_from_last_cpu_job()
        waited = time.perf_counter()
        with self.lanes.host_span("host", f"L{group.layer} wait for CPU lane"):
            cpu_out, seconds = CpuLane.join(cpu_future, group.layer)
        self.stats.join_wait_s += time.perf_counter() - waited
        self.stats.cpu_lane_s += seconds
        tokens = acc.shape[0]
        with self.lanes.host_span("host", f"L{group.layer} add CPU part"):
            arrived = cpu_out.to(acc.device, non_blocking=True)  # one copy, the divided parts' rows too
            acc += arrived[:tokens]
            divided_rows = arrived[tokens:] if cpu_out.shape[0] > tokens else None
        self._last_cpu_job = (group, lanes, routing.counts, seconds)
        return divided_rows

    def _with_divided_rows(self, hidden: torch.Tensor, lanes: Assignment, routing: Routing) -> torch.Tensor:
        """The CPU lane's input of a step that combines divided units: the step's rows, then each divided
        unit's tokens again, in :attr:`Assignment.split` order. The CPU lane writes a divided unit's part,
        unweighted, to those extra rows of its output (nothing else adds there), so after the join the two
        parts of each unit can be summed, rounded and weighted as the whole unit would be."""
        tokens = [routing.rows(i)[0] for i in lanes.split]
        return torch.cat([hidden, hidden[torch.cat(tokens).to(hidden.device, non_blocking=True)]])

    def _combine_divided(self, step: GroupStep, cpu_parts: torch.Tensor) -> None:
        """Add each divided unit as transformers adds a whole expert: its two parts summed in fp32 (the
        GPU's, kept since it was computed, and the CPU lane's rows of ``cpu_parts``), rounded to the model
        dtype, weighted there, added into the fp32 sum. Adding each part weighted on its own
        (``combine_divided`` off) skips that rounding: within a few ulps per layer, but among many near-tied
        routing choices one flips now and then (a tiny Mixtral: 96 ulps in the logits of a 48-token prompt,
        61 in one of eight 8-token prompts, other greedy bf16 tokens after 8 new ones on 2 prompts of 6;
        0 ulps and transformers' tokens this way)."""
        offset = 0
        dtype = step.hidden.dtype
        for i in step.lanes.split:
            gpu_part, tok, sel = step.combine[i]
            if tok is None:  # a one-token step: the step's row, its weight at position ``sel``
                y = (gpu_part + cpu_parts[offset : offset + 1]).to(dtype) * step.flat_weights[
                    sel : sel + 1, None
                ]
                step.acc.add_(y)  # in place, promoted to fp32 as .float() would
                offset += 1
                continue
            n = tok.shape[0]
            y = (gpu_part + cpu_parts[offset : offset + n]).to(dtype) * step.flat_weights[sel, None]
            step.acc.index_add_(0, tok, y.float())
            offset += n

    def _balance_splits(self, step: GroupStep) -> None:
        """Move one block of the divided units' rows from the lane that finished later to the other.

        Called when the CPU lane's part has just been joined: if the GPU lane's parts (copies and compute)
        are not done yet, the CPU lane takes one more block of rows in the next steps, else one block
        fewer. The rates alone leave the lanes apart by what they do not see: the copies start after the
        CPU lane (their issuing comes second), the GPU computes after its last copy, and each lane's rate
        inside a step differs from the profile's (on S1 on the H200 machine the GPU side finished ~1 ms
        after the CPU lane of a ~5 ms step). The split then dithers by a block around the point where both
        finish together; the bias is bounded by :attr:`SPLIT_BIAS_MAX_BLOCKS`."""
        move = -1 if self.lanes.is_done(step.divided_done) else 1
        step.divided_done = None
        limit = self.SPLIT_BIAS_MAX_BLOCKS
        for inter in {step.group.shapes[i][0][0] // 2 for i in step.lanes.split}:  # one move per step
            self.split_bias[inter] = max(-limit, min(limit, self.split_bias.get(inter, 0) + move))

    def learn_from_last_cpu_job(self) -> None:
        """Correct the CPU rate (:attr:`cpu_scales`) from the last CPU-lane job's measured time.

        Deferred from the job's join to the next one, whose wait hides it: the cost model's prediction is
        Python work that would otherwise sit between two layer steps with every lane idle."""
        if self._last_cpu_job is None:
            return
        group, lanes, counts, seconds = self._last_cpu_job
        self._last_cpu_job = None
        self._learn_cpu_rate(self._predicted_cpu_s(group, lanes, counts), seconds, lanes.regime)

    def _predicted_cpu_s(self, group: ExpertGroup, lanes: Assignment, counts: list[int]) -> float:
        """The cost model's time of a step's CPU-lane job (:func:`cpu_lane_time` of its whole units, and of
        each divided unit's rows [0, r) pro rata), from the unit costs kept between steps: when the CPU
        lane finished before the join, this runs on the feeding thread's path between two layer steps."""
        memo = self._assignment_memo()
        profile = self.profile

        def seconds(i: int) -> float:
            unit = group.units[i]
            return unit_costs(unit.name, counts[i], unit.nbytes, unit.flops_per_token, profile, memo)[0]

        predicted = 0.0
        if lanes.on_cpu:
            share = lane_shares(profile, max(counts[i] for i in lanes.on_cpu), memo)[0]
            predicted = CPU_ROUND_TRIP_S + sum(seconds(i) for i in lanes.on_cpu) / share
        for i, r in lanes.split.items():
            inter = group.shapes[i][0][0] // 2
            share = lane_shares(profile, counts[i], memo)[0]
            predicted += (CPU_ROUND_TRIP_S + seconds(i) / share) * r / inter
        return predicted

    def _learn_cpu_rate(self, predicted_s: float, measured_s: float, regime: str = "small") -> None:
        if predicted_s < self.CPU_SCALE_MIN_JOB_S or measured_s <= 0:
            return
        lo, hi = self.CPU_SCALE_RANGE
        ratio = min(hi, max(lo, measured_s / predicted_s))
        self.cpu_scales[regime] += self.CPU_SCALE_WEIGHT * (ratio - self.cpu_scales[regime])

    def _fault_hook(self, lane: str):
        injector = self.fault_injector
        return None if injector is None else (lambda: injector(lane))

    def _choose_splits(self, group, host, counts, work) -> dict[int, int]:
        """Host units of a small step to divide between the lanes, with the CPU lane's rows [0, r): the
        share of the lanes' rates while both run (:func:`split_fraction`, with the learned CPU factor), in
        blocks of 64 rows so the streamed down columns start on a 128-byte boundary. A unit already in a
        staging slot runs whole on the GPU (no copy left to share).

        The split stays where it was while the learned factor moves it by at most two blocks: every new
        split is a new GEMM shape for the GPU lane, and a new shape costs the feeding thread a BLAS
        heuristic lookup in the middle of the layer step (on the H200 machine a GEMV's host cost was 43 us
        with a new shape every call against 21-27 us with a stable one). On an accelerator the split then
        moves by the blocks :meth:`_balance_splits` learned from which lane finished first.

        Where a unit's GPU part is staged already (copied ahead from a routing prediction,
        :meth:`_prefetch_predicted`), the other divided units of the step give the copy lane the rows it has
        time for (:meth:`_rebalanced`)."""
        fraction = split_fraction(self.profile, self.cpu_scale)
        split, staged = {}, []
        ring = self.expert_ring
        # parts the previous layer step copied ahead for this one (a part left in a slot by an earlier token
        # does not count: what a step computes must not depend on what earlier calls left in the slots)
        ahead = self._parts_ahead.pop(group.layer, ())
        for i, w in zip(host, work):
            if w.staged or not divides(group.units[i], counts[i]):
                continue
            rows_on_cpu = self._cpu_rows(group.shapes[i][0][0] // 2, fraction, remember=True)
            if rows_on_cpu is not None:
                split[i] = rows_on_cpu
                if (i, rows_on_cpu) in ahead and (group.layer, i, rows_on_cpu) in ring.by_tag:
                    staged.append(i)
        if staged and len(staged) < len(split):
            split.update(self._rebalanced(group, split, staged))
        return split

    def _rebalanced(self, group: ExpertGroup, split: dict[int, int], staged: list[int]) -> dict[int, int]:
        """New CPU rows for the divided units of a step whose other divided units' GPU parts are staged: the
        copy lane has only the former's parts to copy, so they move rows from the CPU lane to it until both
        lanes take as long (one fraction for all of them, in blocks; the kept split is not changed, so the
        next step without a staged part is back where it was). Both lanes' rates are those while both run
        (:func:`split_rates`)."""
        cpu_rate, pcie_rate = split_rates(self.profile, self.cpu_scale)
        if cpu_rate <= 0 or pcie_rate <= 0:
            return {}

        def inter(i: int) -> int:
            return group.shapes[i][0][0] // 2

        staged_cpu_s = sum(group.units[i].nbytes * split[i] / inter(i) for i in staged) / cpu_rate
        others = [i for i in split if i not in staged]
        total = sum(group.units[i].nbytes for i in others)
        # CPU: staged_cpu_s + f * total / cpu_rate; copy lane: (1 - f) * total / pcie_rate
        fraction = (total / pcie_rate - staged_cpu_s) / (total / cpu_rate + total / pcie_rate)
        moved = {}
        for i in others:
            rows, block = _rows_in_blocks(fraction, inter(i))
            moved[i] = max(block, min(inter(i) - block, rows))
        return moved

    def _cpu_rows(self, inter: int, fraction: float, remember: bool) -> int | None:
        """The CPU lane's rows [0, r) of a divided unit with ``inter`` intermediate rows in a decode-sized
        step (see :meth:`_choose_splits`), or None where the split leaves one lane nothing. ``remember``:
        the split is the one a step uses (later splits stay there while the factor wobbles); a prediction
        (:meth:`_prefetch_predicted`) leaves it as it is."""
        rows_on_cpu, block = _rows_in_blocks(fraction, inter)
        kept = self._split_rows.get(inter)
        if kept is not None and abs(rows_on_cpu - kept) <= 2 * block:
            rows_on_cpu = kept
        if remember:
            self._split_rows[inter] = rows_on_cpu
        if self.balance_splits:
            # where the lanes really finish (see _balance_splits), within one block of each end
            biased = rows_on_cpu + self.split_bias.get(inter, 0) * block
            rows_on_cpu = max(block, min(inter - block, biased)) if 0 < rows_on_cpu < inter else rows_on_cpu
        return rows_on_cpu if 0 < rows_on_cpu < inter else None

    def _choose_prefill_splits(self, group, host, counts, work, divided) -> dict[int, int]:
        """Host units of a prefill-sized step to divide between the lanes (with :attr:`prefill_splits`):
        rows [0, r) of each on the CPU lane, the rest copied and computed on the GPU, with r such that both
        parts take as long (:func:`prefill_split_fraction`, with the CPU factor learned from prefill jobs),
        in blocks of 64 rows. Whole units leave one lane idle at the end of the layer: S1's five or six host
        experts a prefill step, 336 MiB each, take the CPU lane ~3x their copy time, so at most one of them
        goes to the CPU and the copy lane does the rest alone. A unit already in a staging slot, or divided
        already (``divided``), is left as it is."""
        split = {}
        scale = self.cpu_scales["large"]
        for i, w in zip(host, work):
            unit = group.units[i]
            if w.staged or i in divided or not divides_in_prefill(unit, counts[i]):
                continue
            inter = group.shapes[i][0][0] // 2
            fraction = prefill_split_fraction(unit, counts[i], self.profile, scale)
            rows_on_cpu, _ = _rows_in_blocks(fraction, inter)
            if 0 < rows_on_cpu < inter:
                split[i] = rows_on_cpu
        return split

    def _prefetch_next(self, group: ExpertGroup) -> None:
        """A prefill-sized step uses nearly every expert of the next layer: copy the next layer's first
        stream-home units into the slots this layer no longer needs, so the copy lane works through this
        layer's tail, the attention and the routing. The last layer of a chunked prompt's forward does the
        same for the first layer when another chunk follows (:attr:`prefill_follows`): the copy lane then
        works through the forward's end, generate's loop and the next chunk's first attention."""
        if self.expert_ring is None or self.token_assignment == "cpu":
            return
        later = [g for layer, g in self.groups.items() if layer > group.layer]
        if later:
            following = min(later, key=lambda g: g.layer)
        elif self.prefill_follows and self.groups:
            following = self.groups[min(self.groups)]
        else:
            return
        budget = len(self.expert_ring.slots) - 1  # leave one slot for what the next step decides
        for i, home in enumerate(following.homes):
            if budget == 0:
                break
            if home == STREAM and i in following.host_regions:
                self.expert_ring.fetch((following.layer, i), following.host_regions[i])
                self.stats.prefetched_units += 1
                budget -= 1

    def prepare_cpu_kernels(self, groups, progress: bool = True) -> int:
        """Build the CPU kernels (and packed copies) of every CPU-home unit now; returns their extra bytes."""
        return self.cpu_kernels.prepare(groups, progress)

    # ------------------------------------------------------------------ placement changes
    def rehome(self, group: ExpertGroup, i: int, home: str) -> None:
        """Move unit ``i`` of ``group`` to ``home`` (weights cross PCIe once; for re-planning)."""
        rehome_unit(group, i, home, self.device, pin=self.lanes.is_cuda)
        group.cpu_kernels.pop(i, None)
        self._packed_jobs.clear()  # entries hold the old host tensors: let them go
        self._divisible.pop(group.layer, None)
        if self.expert_ring is not None:
            self.expert_ring.by_tag.pop((group.layer, i), None)
