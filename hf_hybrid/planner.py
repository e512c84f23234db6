"""Where every unit lives, and where every expert's tokens run: the cost model, the partition and the
token-assignment policy.

Pure Python over :class:`~hf_hybrid.units.Unit` shapes and a :class:`~hf_hybrid.profile.HardwareProfile`;
nothing here touches a device, so every decision can be unit-tested and printed without weights.

The model of one step (prefill of T tokens, or one decode step of B tokens) per layer is three lanes that
run at once -- the CPU lane (units computed on the CPU), the PCIe lane (units streamed into staging slots)
and the GPU lane (resident and arrived units) -- so a layer costs the *max* of its lanes plus the
activation round trip to the CPU, not their sum.
"""

from __future__ import annotations

import fnmatch
import json
import math
import random
import time
from dataclasses import dataclass, field

from .errors import BudgetError, PlacementError
from .profile import LANE_GEMM_TOKENS, HardwareProfile
from .units import CPU, GPU, HOMES, STREAM, Unit, format_bytes

#: Budgets at or above this are "unlimited" (the CPU standing in with no gpu_memory given).
UNLIMITED = 1 << 61
#: Fixed cost of sending activations to the CPU lane and back (launch + sync latency), seconds.
CPU_ROUND_TRIP_S = 60e-6
#: The token-assignment policies (see :func:`assign_tokens`; "split" also divides experts between lanes).
TOKEN_ASSIGNMENTS = ("adaptive", "static", "cpu", "stream", "split")
#: Token assignment "split" divides host experts only in steps of at most this many tokens (decode);
#: bigger steps assign whole experts, where the GPU's compute advantage dominates.
SPLIT_MAX_TOKENS = 16
#: Serial host time of a layer step: the feeding thread runs the next attention block in Python, waits for
#: the router's result on the host and issues the lanes, while the lanes idle.
#: Fitted to six H100 runs of 2026-11-25 (S1 at batch 1 and 8, S3, S4; traces showed 1-4 ms between
#: layers with every lane idle): about 1 ms per layer plus 0.9 ms per host expert used in a decode step.
LAYER_HOST_S = 1.0e-3
UNIT_HOST_S = 0.9e-3
#: Staging slots per class: two for double buffering plus one so a copy can run ahead of compute.
EXPERT_STAGING_SLOTS = 3
MODULE_STAGING_SLOTS = 2


@dataclass(frozen=True)
class Workload:
    """What the user will run: prompt length, new tokens and batch size (tokens per decode step)."""

    prompt_tokens: int = 512
    new_tokens: int = 128
    batch: int = 1

    def __post_init__(self):
        for name in ("prompt_tokens", "new_tokens", "batch"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"Workload.{name} must be >= 1 (got {getattr(self, name)})")


@dataclass
class StagingClass:
    """A ring of equal device slots that streamed units of one kind are copied into."""

    name: str
    slot_bytes: int
    slots: int

    @property
    def nbytes(self) -> int:
        """Device bytes the ring reserves."""
        return self.slot_bytes * self.slots


# ----------------------------------------------------------------------------------------------- cost model
def usage_probability(
    unit: Unit, routing: dict[str, float], experts_per_layer: dict[int, tuple[int, int]]
) -> float:
    """Probability that one token routes to ``unit`` (1 for everything that is not an expert)."""
    if unit.kind != "expert":
        return 1.0
    if unit.name in routing:
        return routing[unit.name]
    n_experts, top_k = experts_per_layer[unit.layer]
    return top_k / n_experts


def gpu_time(unit: Unit, tokens: float, profile: HardwareProfile) -> float:
    """Seconds to compute ``unit`` on ``tokens`` tokens with its weights already on the device."""
    if tokens <= 0:
        return 0.0
    return max(unit.nbytes / profile.gpu_mem_bw, tokens * unit.flops_per_token / profile.gpu_flops)


def cpu_time(unit: Unit, tokens: float, profile: HardwareProfile) -> float:
    """Seconds for the CPU lane to compute ``unit`` on ``tokens`` tokens (weights read from DRAM).

    The kernel rates were measured on the profiling thread; the CPU lane runs in its own worker thread
    with one core fewer, which the profile measures too (:func:`lane_factor`).
    """
    if tokens <= 0:
        return 0.0
    m = max(1, round(tokens))
    solo = max(unit.nbytes / profile.cpu_weight_bw(m), tokens * unit.flops_per_token / profile.cpu_flops(m))
    return solo / lane_factor(profile, m)


def lane_factor(profile: HardwareProfile, tokens: int) -> float:
    """The CPU lane's rate in its worker thread over the profiling thread's, for a job of ``tokens``."""
    if tokens <= SPLIT_MAX_TOKENS:
        lane, solo = profile.cpu_lane_gemv_bw, profile.cpu_weight_bw(1)
    else:
        lane, solo = profile.cpu_lane_gemm_flops, profile.cpu_flops(LANE_GEMM_TOKENS)
    if not lane or not solo:
        return 1.0  # a profile from before these were measured
    return max(0.05, min(1.5, lane / solo))


def cpu_share(profile: HardwareProfile, tokens: int = 1) -> float:
    """Fraction of its own rate the CPU lane keeps while PCIe copies run (they share DRAM and cores)."""
    if tokens > SPLIT_MAX_TOKENS and profile.cpu_lane_gemm_flops and profile.cpu_lane_gemm_flops_during_copy:
        return max(0.05, min(1.0, profile.cpu_lane_gemm_flops_during_copy / profile.cpu_lane_gemm_flops))
    lane_solo = profile.cpu_weight_bw(1) * lane_factor(profile, 1)
    return max(0.05, min(1.0, profile.cpu_gemv_bw_during_copy / lane_solo))


def cpu_lane_time(units_and_tokens: list[tuple[Unit, int]], profile: HardwareProfile) -> float:
    """Predicted seconds of one CPU-lane job (as :func:`assign_tokens` costs it, before any correction)."""
    if not units_and_tokens:
        return 0.0
    share = cpu_share(profile, max(n for _, n in units_and_tokens))
    return CPU_ROUND_TRIP_S + sum(cpu_time(u, n, profile) for u, n in units_and_tokens) / share


def split_fraction(profile: HardwareProfile, cpu_scale: float = 1.0) -> float:
    """Share of an expert's intermediate rows the CPU lane takes when one expert is split between lanes.

    The CPU lane reads gate/up rows [0, r) and the whole down projection ((2f + 1) thirds of the expert),
    the copy lane brings gate/up rows [r, I) (2(1 - f) thirds); both finish together when
    (2f + 1) / c = 2 (1 - f) / p, with c and p the lanes' rates while both run.
    """
    c = profile.cpu_gemv_bw_during_copy / cpu_scale
    p = profile.h2d_bw_during_cpu
    return max(0.0, min(1.0, (2 * c - p) / (2 * (c + p))))


def pcie_share(profile: HardwareProfile) -> float:
    """Fraction of its solo rate the copy lane keeps while the CPU lane reads DRAM."""
    return max(0.05, min(1.0, profile.h2d_bw_during_cpu / profile.h2d_bw))


def copy_time(unit: Unit, profile: HardwareProfile) -> float:
    """Seconds to stream ``unit``'s weights over PCIe from pinned memory."""
    return unit.nbytes / profile.h2d_bw


def home_time(unit: Unit, home: str, tokens: float, profile: HardwareProfile) -> float:
    """Seconds one use of ``unit`` costs in ``home`` (ignores overlap with other units)."""
    if home == GPU:
        return gpu_time(unit, tokens, profile)
    if home == CPU:
        return cpu_time(unit, tokens, profile)
    return copy_time(unit, profile) + gpu_time(unit, tokens, profile)


# --------------------------------------------------------------------------------------- token assignment
@dataclass(frozen=True)
class HostWork:
    """One non-resident expert (or MLP slice) with routed tokens in the current step."""

    name: str
    tokens: int
    nbytes: int
    flops_per_token: int
    staged: bool = False  # its weights are still in a staging slot from an earlier step
    home: str = CPU


def assign_tokens(
    work: list[HostWork],
    profile: HardwareProfile,
    *,
    gpu_busy_s: float = 0.0,
    mode: str = "adaptive",
    cpu_scale: float = 1.0,
) -> set[str]:
    """Decide which host units of one layer step run on the GPU (streamed) rather than on the CPU.

    ``mode="static"`` follows each unit's home. ``"adaptive"`` is a longest-processing-time greedy
    over two lanes: biggest job first, each to the lane that would finish it earliest, where the
    CPU lane costs :func:`cpu_time` and the GPU side costs the copy (free if ``staged``) on the PCIe lane
    and the compute on the GPU lane. Both lanes are costed at their rates while the other one runs (they
    share DRAM), and the first CPU job pays the activations' round trip. ``cpu_scale`` multiplies the CPU
    costs: the executor sets it from how long its CPU lane really took against this prediction. Returns
    the names to stream.
    """
    if mode not in TOKEN_ASSIGNMENTS:
        raise ValueError(f"unknown token assignment mode {mode!r}")
    if mode == "static":
        return {w.name for w in work if w.home == STREAM}
    if mode == "cpu":
        return set()
    if mode == "stream":
        return {w.name for w in work}
    streamed: set[str] = set()
    cpu_lane = 0.0
    pcie_lane = 0.0
    gpu_lane = gpu_busy_s
    costed = []
    largest = max((w.tokens for w in work), default=1)
    cpu_factor, pcie_factor = cpu_scale / cpu_share(profile, largest), 1.0 / pcie_share(profile)
    for w in work:
        unit = Unit(w.name, "expert", None, w.nbytes, w.flops_per_token, HOMES)
        c = cpu_time(unit, w.tokens, profile) * cpu_factor
        g = gpu_time(unit, w.tokens, profile)
        x = 0.0 if w.staged else copy_time(unit, profile) * pcie_factor
        costed.append((max(c, x + g), c, g, x, w.name))
    for _, c, g, x, name in sorted(costed, reverse=True):
        cpu_finish = (cpu_lane or CPU_ROUND_TRIP_S) + c
        arrive = pcie_lane + x
        gpu_finish = max(arrive, gpu_lane) + g
        if gpu_finish < cpu_finish:
            streamed.add(name)
            pcie_lane = arrive
            gpu_lane = gpu_finish
        else:
            cpu_lane = cpu_finish
    return streamed


# ------------------------------------------------------------------------------------------------ the plan
@dataclass
class HybridPlan:
    """The partition: each unit's home, the device memory it costs, and what it predicts.

    ``print(plan)`` shows a table; ``plan.to_dict()`` is JSON-able.
    """

    units: list[Unit]
    homes: dict[str, str]
    budget_bytes: int
    kv_cache_bytes: int
    workspace_bytes: int
    staging: list[StagingClass]
    profile: HardwareProfile
    workload: Workload
    routing: dict[str, float] = field(default_factory=dict)
    token_assignment: str = "adaptive"  # the executor's policy, which the predictions assume
    predicted: dict[str, float] = field(default_factory=dict)
    unit_times: dict[str, dict[str, float]] = field(default_factory=dict)
    # what the last generate call really did (set by the model after each call; empty before the first):
    # prompt_tokens, batch, prefill_tok_s, decode_tok_s, decode_steps -- to set beside the predictions
    measured: dict[str, float] = field(default_factory=dict)

    # -- queries
    def home(self, name: str) -> str:
        """Home of the unit called ``name``."""
        return self.homes[name]

    def units_in(self, home: str) -> list[Unit]:
        """All units whose home is ``home``."""
        return [u for u in self.units if self.homes[u.name] == home]

    @property
    def resident_bytes(self) -> int:
        """Weight bytes resident on the device."""
        return sum(u.nbytes for u in self.units_in(GPU))

    @property
    def staging_bytes(self) -> int:
        """Device bytes of all staging rings."""
        return sum(s.nbytes for s in self.staging)

    @property
    def device_bytes(self) -> int:
        """Everything the plan puts on the device: weights, KV cache, workspace, staging."""
        return self.resident_bytes + self.kv_cache_bytes + self.workspace_bytes + self.staging_bytes

    def to_dict(self) -> dict:
        """JSON-able form of the plan."""
        return {
            "units": [
                {
                    "name": u.name,
                    "kind": u.kind,
                    "layer": u.layer,
                    "home": self.homes[u.name],
                    "bytes": u.nbytes,
                    "predicted_s": self.unit_times.get(u.name, {}),
                }
                for u in self.units
            ],
            "budget": {
                "total": self.budget_bytes,
                "resident_weights": self.resident_bytes,
                "kv_cache": self.kv_cache_bytes,
                "workspace": self.workspace_bytes,
                "staging": self.staging_bytes,
                "free": self.budget_bytes - self.device_bytes,
            },
            "staging": [{"name": s.name, "slot_bytes": s.slot_bytes, "slots": s.slots} for s in self.staging],
            "homes": {h: len(self.units_in(h)) for h in HOMES},
            "workload": {
                "prompt_tokens": self.workload.prompt_tokens,
                "new_tokens": self.workload.new_tokens,
                "batch": self.workload.batch,
            },
            "token_assignment": self.token_assignment,
            "predicted": {k: (v if math.isfinite(v) else None) for k, v in self.predicted.items()},
            "measured": dict(self.measured),
            "profile": self.profile.to_dict(),
        }

    def to_json(self) -> str:
        """The plan as a JSON string."""
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        lines = ["hf_hybrid plan", ""]
        lines.append(
            f"{'unit':<28} {'kind':<13} {'home':<6} {'bytes':>10} {'prefill ms':>10} {'decode ms':>10}"
        )
        grouped = _group_rows(self)
        for name, kind, home, nbytes, pre, dec in grouped:
            lines.append(
                f"{name:<28} {kind:<13} {home:<6} {format_bytes(nbytes):>10} {pre * 1e3:>10.3f} {dec * 1e3:>10.3f}"
            )
        d = self.to_dict()["budget"]
        lines.append("")
        unlimited = d["total"] >= UNLIMITED
        lines.append(
            f"device budget {'unlimited' if unlimited else format_bytes(d['total'])}: weights "
            f"{format_bytes(d['resident_weights'])}, KV cache {format_bytes(d['kv_cache'])}, workspace "
            f"{format_bytes(d['workspace'])}, staging {format_bytes(d['staging'])}"
            + ("" if unlimited else f", free {format_bytes(d['free'])}")
        )
        counts = ", ".join(f"{h} {len(self.units_in(h))}" for h in HOMES)
        lines.append(f"units per home: {counts}")
        p = self.predicted
        if p:
            wl = self.workload
            for phase, what, digits in (
                ("prefill", f"prefill ({wl.prompt_tokens} tokens x {wl.batch})", 1),
                ("decode", f"decode (batch {wl.batch})", 2),
            ):
                bound = p[f"{phase}_bound_tok_s"]
                # nothing off the device means no transfer bound to compare with
                tail = (
                    f" (bound {bound:.{digits}f}, {100 * p[f'{phase}_fraction_of_bound']:.0f}%)"
                    if math.isfinite(bound)
                    else " (everything resident: no PCIe/CPU bound)"
                )
                lines.append(f"predicted {what}: {p[f'{phase}_tok_s']:.{digits}f} tok/s{tail}")
        m = self.measured
        if m.get("prefill_tok_s"):
            line = f"measured by the last generate: prefill ({m['prompt_tokens']:.0f} tokens x {m['batch']:.0f}) "
            line += f"{m['prefill_tok_s']:.1f} tok/s"
            if m.get("decode_tok_s"):
                line += f", decode {m['decode_tok_s']:.2f} tok/s over {m['decode_steps']:.0f} steps"
            lines.append(line)
        return "\n".join(lines)

    __repr__ = __str__


def _group_rows(plan: HybridPlan) -> list[tuple]:
    """Table rows; runs of experts/slices of one layer with the same home are folded into one row."""
    rows: list[tuple] = []
    for u in plan.units:
        home = plan.homes[u.name]
        t = plan.unit_times.get(u.name, {})
        pre, dec = t.get("prefill", 0.0), t.get("decode", 0.0)
        if u.is_expert_like and rows and rows[-1][6] == (u.layer, u.kind, home):
            name, kind, _, nbytes, p0, d0, key, first = rows[-1]
            rows[-1] = (
                f"layers.{u.layer}.{_plural(u)}.{first}-{u.index}",
                kind,
                home,
                nbytes + u.nbytes,
                p0 + pre,
                d0 + dec,
                key,
                first,
            )
        else:
            rows.append((u.name, u.kind, home, u.nbytes, pre, dec, (u.layer, u.kind, home), u.index))
    return [r[:6] for r in rows]


def _plural(unit: Unit) -> str:
    return "experts" if unit.kind == "expert" else "mlp"


# ---------------------------------------------------------------------------------------------- planning
def resolve_forced(units: list[Unit], forced: dict[str, str] | None) -> dict[str, str]:
    """Expand ``{"layers.*.experts.1": "cpu", ...}`` (fnmatch patterns) into unit name -> home.

    Later patterns win. Unknown patterns and homes a unit cannot have raise :class:`PlacementError`.
    """
    result: dict[str, str] = {}
    for pattern, home in (forced or {}).items():
        if home not in HOMES:
            raise PlacementError(f"placement {pattern!r} -> {home!r}: home must be one of {', '.join(HOMES)}")
        matched = [u for u in units if fnmatch.fnmatchcase(u.name, pattern)]
        if not matched:
            examples = ", ".join(u.name for u in units[:6])
            raise PlacementError(
                f"placement pattern {pattern!r} matches no unit (unit names look like {examples}, ...)"
            )
        for u in matched:
            if home not in u.homes:
                raise PlacementError(
                    f"unit {u.name} ({u.kind}) cannot live in {home!r}; allowed homes: {', '.join(u.homes)}"
                )
            result[u.name] = home
    return result


def _experts_per_layer(units: list[Unit], top_k: int | dict[int, int]) -> dict[int, tuple[int, int]]:
    counts: dict[int, int] = {}
    for u in units:
        if u.kind == "expert":
            counts[u.layer] = counts.get(u.layer, 0) + 1
    k = (lambda layer: top_k.get(layer, 1)) if isinstance(top_k, dict) else (lambda layer: top_k)
    return {layer: (n, min(k(layer), n)) for layer, n in counts.items()}


def _staging_for(units: list[Unit], homes: dict[str, str]) -> list[StagingClass]:
    """Rings needed by the host-side units of ``homes`` (any host expert may be streamed at run time)."""
    rings = []
    host_experts = [u for u in units if u.is_expert_like and homes[u.name] != GPU]
    if host_experts:
        rings.append(StagingClass("experts", max(u.nbytes for u in host_experts), EXPERT_STAGING_SLOTS))
    streamed_modules = [u for u in units if not u.is_expert_like and homes[u.name] == STREAM]
    if streamed_modules:
        rings.append(StagingClass("modules", max(u.nbytes for u in streamed_modules), MODULE_STAGING_SLOTS))
    return rings


def plan(
    units: list[Unit],
    profile: HardwareProfile,
    budget_bytes: int,
    *,
    kv_cache_bytes: int = 0,
    workspace_bytes: int = 0,
    workload: Workload | None = None,
    top_k: int | dict[int, int] = 2,
    forced: dict[str, str] | None = None,
    routing: dict[str, float] | None = None,
    search_rounds: int = 40,
    token_assignment: str = "adaptive",
) -> HybridPlan:
    """Choose every unit's home to minimise predicted time of the workload under ``budget_bytes``.

    The objective is the predicted seconds of one prefill of the workload's prompt plus ``new_tokens``
    decode steps (see :func:`predict`). The device holds the KV cache, the workspace and the staging
    rings first. A greedy pass makes units resident in order of predicted time saved per byte (usage
    probability x (host time - GPU time), prefill and decode weighted by the workload), continuing past
    a unit that does not fit so the budget is filled to the last unit that fits; host units are split
    between the CPU and PCIe lanes per layer so both finish together. A local search then moves single
    units between homes and swaps resident and host units while the objective improves. It runs twice:
    with every non-expert module resident (no module staging ring) and with streamed modules allowed.
    """
    if token_assignment not in TOKEN_ASSIGNMENTS:
        raise ValueError(
            f"token_assignment must be one of {', '.join(TOKEN_ASSIGNMENTS)} (got {token_assignment!r})"
        )
    workload = workload or Workload()
    routing = dict(routing or {})
    forced_homes = resolve_forced(units, forced)
    per_layer = _experts_per_layer(units, top_k)
    fixed = kv_cache_bytes + workspace_bytes

    def make(homes: dict[str, str]) -> HybridPlan:
        return HybridPlan(
            units=list(units),
            homes=homes,
            budget_bytes=budget_bytes,
            kv_cache_bytes=kv_cache_bytes,
            workspace_bytes=workspace_bytes,
            staging=_staging_for(units, homes),
            profile=profile,
            workload=workload,
            routing=routing,
            token_assignment=token_assignment,
        )

    everything = {u.name: forced_homes.get(u.name, GPU) for u in units}
    whole = make(everything)
    if whole.device_bytes <= budget_bytes:
        predict(whole, per_layer)
        return whole
    if any(h == GPU for h in forced_homes.values()) and all(
        forced_homes.get(u.name) is not None or u.homes == (GPU,) for u in units
    ):
        raise BudgetError(
            f"the forced placement needs {format_bytes(whole.device_bytes)} on the device but gpu_memory is "
            f"{format_bytes(budget_bytes)}: force fewer units to 'gpu' or raise gpu_memory."
        )

    candidates = []
    minimums = []
    for modules_resident in (True, False):
        homes, minimum = _greedy(
            units, profile, budget_bytes, fixed, workload, routing, per_layer, forced_homes, modules_resident
        )
        minimums.append(minimum)
        if homes is None:
            continue
        # Start the search from the lane-balanced split and from all-CPU / all-PCIe host experts: the
        # objective has local optima a single move or swap cannot leave.
        for lane in (None, CPU, STREAM):
            start = dict(homes)
            if lane is not None:
                for u in units:
                    if (
                        u.name not in forced_homes
                        and start[u.name] != GPU
                        and lane in u.homes
                        and u.is_expert_like
                    ):
                        start[u.name] = lane
            best = _local_search(make(start), forced_homes, per_layer, make, search_rounds, time_limit_s=1.0)
            candidates.append(best)
    if not candidates:
        minimum = min(minimums)
        raise BudgetError(
            f"gpu_memory={format_bytes(budget_bytes)} is below the minimum this model needs: "
            f"{format_bytes(minimum)} (KV cache {format_bytes(kv_cache_bytes)}, workspace "
            f"{format_bytes(workspace_bytes)}, staging and always-resident weights "
            f"{format_bytes(minimum - fixed)}). Pass gpu_memory of at least {format_bytes(minimum)}, "
            f"or lower max_context / max_batch_size."
        )
    return min(candidates, key=_objective)


def _objective(p: HybridPlan) -> float:
    return p.predicted["prefill_s"] + p.workload.new_tokens * p.predicted["decode_step_s"]


def _greedy(
    units, profile, budget_bytes, fixed, workload, routing, per_layer, forced_homes, modules_resident
):
    """Greedy fill; returns (homes or None if infeasible, the minimum budget this variant needs)."""
    homes: dict[str, str] = {}
    for u in units:
        homes[u.name] = forced_homes.get(u.name, GPU if u.homes == (GPU,) else "")
    if modules_resident:
        for u in units:
            if not homes[u.name] and not u.is_expert_like and CPU not in u.homes:
                homes[u.name] = GPU
    free = [u for u in units if not homes[u.name]]
    # Staging is sized for the worst case (every free unit on the host), so filling never breaks it.
    worst = dict(homes)
    for u in free:
        worst[u.name] = STREAM if STREAM in u.homes else CPU
    staging_bytes = sum(s.nbytes for s in _staging_for(units, worst))
    resident = sum(u.nbytes for u in units if homes[u.name] == GPU)
    minimum = fixed + resident + staging_bytes
    if minimum > budget_bytes:
        return None, minimum
    room = budget_bytes - minimum
    T, B, N = workload.prompt_tokens * workload.batch, workload.batch, workload.new_tokens

    def saved_per_byte(u: Unit) -> float:
        p = usage_probability(u, routing, per_layer)
        host = [h for h in u.homes if h != GPU]
        n_dec = max(B * p, 1)
        used_dec = 1.0 - (1.0 - p) ** B
        dec = used_dec * (min(home_time(u, h, n_dec, profile) for h in host) - gpu_time(u, n_dec, profile))
        n_pre = T * p
        used_pre = 1.0 - (1.0 - p) ** T
        pre = used_pre * (min(home_time(u, h, n_pre, profile) for h in host) - gpu_time(u, n_pre, profile))
        return (pre + N * dec) / max(u.nbytes, 1)

    # Ties (uniform experts) are broken by expert index then layer, so residents spread over layers
    # and every layer's host lanes stay balanced.
    order = sorted(free, key=lambda u: (-round(saved_per_byte(u), 15), u.index or 0, u.layer or 0))
    for u in order:
        if u.nbytes <= room:
            homes[u.name] = GPU
            room -= u.nbytes
    for u in free:
        if not homes[u.name] and CPU not in u.homes:
            homes[u.name] = STREAM
    _balance_host_lanes(units, homes, profile, workload, routing, per_layer)
    return homes, minimum


def _local_search(
    best: HybridPlan, forced_homes, per_layer, make, rounds: int, time_limit_s: float = 2.0
) -> HybridPlan:
    """Improve ``best`` by single-unit home changes and resident/host swaps while the objective drops.

    A change only alters the layers of the units it moves, so trials re-cost those layers alone.
    Interchangeable units (same layer, kind, size, usage and home) are tried once per round, which keeps
    a round cheap on models with thousands of experts.
    """
    routing, profile, wl = best.routing, best.profile, best.workload
    split = best.token_assignment == "split"
    T, B, N = wl.prompt_tokens * wl.batch, wl.batch, wl.new_tokens
    layers = _by_layer(best.units)

    memo: dict[tuple, float] = {}

    def layer_cost(layer, homes) -> float:
        lu = layers[layer]
        key = (layer, tuple(homes[u.name] for u in lu))
        if key not in memo:
            pre = step_layer_time(lu, homes, profile, routing, per_layer, T, split)
            dec = step_layer_time(lu, homes, profile, routing, per_layer, B, split)
            memo[key] = pre + N * dec
        return memo[key]

    homes = dict(best.homes)
    costs = {layer: layer_cost(layer, homes) for layer in layers}
    staging_rings = _staging_for(best.units, homes)
    staging_bytes = sum(r.nbytes for r in staging_rings)
    deadline = time.monotonic() + time_limit_s
    fixed = best.kv_cache_bytes + best.workspace_bytes
    resident = sum(u.nbytes for u in best.units if homes[u.name] == GPU)
    by_name = {u.name: u for u in best.units}

    def signature(u: Unit) -> tuple:
        return (u.layer, u.kind, u.nbytes, round(usage_probability(u, routing, per_layer), 9), homes[u.name])

    for _ in range(rounds):
        reps: dict[tuple, Unit] = {}
        for u in best.units:
            if u.name not in forced_homes and len(u.homes) > 1:
                reps.setdefault(signature(u), u)
        movable = list(reps.values())
        trials = [{u.name: h} for u in movable for h in u.homes if h != homes[u.name]]
        on_gpu = [u for u in movable if homes[u.name] == GPU]
        on_host = [u for u in movable if homes[u.name] != GPU]
        trials += [{a.name: h, b.name: GPU} for a in on_gpu for b in on_host for h in a.homes if h != GPU]
        # exchanging the lanes of two host units (CPU <-> PCIe) rebalances layers a single move cannot
        trials += [
            {a.name: homes[b.name], b.name: homes[a.name]}
            for a in on_host
            for b in on_host
            if homes[a.name] == CPU and homes[b.name] == STREAM and STREAM in a.homes and CPU in b.homes
        ]
        improved = False
        for change in trials:
            if time.monotonic() > deadline:
                break
            if any(homes[name] == h for name, h in change.items()):
                continue  # an earlier move this round already changed these units
            delta_resident = 0
            for name, h in change.items():
                delta_resident += by_name[name].nbytes * ((h == GPU) - (homes[name] == GPU))
            trial = dict(homes)
            trial.update(change)
            if any(not by_name[n].is_expert_like for n in change) or not staging_rings:
                staging = sum(r.nbytes for r in _staging_for(best.units, trial))
            else:
                staging = staging_bytes  # expert ring: sized by the largest host expert, unchanged by a move
            if fixed + resident + delta_resident + staging > best.budget_bytes:
                continue
            touched = {by_name[n].layer for n in change}
            new_costs = {layer: layer_cost(layer, trial) for layer in touched}
            gain = sum(costs[layer] - new_costs[layer] for layer in touched)
            if gain > 1e-12 * max(1.0, sum(costs.values())):
                # first improvement: take it and keep scanning this round's trials
                homes, resident = trial, resident + delta_resident
                costs.update(new_costs)
                staging_rings = _staging_for(best.units, homes)
                staging_bytes = sum(r.nbytes for r in staging_rings)
                improved = True
        if not improved or time.monotonic() > deadline:
            break
    result = make(homes)
    predict(result, per_layer)
    return result


def _balance_host_lanes(
    units: list[Unit],
    homes: dict[str, str],
    profile: HardwareProfile,
    workload: Workload,
    routing: dict[str, float],
    per_layer: dict[int, tuple[int, int]],
) -> None:
    """Give each undecided host unit the CPU or the PCIe lane so that, per layer, both finish together."""
    by_layer: dict[int | None, list[Unit]] = {}
    for u in units:
        if homes[u.name] == "":
            by_layer.setdefault(u.layer, []).append(u)
    B = workload.batch
    for layer, todo in by_layer.items():
        cpu_lane = sum(
            usage_probability(u, routing, per_layer)
            * cpu_time(u, max(1, B * usage_probability(u, routing, per_layer)), profile)
            for u in units
            if u.layer == layer and homes[u.name] == CPU
        )
        pcie_lane = sum(
            usage_probability(u, routing, per_layer) * copy_time(u, profile)
            for u in units
            if u.layer == layer and homes[u.name] == STREAM
        )
        for u in sorted(todo, key=lambda u: -u.nbytes * usage_probability(u, routing, per_layer)):
            p = usage_probability(u, routing, per_layer)
            c = p * cpu_time(u, max(1, B * p), profile)
            s = p * copy_time(u, profile)
            if cpu_lane + c <= pcie_lane + s:
                homes[u.name] = CPU
                cpu_lane += c
            else:
                homes[u.name] = STREAM
                pcie_lane += s


def layer_time(
    layer_units: list[Unit],
    homes: dict[str, str],
    profile: HardwareProfile,
    routing: dict[str, float],
    per_layer: dict[int, tuple[int, int]],
    tokens: int,
    unit_times: dict[str, float] | None = None,
    routed: dict[str, int] | None = None,
    split: bool = False,
) -> tuple[float, float]:
    """Predicted (seconds, host bytes touched) of one layer's units in a step of ``tokens`` tokens.

    The GPU, CPU and PCIe lanes overlap, so the layer costs the max of the lanes; host experts are split
    between the CPU and PCIe lanes by :func:`assign_tokens`, as the executor will do at run time. Experts
    count their expected tokens, or exactly ``routed[name]`` tokens when one routing draw is given.
    With ``split`` (token assignment "split"), host experts of a small step are divided between the CPU
    and copy lanes as :func:`split_fraction` says, so they cost their bytes at both lanes' shared rates.
    """
    gpu_lane = cpu_lane = pcie_lane = serial = host_bytes = 0.0
    work = []
    for u in layer_units:
        p = usage_probability(u, routing, per_layer)
        if routed is not None and u.kind == "expert":
            n = routed.get(u.name, 0)
            if n == 0:
                continue
            used = 1.0
        else:
            n = tokens * p
            used = 1.0 - (1.0 - p) ** tokens if p < 1 else 1.0
        home = homes[u.name]
        if unit_times is not None:
            unit_times[u.name] = used * home_time(u, home, max(n, 1), profile)
        if home == GPU:
            if u.is_expert_like:
                gpu_lane += used * gpu_time(u, max(n, 1), profile)
            else:
                # attention, router, norms and shared experts run before the routed experts of their layer
                # are known: they cannot overlap with this layer's expert lanes
                serial += used * gpu_time(u, max(n, 1), profile)
            continue
        host_bytes += used * u.nbytes
        if u.is_expert_like:
            work.append((u, n, used))
        else:
            # streamed modules (attention, lm_head) were prefetched during the previous layer; their copy
            # occupies the PCIe lane and their compute is on the layer's critical path
            pcie_lane += copy_time(u, profile)
            serial += gpu_time(u, max(n, 1), profile)
    if any(u.is_expert_like for u in layer_units):
        # the feeding thread's serial part of the step (see LAYER_HOST_S): every MLP layer pays the attention
        # block's Python and the routing round trip; each host expert used adds its issue and hand-off
        # (in prefill-sized steps a small expert's issue hides behind the copies: at most half its copy)
        serial += LAYER_HOST_S
        for u, _, used in work:
            if u.kind == "expert":
                small = tokens <= SPLIT_MAX_TOKENS
                serial += used * (UNIT_HOST_S if small else min(UNIT_HOST_S, 0.5 * copy_time(u, profile)))
    split_time = 0.0
    if split and tokens <= SPLIT_MAX_TOKENS and work:
        # every small-step host expert is divided so both lanes finish together (see split_fraction)
        f = split_fraction(profile)
        rate_cpu, rate_pcie = profile.cpu_gemv_bw_during_copy, profile.h2d_bw_during_cpu
        cpu_bytes = sum(used * u.nbytes * (2 * f + 1) / 3 for u, _, used in work)
        pcie_bytes = sum(used * u.nbytes * 2 * (1 - f) / 3 for u, _, used in work)
        split_time = max(cpu_bytes / rate_cpu, pcie_bytes / rate_pcie) + CPU_ROUND_TRIP_S
        work = []
    if work:
        streamed = assign_tokens(
            [
                HostWork(u.name, max(1, round(n)), u.nbytes, u.flops_per_token, home=homes[u.name])
                for u, n, _ in work
            ],
            profile,
            gpu_busy_s=gpu_lane,
        )
        for u, n, used in work:
            if u.name in streamed:
                pcie_lane += used * copy_time(u, profile)
                gpu_lane += used * gpu_time(u, max(n, 1), profile)
            else:
                cpu_lane += used * cpu_time(u, max(n, 1), profile)
        if len(streamed) < len(work):
            cpu_lane += CPU_ROUND_TRIP_S
    if cpu_lane > 0 and pcie_lane > 0:
        # both lanes read DRAM at once: each runs at its shared rate
        cpu_lane /= cpu_share(profile, tokens)
        pcie_lane /= pcie_share(profile)
    return serial + max(gpu_lane, cpu_lane, pcie_lane, split_time), host_bytes


#: Routing draws per layer when predicting small decode steps (deterministic: seeded per layer).
DECODE_DRAWS = 24
_DRAWS: dict[tuple, list[dict[str, int]]] = {}


def routing_draws(
    experts: list[Unit], weights: list[float], top_k: int, tokens: int, draws: int = DECODE_DRAWS
) -> list[dict[str, int]]:
    """``draws`` sampled routings of ``tokens`` tokens (top-k without replacement, weighted), memoised.

    The same draws serve every plan that is compared, so comparisons are not blurred by sampling noise.
    """
    key = (tuple(u.name for u in experts), tuple(weights), top_k, tokens, draws)
    cached = _DRAWS.get(key)
    if cached is None:
        rng = random.Random(1000)  # the same draws for every layer: alike layers cost alike
        cached = []
        for _ in range(draws):
            counts: dict[str, int] = {}
            for _ in range(tokens):
                pool = list(range(len(experts)))
                w = list(weights)
                for _ in range(min(top_k, len(pool))):
                    pick = rng.choices(range(len(pool)), weights=w)[0]
                    name = experts[pool[pick]].name
                    counts[name] = counts.get(name, 0) + 1
                    del pool[pick], w[pick]
            cached.append(counts)
        if len(_DRAWS) > 4096:
            _DRAWS.clear()
        _DRAWS[key] = cached
    return cached


def sampled_layer_time(
    layer_units: list[Unit],
    homes: dict[str, str],
    profile: HardwareProfile,
    routing: dict[str, float],
    per_layer: dict[int, tuple[int, int]],
    tokens: int,
    split: bool = False,
) -> float:
    """Mean layer time over sampled routings of ``tokens`` tokens.

    With one token per step the lanes see a handful of whole experts, not their expectation: the max of
    the lanes over a draw is what a step costs, and its mean is above the max of mean lanes.
    """
    experts = [u for u in layer_units if u.kind == "expert"]
    if not experts:
        return layer_time(layer_units, homes, profile, routing, per_layer, tokens, split=split)[0]
    _, top_k = per_layer[experts[0].layer]
    weights = [usage_probability(u, routing, per_layer) for u in experts]
    draws = routing_draws(experts, weights, top_k, tokens)
    total = sum(
        layer_time(layer_units, homes, profile, routing, per_layer, tokens, routed=c, split=split)[0]
        for c in draws
    )
    return total / len(draws)


def step_layer_time(layer_units, homes, profile, routing, per_layer, tokens, split: bool = False) -> float:
    """The layer's predicted time in one step: sampled routings for small decode steps, else expectation."""
    if tokens <= SAMPLED_TOKENS:
        return sampled_layer_time(layer_units, homes, profile, routing, per_layer, tokens, split)
    return layer_time(layer_units, homes, profile, routing, per_layer, tokens, split=split)[0]


#: Steps of at most this many tokens are predicted from sampled routings.
SAMPLED_TOKENS = 16


def _by_layer(units: list[Unit]) -> dict[int | None, list[Unit]]:
    layers: dict[int | None, list[Unit]] = {}
    for u in units:
        layers.setdefault(u.layer, []).append(u)
    return layers


def predict(result: HybridPlan, per_layer: dict[int, tuple[int, int]] | None = None) -> None:
    """Fill ``result.predicted`` and ``result.unit_times`` from the cost model (prefill and decode).

    Bounds follow the hardware, not the plan: prefill moves every non-resident byte over PCIe once
    (bytes / H2D bandwidth); decode reads the expected non-resident bytes per step through the CPU and
    PCIe lanes together (bytes / (CPU rate during copies + H2D rate during CPU work)).
    """
    profile, wl, routing = result.profile, result.workload, result.routing
    per_layer = per_layer or _experts_per_layer(result.units, 2)
    T, B = wl.prompt_tokens * wl.batch, wl.batch
    split = result.token_assignment == "split"
    totals, host = {}, {}
    layers = _by_layer(result.units)
    for phase, tokens in (("prefill", T), ("decode", B)):
        times: dict[str, float] = {}
        total = host_bytes = 0.0
        for layer_units in layers.values():
            t, b = layer_time(
                layer_units, result.homes, profile, routing, per_layer, tokens, times, split=split
            )
            if tokens <= SAMPLED_TOKENS:  # small steps: the mean over sampled routings, not the expectation
                t = sampled_layer_time(layer_units, result.homes, profile, routing, per_layer, tokens, split)
            total += t
            host_bytes += b
        for name, t in times.items():
            result.unit_times.setdefault(name, {})[phase] = t
        totals[phase], host[phase] = total, host_bytes
    prefill_bound_s = host["prefill"] / profile.h2d_bw
    decode_bound_s = host["decode"] / (profile.cpu_gemv_bw_during_copy + profile.h2d_bw_during_cpu)
    p = result.predicted
    p["prefill_s"] = totals["prefill"]
    p["decode_step_s"] = totals["decode"]
    p["prefill_tok_s"] = T / totals["prefill"] if totals["prefill"] else math.inf
    p["decode_tok_s"] = B / totals["decode"] if totals["decode"] else math.inf
    p["prefill_bound_tok_s"] = T / prefill_bound_s if prefill_bound_s else math.inf
    p["decode_bound_tok_s"] = B / decode_bound_s if decode_bound_s else math.inf
    p["prefill_fraction_of_bound"] = p["prefill_tok_s"] / p["prefill_bound_tok_s"]
    p["decode_fraction_of_bound"] = p["decode_tok_s"] / p["decode_bound_tok_s"]
    p["end_to_end_s"] = totals["prefill"] + (wl.new_tokens - 1) * totals["decode"]
