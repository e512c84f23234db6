"""Token assignment: per layer step, which host units' tokens run on the CPU lane and which units' weights
are streamed to the GPU. The executor applies this policy at run time; the planner uses it to predict.
"""

from __future__ import annotations

from dataclasses import dataclass

from .costs import CPU_ROUND_TRIP_S, copy_time, cpu_share, cpu_time, gpu_time, issue_times, pcie_share
from .options import TOKEN_ASSIGNMENTS
from .profile import HardwareProfile
from .units import CPU, HOMES, STREAM, Unit

#: entries an :func:`assign_tokens` memo holds before it is cleared
MEMO_MAX = 1 << 16


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
    host_busy_s: float = 0.0,
    issue_s: float | None = None,
    mode: str = "adaptive",
    cpu_scale: float = 1.0,
    memo: dict | None = None,
) -> set[str]:
    """Decide which host units of one layer step run on the GPU (streamed) rather than on the CPU.

    ``mode="static"`` follows each unit's home. ``"adaptive"`` and ``"whole"`` (which differ only in whether
    the executor divides large units first, see :func:`hf_hybrid.costs.divides`) are a longest-processing-time greedy
    over two lanes: biggest job first, each to the lane that would finish it earliest, where the
    CPU lane costs :func:`cpu_time` and the GPU side costs the copy (free if ``staged``) on the PCIe lane
    and the compute on the GPU lane. Both lanes are costed at their rates while the other one runs (they
    share DRAM), and the first CPU job pays the activations' round trip. A streamed unit also waits for
    the feeding thread to issue it (:func:`issue_times`, after ``host_busy_s`` of issuing the step's other
    device work; ``issue_s`` replaces the profile's figure, as the executor learns it): in a decode step
    of small experts that, not the copy, is what streaming one costs.
    ``cpu_scale`` multiplies the CPU costs: the executor sets it from how long its CPU lane really took
    against this prediction. ``memo``: a dict the caller keeps for one ``profile``, holding each unit's
    costs per token count from call to call (the executor assigns every layer step of every token; the
    costs of a unit at a token count do not change while the profile stays). Returns the names to stream.
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
    host_lane = host_busy_s
    issue = issue_times(profile)[1] if issue_s is None else issue_s
    costed = []
    largest = max((w.tokens for w in work), default=1)
    if memo is None:
        memo = {}
    elif len(memo) > MEMO_MAX:
        memo.clear()  # prefill steps bring many token counts: start afresh rather than grow
    shares = lane_shares(profile, largest, memo)
    cpu_factor, pcie_factor = cpu_scale / shares[0], 1.0 / shares[1]
    for w in work:
        base = unit_costs(w.name, w.tokens, w.nbytes, w.flops_per_token, profile, memo)
        c, g = base[0] * cpu_factor, base[1]
        x = 0.0 if w.staged else base[2] * pcie_factor
        costed.append((max(c, x + g), c, g, x, w.name))
    for _, c, g, x, name in sorted(costed, reverse=True):
        cpu_finish = (cpu_lane or CPU_ROUND_TRIP_S) + c
        arrive = pcie_lane + x
        issued = host_lane + issue
        gpu_finish = max(arrive, gpu_lane, issued) + g
        if gpu_finish < cpu_finish:
            streamed.add(name)
            pcie_lane = arrive
            gpu_lane = gpu_finish
            host_lane = issued
        else:
            cpu_lane = cpu_finish
    return streamed


def unit_costs(
    name: str, tokens: int, nbytes: int, flops_per_token: int, profile: HardwareProfile, memo: dict
) -> tuple[float, float, float]:
    """(CPU, GPU, copy) seconds of one unit at ``tokens`` tokens, alone (:func:`cpu_time`, :func:`gpu_time`,
    :func:`copy_time`), kept in ``memo`` (one dict per profile, as :func:`assign_tokens` keeps it)."""
    key = (name, tokens, nbytes, flops_per_token)
    costs = memo.get(key)
    if costs is None:
        unit = Unit(name, "expert", None, nbytes, flops_per_token, HOMES)
        costs = memo[key] = (
            cpu_time(unit, tokens, profile),
            gpu_time(unit, tokens, profile),
            copy_time(unit, profile),
        )
    return costs


def lane_shares(profile: HardwareProfile, tokens: int, memo: dict) -> tuple[float, float]:
    """(:func:`cpu_share`, :func:`pcie_share`) of a step whose largest unit has ``tokens`` tokens, kept in
    ``memo``."""
    shares = memo.get(tokens)
    if shares is None:
        shares = memo[tokens] = (cpu_share(profile, tokens), pcie_share(profile, tokens))
    return shares
