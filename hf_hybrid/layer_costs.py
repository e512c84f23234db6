"""A layer step's predicted time across the three lanes, and its mean over sampled routings.

The layer costs the *max* of its lanes (the host units divided between the CPU and PCIe lanes as
:func:`hf_hybrid.assignment.assign_tokens` will divide them at run time) plus the activations' round trip
and the feeding thread's serial time. Pure Python.
"""

from __future__ import annotations

import functools
import random

from .assignment import HostWork, assign_tokens
from .costs import (
    CPU_ROUND_TRIP_S,
    SPLIT_MAX_TOKENS,
    UNIT_HOST_S,
    copy_time,
    cpu_share,
    cpu_time,
    divides,
    divides_in_prefill,
    gpu_time,
    home_time,
    issue_times,
    layer_host_time,
    pcie_share,
    prefill_split_fraction,
    split_rates,
    usage_probability,
)
from .profile import HardwareProfile
from .units import GPU, Unit

#: The part of a host expert's copy time (at most UNIT_HOST_S) that a prefill-sized step adds to the layer
#: as the feeding thread's serial time: it issues each expert while the copies of the ones before it run in
#: the staging slots, so most of its issuing hides. Fitted on the H200 runs of 2026-12-04: with 0.5 (the
#: value before) prefill was predicted 18-36% low on S3 and 10-23% low on S4 (19 runs, calls 14-22); with
#: 0.2, S3 -8..+16% and S4 -3..+3% on calls 14-19 (fitted there) and S3 -11..+14%, S4 -13..-7% on calls
#: 20-22 (held out). S1's experts take the UNIT_HOST_S cap either way (S1 -16..+14%, unchanged).
PREFILL_UNIT_SHARE = 0.2


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
    prefill_split: bool = False,
    memo: dict | None = None,
) -> tuple[float, float]:
    """Predicted (seconds, host bytes touched) of one layer's units in a step of ``tokens`` tokens.

    The GPU, CPU and PCIe lanes overlap, so the layer costs the max of the lanes; host experts are split
    between the CPU and PCIe lanes by :func:`assign_tokens`, as the executor will do at run time. Experts
    count their expected tokens, or exactly ``routed[name]`` tokens when one routing draw is given.
    With ``split`` (token assignment "adaptive"), large host experts of a small step are divided between the
    CPU and copy lanes as :func:`split_fraction` says, so they cost their bytes at both lanes' shared rates.
    With ``prefill_split`` too (the executor's ``prefill_splits``), large host units of a prefill-sized step
    are divided as :func:`prefill_split_fraction` says: rows [0, fI) on the CPU lane, the rest copied and
    computed on the GPU. ``memo``: :func:`assign_tokens`' unit costs, kept by the caller for one ``profile``.
    """
    gpu_lane = cpu_lane = pcie_lane = serial = host_bytes = 0.0
    # the feeding thread issues every expert the GPU lane computes, one after the other, while the CPU lane
    # works (measured per profile; without the measurement the fitted UNIT_HOST_S below stands in)
    issue_resident, issue_streamed = issue_times(profile, tokens)
    # divided experts' GPU rows are issued kernel by kernel whatever the step (see hf_hybrid.expert_graphs)
    issue_divided = issue_times(profile)[1]
    issue_measured = issue_divided > 0
    host_issue = 0.0
    work = []
    for u in layer_units:
        if routed is not None and u.kind == "expert":
            # one routing draw: the experts it routes no token to cost nothing (most of them with many
            # small experts), so they are skipped before anything is computed for them
            n = routed.get(u.name, 0)
            if n == 0:
                continue
            used = 1.0
        else:
            p = usage_probability(u, routing, per_layer)
            n = tokens * p
            used = 1.0 - (1.0 - p) ** tokens if p < 1 else 1.0
        home = homes[u.name]
        if unit_times is not None:
            unit_times[u.name] = used * home_time(u, home, max(n, 1), profile)
        if home == GPU:
            if u.is_expert_like:
                gpu_lane += used * gpu_time(u, max(n, 1), profile)
                host_issue += used * issue_resident
            else:
                # attention, router, norms and shared experts run before the routed experts of their layer
                # are known: they cannot overlap with this layer's expert lanes
                serial += used * gpu_time(u, max(n, 1), profile)
            continue
        if u.row_bytes:
            # a CPU-home embedding: the feeding thread looks the step's tokens up before the first layer
            host_bytes += used * max(n, 1) * u.row_bytes
            serial += used * cpu_time(u, max(n, 1), profile)
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
        # the feeding thread's serial part of the step (see layer_host_time): every MLP layer pays the attention
        # block's Python and the routing round trip; each host expert used adds its issue and hand-off
        # (in prefill-sized steps most of an expert's issue hides behind the copies: PREFILL_UNIT_SHARE)
        serial += layer_host_time(profile, tokens, split and any(divides(u, tokens) for u, _, _ in work))
        for u, _, used in work:
            if u.kind == "expert":
                if tokens > SPLIT_MAX_TOKENS:
                    serial += used * min(UNIT_HOST_S, PREFILL_UNIT_SHARE * copy_time(u, profile))
                elif not issue_measured:
                    serial += used * UNIT_HOST_S
    split_time = 0.0
    divided = [(u, n, used) for u, n, used in work if split and divides(u, tokens)]
    if divided:
        # each divided expert's rows go to the lanes in proportion to their rates, so both finish together
        # on the layer's divided bytes (see split_fraction)
        cpu_rate, pcie_rate = split_rates(profile)
        split_time = sum(used * u.nbytes for u, _, used in divided) / (cpu_rate + pcie_rate)
        split_time += CPU_ROUND_TRIP_S
        host_issue += sum(used for _, _, used in divided) * issue_divided
        work = [w for w in work if w not in divided]
    if split and prefill_split and tokens > SPLIT_MAX_TOKENS:
        halves = [(u, n, used) for u, n, used in work if divides_in_prefill(u, max(1, round(n)))]
        for u, n, used in halves:
            m = max(1, round(n))
            f = prefill_split_fraction(u, m, profile)
            # unshared times here: both lanes then run, and the shares below apply to what each reads
            cpu_lane += used * f * cpu_time(u, m, profile)
            pcie_lane += used * (1.0 - f) * copy_time(u, profile)
            gpu_lane += used * (1.0 - f) * gpu_time(u, m, profile)
        if halves:
            cpu_lane += CPU_ROUND_TRIP_S
            work = [w for w in work if w not in halves]
    if work:
        streamed = assign_tokens(
            [
                HostWork(u.name, max(1, round(n)), u.nbytes, u.flops_per_token, home=homes[u.name])
                for u, n, _ in work
            ],
            profile,
            gpu_busy_s=gpu_lane,
            host_busy_s=host_issue,
            issue_s=issue_streamed,
            memo=memo,
        )
        for u, n, used in work:
            if u.name in streamed:
                pcie_lane += used * copy_time(u, profile)
                gpu_lane += used * gpu_time(u, max(n, 1), profile)
                host_issue += used * issue_streamed
            else:
                cpu_lane += used * cpu_time(u, max(n, 1), profile)
        if len(streamed) < len(work):
            cpu_lane += CPU_ROUND_TRIP_S
    if cpu_lane > 0 and pcie_lane > 0:
        # both lanes read DRAM at once: each runs at its shared rate
        cpu_lane /= cpu_share(profile, tokens)
        pcie_lane /= pcie_share(profile, tokens)
    return serial + max(gpu_lane, cpu_lane, pcie_lane, split_time, host_issue), host_bytes


#: Routing draws per layer when predicting small decode steps (deterministic: seeded per layer).
DECODE_DRAWS = 24


def routing_draws(
    experts: list[Unit], weights: list[float], top_k: int, tokens: int, draws: int = DECODE_DRAWS
) -> list[dict[str, int]]:
    """``draws`` sampled routings of ``tokens`` tokens (top-k without replacement, weighted).

    Seeded, so the same draws serve every plan that is compared and comparisons are not blurred by
    sampling noise; memoised because the search costs the same layer shapes thousands of times.
    """
    return _draws(tuple(u.name for u in experts), tuple(weights), top_k, tokens, draws)


@functools.lru_cache(maxsize=4096)
def _draws(
    names: tuple[str, ...], weights: tuple[float, ...], top_k: int, tokens: int, draws: int
) -> list[dict[str, int]]:
    rng = random.Random(1000)  # the same draws for every layer: alike layers cost alike
    out = []
    for _ in range(draws):
        counts: dict[str, int] = {}
        for _ in range(tokens):
            pool = list(range(len(names)))
            w = list(weights)
            for _ in range(min(top_k, len(pool))):
                pick = rng.choices(range(len(pool)), weights=w)[0]
                name = names[pool[pick]]
                counts[name] = counts.get(name, 0) + 1
                del pool[pick], w[pick]
        out.append(counts)
    return out


def sampled_layer_time(
    layer_units: list[Unit],
    homes: dict[str, str],
    profile: HardwareProfile,
    routing: dict[str, float],
    per_layer: dict[int, tuple[int, int]],
    tokens: int,
    split: bool = False,
    memo: dict | None = None,
) -> float:
    """Mean layer time over sampled routings of ``tokens`` tokens.

    With one token per step the lanes see a handful of whole experts, not their expectation: the max of
    the lanes over a draw is what a step costs, and its mean is above the max of mean lanes.
    ``memo``: a dict the caller keeps for one ``profile`` (the planner, for one search): each draw's time
    and assignment's unit costs, from call to call.
    """
    experts = [u for u in layer_units if u.kind == "expert"]
    if not experts:
        return layer_time(layer_units, homes, profile, routing, per_layer, tokens, split=split)[0]
    _, top_k = per_layer[experts[0].layer]
    weights = [usage_probability(u, routing, per_layer) for u in experts]
    draws = routing_draws(experts, weights, top_k, tokens)
    # A draw is costed on the units it uses, in the layer's order: every unit but the experts it sends no
    # token to, which layer_time skips anyway (a draw of top-8 of 128 experts uses a sixteenth of them). Its
    # time depends only on those units and their homes, so it is kept: a search move changes one or two
    # units, and most draws of their layer do not use them.
    position = {u.name: i for i, u in enumerate(layer_units)}
    others = [i for i, u in enumerate(layer_units) if u.kind != "expert"]
    if memo is None:
        memo = {}
    total = 0.0
    for c in draws:
        used = tuple(layer_units[i] for i in sorted(others + [position[name] for name in c]))
        key = ("draw", used, tuple(homes[u.name] for u in used), tuple(c.items()), tokens, split)
        t = memo.get(key)
        if t is None:
            t = memo[key] = layer_time(
                list(used), homes, profile, routing, per_layer, tokens, routed=c, split=split, memo=memo
            )[0]
        total += t
    return total / len(draws)


def step_layer_time(
    layer_units,
    homes,
    profile,
    routing,
    per_layer,
    tokens,
    split: bool = False,
    prefill_split: bool = False,
    memo: dict | None = None,
) -> float:
    """The layer's predicted time in one step: sampled routings for small decode steps (which
    ``prefill_split`` does not change), else expectation. ``memo``: see :func:`sampled_layer_time`."""
    if tokens <= SAMPLED_TOKENS:
        return sampled_layer_time(layer_units, homes, profile, routing, per_layer, tokens, split, memo=memo)
    return layer_time(
        layer_units,
        homes,
        profile,
        routing,
        per_layer,
        tokens,
        split=split,
        prefill_split=prefill_split,
        memo=memo,
    )[0]


#: Steps of at most this many tokens are predicted from sampled routings.
SAMPLED_TOKENS = 16
