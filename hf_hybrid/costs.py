"""The cost model: how long a unit takes in each home, and a layer step across the three lanes.

Pure Python over :class:`~hf_hybrid.units.Unit` shapes and a :class:`~hf_hybrid.profile.HardwareProfile`.
The model of one step (prefill of T tokens, or one decode step of B tokens) per layer is three lanes that
run at once -- the CPU lane (units computed on the CPU), the PCIe lane (units streamed into staging slots)
and the GPU lane (resident and arrived units) -- so a layer costs the *max* of its lanes plus the
activation round trip to the CPU and the feeding thread's serial time, not their sum.
"""

from __future__ import annotations

from .profile import LANE_GEMM_TOKENS, HardwareProfile
from .units import CPU, GPU, Unit

#: Fixed cost of sending activations to the CPU lane and back (launch + sync latency), seconds.
CPU_ROUND_TRIP_S = 60e-6
#: Token assignment "adaptive" divides host experts only in steps of at most this many tokens (decode);
#: bigger steps assign whole experts, where the GPU's compute advantage dominates.
SPLIT_MAX_TOKENS = 16
#: ...and only experts of at least this many bytes: each part costs its own copies and kernel launches (tens
#: of microseconds), which must stay small against the expert's read time (S1's 336 MiB experts take ~3 ms).
SPLIT_MIN_BYTES = 16 << 20
#: Serial host time of a layer step: the feeding thread runs the next attention block in Python, waits for
#: the router's result on the host and issues the lanes, while the lanes idle.
#: Fitted to six H100 runs of 2026-11-25 (S1 at batch 1 and 8, S3, S4; traces showed 1-4 ms between
#: layers with every lane idle): about 1 ms per layer plus 0.9 ms per host expert used in a decode step.
#: The per-layer part measured again in H200 traces of S1 (2026-12-04, decode graphs, the native job
#: started by the feeding thread): the CPU lane idled 1.1, 1.3 and 1.3 ms between its jobs of consecutive
#: layers (the join's wake-up, adding its part, the next attention graph, the routing read-back,
#: assignment, submitting the job). With 1.0 ms S1 decode was predicted 16-36% high on four machines;
#: with 1.25 ms 10-28% (S3 -4..+2%, S4 +8..+10%, S1 batch 8 -7%).
LAYER_HOST_S = 1.25e-3
UNIT_HOST_S = 0.9e-3
#: A decode-sized layer step with no divided expert is bound by the feeding thread itself (S3: 128 small
#: experts, several streamed and several on the CPU each step), whose speed differs from machine to machine
#: as much as 1.5x: its serial time is this many times the profile's measured issue time of one resident
#: expert (``device_unit_issue_s``, Python and launches on the same thread). Fitted on the H200 runs of
#: 2026-12-04 (calls 24-25): S3 decode was predicted -7..-14% and -28..-33% with LAYER_HOST_S on machines
#: whose issue time measured 140 and 93 us; this factor puts both within a few percent. Steps with divided
#: experts (S1, S4) keep LAYER_HOST_S: their time between CPU jobs did not follow the machine's issue time.
HOST_TIME_PER_ISSUE = 7.3
#: What one more expert costs the native CPU lane in a decode-sized job beyond reading its weights at the
#: profile's rate (measured on the large experts the profile uses): its share of the threads' partition and
#: phase barrier, and short rows. On the H200 machine (benchmarks/native_lane_bench.py) eight 9 MiB
#: Qwen3-MoE-sized experts at one token took 0.94-0.99 ms where that rate (110-127 GB/s) says ~0.63 ms.
NATIVE_UNIT_S = 40e-6


#: Host seconds a CPU-home embedding adds to a step besides its rows' bytes: the token ids brought to the
#: host (they wait for the step before), the gather, and the rows' copy to the device issued. Estimated
#: from a device-to-host and a host-to-device copy of a few KiB (~15 us each) and the hook's Python; not
#: yet measured on a GPU.
EMBED_HOST_S = 50e-6


def lookup_time(unit: Unit, home: str, tokens: float, profile: HardwareProfile) -> float:
    """Seconds a lookup of ``tokens`` tokens in an embedding (``unit.row_bytes`` set) costs in ``home``:
    it reads their rows only; a CPU-home table gathers them on the host and copies them to the device."""
    rows = max(tokens, 1) * unit.row_bytes
    if home == GPU:
        return rows / profile.gpu_mem_bw
    return EMBED_HOST_S + rows / profile.dram_read_bw + rows / profile.h2d_bw


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
    if unit.row_bytes:
        return lookup_time(unit, GPU, tokens, profile)
    return max(unit.nbytes / profile.gpu_mem_bw, tokens * unit.flops_per_token / profile.gpu_flops)


def cpu_time(unit: Unit, tokens: float, profile: HardwareProfile) -> float:
    """Seconds for the CPU lane to compute ``unit`` on ``tokens`` tokens (weights read from DRAM).

    Decode-sized jobs run on the native lane where the profile measured it (its rate is the lane's own), and
    so do prefill-sized ones where it measured the lane's AMX tiles (the weights read once from DRAM, the
    products at the tiles' measured rate); otherwise the torch kernels' rates, measured on the profiling
    thread, scaled to the CPU lane's worker thread with one core fewer (:func:`lane_factor`).
    """
    if tokens <= 0:
        return 0.0
    if unit.row_bytes:
        return lookup_time(unit, CPU, tokens, profile)
    m = max(1, round(tokens))
    native = native_rate(profile, m)
    if native:
        return NATIVE_UNIT_S + unit.nbytes / native
    tiles = native_gemm_rate(profile, m)
    if tiles:
        return max(unit.nbytes / profile.dram_read_bw, tokens * unit.flops_per_token / tiles)
    solo = max(unit.nbytes / profile.cpu_weight_bw(m), tokens * unit.flops_per_token / profile.cpu_flops(m))
    return solo / lane_factor(profile, m)


def native_rate(profile: HardwareProfile, tokens: int) -> float | None:
    """The native CPU lane's weight-read rate at ``tokens`` tokens per unit, None where it does not run
    (more tokens than its decode-sized jobs, or not measured)."""
    if tokens > SPLIT_MAX_TOKENS or not profile.cpu_native_bw:
        return None
    return profile.native_bw(tokens)


def native_gemm_rate(profile: HardwareProfile, tokens: int) -> float | None:
    """The native CPU lane's FLOP rate on AMX tiles for a job of ``tokens`` tokens per unit, None where the
    lane does not take such jobs (decode-sized ones, or no AMX measured)."""
    if tokens <= SPLIT_MAX_TOKENS or not profile.cpu_native_gemm_flops:
        return None
    return profile.cpu_native_gemm_flops


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
    if native_gemm_rate(profile, tokens) and profile.cpu_native_gemm_flops_during_copy:
        return max(0.05, min(1.0, profile.cpu_native_gemm_flops_during_copy / profile.cpu_native_gemm_flops))
    if tokens > SPLIT_MAX_TOKENS and profile.cpu_lane_gemm_flops and profile.cpu_lane_gemm_flops_during_copy:
        return max(0.05, min(1.0, profile.cpu_lane_gemm_flops_during_copy / profile.cpu_lane_gemm_flops))
    if native_rate(profile, tokens) and profile.cpu_native_bw_during_copy:
        return max(0.05, min(1.0, profile.cpu_native_bw_during_copy / profile.native_bw(1)))
    lane_solo = profile.cpu_weight_bw(1) * lane_factor(profile, 1)
    return max(0.05, min(1.0, profile.cpu_gemv_bw_during_copy / lane_solo))


def cpu_lane_time(units_and_tokens: list[tuple[Unit, int]], profile: HardwareProfile) -> float:
    """Predicted seconds of one CPU-lane job (as :func:`assign_tokens` costs it, before any correction)."""
    if not units_and_tokens:
        return 0.0
    share = cpu_share(profile, max(n for _, n in units_and_tokens))
    return CPU_ROUND_TRIP_S + sum(cpu_time(u, n, profile) for u, n in units_and_tokens) / share


def split_rates(profile: HardwareProfile, cpu_scale: float = 1.0) -> tuple[float, float]:
    """(CPU lane, copy lane) weight-read rates in bytes/s while both run on a decode-sized step: the native
    lane's measured pair where the profile has it, else the torch lane's."""
    if native_rate(profile, 1) and profile.cpu_native_bw_during_copy and profile.h2d_bw_during_native:
        cpu, pcie = profile.cpu_native_bw_during_copy, profile.h2d_bw_during_native
    else:
        cpu, pcie = profile.cpu_gemv_bw_during_copy, profile.h2d_bw_during_cpu
    return cpu / max(cpu_scale, 1e-6), pcie


def split_fraction(profile: HardwareProfile, cpu_scale: float = 1.0) -> float:
    """Share ``f`` of an expert's intermediate rows the CPU lane takes when the expert is divided between
    lanes: gate/up rows and down columns [0, fI) on the CPU, the rest streamed and computed on the GPU.
    The two parts need nothing from each other, so both lanes finish together when f / c = (1 - f) / p,
    with c and p their rates while both run (:func:`split_rates`): f = c / (c + p)."""
    cpu, pcie = split_rates(profile, cpu_scale)
    return cpu / (cpu + pcie) if cpu + pcie > 0 else 0.0


def divides(unit: Unit, tokens: int) -> bool:
    """Whether token assignment "adaptive" divides ``unit`` between the lanes in a step of ``tokens``."""
    return tokens <= SPLIT_MAX_TOKENS and unit.nbytes >= SPLIT_MIN_BYTES


def layer_host_time(profile: HardwareProfile, tokens: int, divided: bool) -> float:
    """The feeding thread's serial time of one layer step of ``tokens`` tokens (``divided``: some host expert
    is divided between the lanes): :data:`LAYER_HOST_S`, or for decode-sized steps with no divided expert
    :data:`HOST_TIME_PER_ISSUE` times the profile's issue time of one resident expert where it measured
    one."""
    issue = profile.device_unit_issue_s
    if tokens > SPLIT_MAX_TOKENS or divided or not issue:
        return LAYER_HOST_S
    return HOST_TIME_PER_ISSUE * float(issue)


def divides_in_prefill(unit: Unit, tokens: int) -> bool:
    """Whether a prefill-sized step divides ``unit`` between the lanes where the executor's
    ``prefill_splits`` asks for it: more than :data:`SPLIT_MAX_TOKENS` tokens, at least
    :data:`SPLIT_MIN_BYTES`."""
    return tokens > SPLIT_MAX_TOKENS and unit.nbytes >= SPLIT_MIN_BYTES


def prefill_split_fraction(
    unit: Unit, tokens: int, profile: HardwareProfile, cpu_scale: float = 1.0
) -> float:
    """Share ``f`` of ``unit``'s intermediate rows the CPU lane computes when a prefill-sized step divides it:
    the CPU lane's part (its GEMM over ``tokens`` tokens, at its rate while copies run, times the learned
    factor ``cpu_scale``) then takes as long as the rest's copy (at the copies' rate while the CPU lane
    runs) and its GPU compute: f = T_gpu / (T_cpu + T_gpu), with T the time the whole unit takes each side."""
    on_cpu = cpu_time(unit, tokens, profile) * cpu_scale / cpu_share(profile, tokens)
    on_gpu = copy_time(unit, profile) / pcie_share(profile, tokens) + gpu_time(unit, tokens, profile)
    return on_gpu / (on_cpu + on_gpu) if on_cpu + on_gpu > 0 else 0.0


def pcie_share(profile: HardwareProfile, tokens: int = 1) -> float:
    """Fraction of its solo rate the copy lane keeps while the CPU lane reads DRAM (with the native lane
    for decode-sized CPU jobs, which reads DRAM faster and leaves the copies less)."""
    during = profile.h2d_bw_during_cpu
    if native_rate(profile, tokens) and profile.h2d_bw_during_native:
        during = profile.h2d_bw_during_native
    return max(0.05, min(1.0, during / profile.h2d_bw))


def issue_times(profile: HardwareProfile, tokens: int | None = None) -> tuple[float, float]:
    """Host seconds the feeding thread spends issuing one whole expert on the GPU lane: (resident, streamed),
    as the profile measured them (0 where it did not: the CPU standing in, older profiles). In a step of
    ``tokens == 1`` a whole expert replays a CUDA graph (hf_hybrid.expert_graphs): its measured issue time
    where the profile has it; otherwise, and for divided experts' rows, the kernel-by-kernel figures."""
    if tokens == 1 and profile.graph_unit_issue_s and profile.graph_streamed_issue_s:
        return float(profile.graph_unit_issue_s), float(profile.graph_streamed_issue_s)
    return float(profile.device_unit_issue_s or 0.0), float(profile.streamed_unit_issue_s or 0.0)


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
