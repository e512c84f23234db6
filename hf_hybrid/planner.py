"""Where every unit lives: the partition of a model between GPU-resident, CPU-computed and streamed homes
under a device budget, searched against the cost model (:mod:`hf_hybrid.costs`) and the token-assignment
policy (:mod:`hf_hybrid.assignment`). This is where placement is decided.

Pure Python and deterministic: nothing here touches a device or the clock, and the search is bounded by a
number of trials, so the same units, profile and budget give the same plan on any machine.
"""

from __future__ import annotations

import fnmatch
import math
from collections import Counter

from .assignment import HostWork, assign_tokens
from .costs import (
    SPLIT_MAX_TOKENS,
    copy_time,
    cpu_lane_time,
    cpu_time,
    gpu_time,
    home_time,
    split_fraction,
    usage_probability,
)
from .errors import BudgetError, PlacementError
from .layer_costs import SAMPLED_TOKENS, layer_time, sampled_layer_time, step_layer_time
from .options import DIVIDING_ASSIGNMENTS, TOKEN_ASSIGNMENTS
from .placement import UNLIMITED, HybridPlan, StagingClass, Workload
from .profile import HardwareProfile
from .units import CPU, GPU, HOMES, STREAM, Unit, format_bytes

__all__ = [
    "SPLIT_MAX_TOKENS",
    "TOKEN_ASSIGNMENTS",
    "UNLIMITED",
    "HostWork",
    "HybridPlan",
    "StagingClass",
    "Workload",
    "assign_tokens",
    "cpu_lane_time",
    "plan",
    "predict",
    "split_fraction",
]

#: Staging slots per class: two for double buffering plus one so a copy can run ahead of compute.
EXPERT_STAGING_SLOTS = 3
MODULE_STAGING_SLOTS = 2


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


def experts_per_layer(units: list[Unit], top_k: int | dict[int, int]) -> dict[int, tuple[int, int]]:
    counts: dict[int, int] = {}
    for u in units:
        if u.kind == "expert":
            counts[u.layer] = counts.get(u.layer, 0) + 1
    k = (lambda layer: top_k.get(layer, 1)) if isinstance(top_k, dict) else (lambda layer: top_k)
    return {layer: (n, min(k(layer), n)) for layer, n in counts.items()}


class _StagingTally:
    """The staging rings a placement needs (any host expert may be streamed at run time, so every host
    expert-like unit counts; of the other units, the streamed ones), kept as counts of the units' sizes so
    that a move costs its units only (the local search makes thousands of moves on models with thousands of
    experts)."""

    def __init__(self, units: list[Unit], homes: dict[str, str]):
        self.experts: Counter[int] = Counter()
        self.modules: Counter[int] = Counter()
        for u in units:
            self._count(u, homes[u.name], 1)

    def _count(self, u: Unit, home: str, step: int) -> None:
        if u.is_expert_like:
            if home != GPU:
                self.experts[u.nbytes] += step
        elif home == STREAM:
            self.modules[u.nbytes] += step

    def move(self, u: Unit, old: str, new: str) -> None:
        """Unit ``u`` moves from home ``old`` to ``new``."""
        self._count(u, old, -1)
        self._count(u, new, 1)

    def rings(self) -> list[StagingClass]:
        """The rings of the current placement: slots the size of the largest unit each holds."""
        rings = []
        for name, sizes, slots in (
            ("experts", self.experts, EXPERT_STAGING_SLOTS),
            ("modules", self.modules, MODULE_STAGING_SLOTS),
        ):
            held = [size for size, n in sizes.items() if n > 0]
            if held:
                rings.append(StagingClass(name, max(held), slots))
        return rings

    @property
    def nbytes(self) -> int:
        """What the rings of the current placement reserve."""
        return sum(r.nbytes for r in self.rings())


def _staging_for(units: list[Unit], homes: dict[str, str]) -> list[StagingClass]:
    """Rings needed by the host-side units of ``homes`` (see :class:`_StagingTally`)."""
    return _StagingTally(units, homes).rings()


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
    prefill_chunk: int = 0,
    prefill_splits: bool = False,
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
    ``prefill_chunk``: tokens per prefill forward the workspace holds (0: the whole prompt); a longer
    prompt is predicted, and bounded, as that many forwards. ``prefill_splits``: the executor divides large
    host experts of prefill-sized steps between the CPU lane and the copy lane (its option of that name).
    """
    if token_assignment not in TOKEN_ASSIGNMENTS:
        raise ValueError(
            f"token_assignment must be one of {', '.join(TOKEN_ASSIGNMENTS)} (got {token_assignment!r})"
        )
    workload = workload or Workload()
    routing = dict(routing or {})
    forced_homes = resolve_forced(units, forced)
    per_layer = experts_per_layer(units, top_k)
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
            prefill_chunk=prefill_chunk,
            prefill_splits=prefill_splits,
        )

    # costs of units and sampled decode draws, kept for this search (they depend on the profile, which a
    # caller may change between two calls)
    memo: dict = {}
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
            best = _local_search(make(start), forced_homes, per_layer, make, search_rounds, memo=memo)
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


#: Trial placements the local search evaluates at most per start (a step budget, not a time limit, so the
#: same inputs give the same plan on any machine): enough for S3's 2,048 experts to converge.
SEARCH_TRIALS = 20_000


def _local_search(
    best: HybridPlan,
    forced_homes,
    per_layer,
    make,
    rounds: int,
    max_trials: int = SEARCH_TRIALS,
    memo: dict | None = None,
) -> HybridPlan:
    """Improve ``best`` by single-unit home changes and resident/host swaps while the objective drops.

    A change only alters the layers of the units it moves, so trials re-cost those layers alone.
    Interchangeable units (same layer, kind, size, usage and home) are tried once per round, which keeps
    a round cheap on models with thousands of experts.
    """
    routing, profile, wl = best.routing, best.profile, best.workload
    split = best.token_assignment in DIVIDING_ASSIGNMENTS
    halves = best.prefill_splits
    T, B, N = wl.prompt_tokens * wl.batch, wl.batch, wl.new_tokens
    layers = _by_layer(best.units)

    if memo is None:
        memo = {}
    kept: dict[tuple, float] = {}  # a layer's cost by its units' homes

    def layer_cost(layer, homes) -> float:
        lu = layers[layer]
        key = (layer, tuple(homes[u.name] for u in lu))
        if key not in kept:
            pre = step_layer_time(lu, homes, profile, routing, per_layer, T, split, halves, memo=memo)
            dec = step_layer_time(lu, homes, profile, routing, per_layer, B, split, memo=memo)
            kept[key] = pre + N * dec
        return kept[key]

    homes = dict(best.homes)
    costs = {layer: layer_cost(layer, homes) for layer in layers}
    tally = _StagingTally(best.units, homes)
    staging_bytes = tally.nbytes
    trials_left = max_trials
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
            if trials_left <= 0:
                break
            trials_left -= 1
            if any(homes[name] == h for name, h in change.items()):
                continue  # an earlier move this round already changed these units
            delta_resident = 0
            for name, h in change.items():
                delta_resident += by_name[name].nbytes * ((h == GPU) - (homes[name] == GPU))
            if any(not by_name[n].is_expert_like for n in change) or not staging_bytes:
                for name, h in change.items():
                    tally.move(by_name[name], homes[name], h)
                staging = tally.nbytes
                for name, h in change.items():
                    tally.move(by_name[name], h, homes[name])
            else:
                staging = staging_bytes  # expert ring: sized by the largest host expert, unchanged by a move
            if fixed + resident + delta_resident + staging > best.budget_bytes:
                continue
            trial = dict(homes)
            trial.update(change)
            touched = {by_name[n].layer for n in change}
            new_costs = {layer: layer_cost(layer, trial) for layer in touched}
            gain = sum(costs[layer] - new_costs[layer] for layer in touched)
            if gain > 1e-12 * max(1.0, sum(costs.values())):
                # first improvement: take it and keep scanning this round's trials
                for name, h in change.items():
                    tally.move(by_name[name], homes[name], h)
                homes, resident = trial, resident + delta_resident
                costs.update(new_costs)
                staging_bytes = tally.nbytes
                improved = True
        if not improved or trials_left <= 0:
            break
    result = make(homes)
    predict(result, per_layer, memo=memo)
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
            if STREAM not in u.homes or (CPU in u.homes and cpu_lane + c <= pcie_lane + s):
                homes[u.name] = CPU
                cpu_lane += c
            else:
                homes[u.name] = STREAM
                pcie_lane += s


def _by_layer(units: list[Unit]) -> dict[int | None, list[Unit]]:
    layers: dict[int | None, list[Unit]] = {}
    for u in units:
        layers.setdefault(u.layer, []).append(u)
    return layers


def predict(
    result: HybridPlan, per_layer: dict[int, tuple[int, int]] | None = None, memo: dict | None = None
) -> None:
    """Fill ``result.predicted`` and ``result.unit_times`` from the cost model (prefill and decode).

    Bounds follow the hardware, not the plan: prefill moves every non-resident byte over PCIe once per
    forward (bytes / H2D bandwidth; a prompt longer than ``prefill_chunk`` takes one forward per chunk, each
    predicted as a step of the chunk's tokens); decode reads the expected non-resident bytes per step
    through the CPU and PCIe lanes together (bytes / (CPU rate during copies + H2D rate during CPU work)).
    """
    profile, wl = result.profile, result.workload
    per_layer = per_layer or experts_per_layer(result.units, 2)
    T, B = wl.prompt_tokens * wl.batch, wl.batch
    totals, host = {}, {}
    layers = _by_layer(result.units)
    from .bounds import prefill_passes, transfer_bounds

    chunk = min(result.prefill_chunk or wl.prompt_tokens, wl.prompt_tokens)
    passes = prefill_passes(wl.prompt_tokens, chunk)
    # every forward but the last holds ``chunk`` tokens per sequence; the last one the rest
    last = wl.prompt_tokens - (passes - 1) * chunk
    for phase, tokens in (("prefill", chunk * wl.batch), ("decode", B)):
        times: dict[str, float] = {}
        totals[phase], host[phase] = _forward_cost(result, layers, per_layer, tokens, times, memo)
        for name, t in times.items():
            result.unit_times.setdefault(name, {})[phase] = t
        if phase == "prefill" and passes > 1:
            # one forward of the chunk was priced above: scale to the forwards of the whole prompt
            last_forward = _forward_cost(result, layers, per_layer, last * wl.batch, {}, memo)[0]
            totals[phase] = totals[phase] * (passes - 1) + last_forward

    host_units = [u for u in result.units if result.homes[u.name] != GPU and u.kind != "embed"]
    bounds = transfer_bounds(
        host["prefill"],
        host["decode"],
        profile,
        wl.prompt_tokens,
        B,
        unbounded=math.inf,
        prefill_chunk=chunk,
        prefill_flops=sum(
            u.flops_per_token * chunk * wl.batch * usage_probability(u, result.routing, per_layer)
            for u in host_units
        ),
    )
    p = result.predicted
    p["prefill_s"] = totals["prefill"]
    p["decode_step_s"] = totals["decode"]
    p["prefill_tok_s"] = T / totals["prefill"] if totals["prefill"] else math.inf
    p["decode_tok_s"] = B / totals["decode"] if totals["decode"] else math.inf
    p["prefill_bound_tok_s"] = bounds["prefill_bound_tok_s"]
    p["prefill_cpu_pcie_bound_tok_s"] = bounds["prefill_cpu_pcie_bound_tok_s"]
    p["decode_bound_tok_s"] = bounds["decode_bound_tok_s"]
    p["decode_native_bound_tok_s"] = bounds["decode_native_bound_tok_s"]
    p["prefill_fraction_of_bound"] = p["prefill_tok_s"] / p["prefill_bound_tok_s"]
    p["decode_fraction_of_bound"] = p["decode_tok_s"] / p["decode_bound_tok_s"]
    p["end_to_end_s"] = totals["prefill"] + (wl.new_tokens - 1) * totals["decode"]
    p["prefill_passes"] = passes


def _forward_cost(
    result: HybridPlan, layers, per_layer, tokens: int, times: dict, memo: dict | None = None
) -> tuple[float, float]:
    """Predicted (seconds, host bytes read) of one forward of ``tokens`` tokens; per-unit times go into
    ``times``. Small steps take the mean over sampled routings, not the expectation."""
    split = result.token_assignment in DIVIDING_ASSIGNMENTS
    homes, profile, routing = result.homes, result.profile, result.routing
    total = host_bytes = 0.0
    for layer_units in layers.values():
        t, b = layer_time(
            layer_units,
            homes,
            profile,
            routing,
            per_layer,
            tokens,
            times,
            split=split,
            prefill_split=result.prefill_splits,
            memo=memo,
        )
        if tokens <= SAMPLED_TOKENS:
            t = sampled_layer_time(layer_units, homes, profile, routing, per_layer, tokens, split, memo=memo)
        total += t
        host_bytes += b
    return total, host_bytes
