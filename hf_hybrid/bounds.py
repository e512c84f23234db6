"""Transfer bounds: the best tok/s any engine can reach when part of the weights live off the GPU.

The one definition, shared by the planner's predictions and the bench's "% of bound" columns:

* prefill bound (tok/s) = ``prompt * batch / (passes * host bytes / h2d_bw)``: every weight byte kept off
  the GPU crosses PCIe once per prefill forward, and a prompt longer than the workspace's ``prefill_chunk``
  takes ``passes = ceil(prompt / prefill_chunk)`` forwards (one for every prompt that fits the workspace);
* decode bound (tok/s) = ``batch / (step bytes / (cpu_gemv_bw_during_copy + h2d_bw_during_cpu))``: each
  decode step reads the host-side bytes its tokens need, through the CPU lane and the PCIe lane at once,
  each at the rate it keeps while the other runs;
* native-lane decode bound (tok/s), a second decode figure: the decode bound with the rates of the lane
  that computes decode steps where the profile measured it, the native CPU lane while copies run plus the
  copies while it runs (``cpu_native_bw_during_copy + h2d_bw_during_native``; never below the decode
  bound). The decode bound keeps torch's GEMV rate, as first defined, and the native lane reads faster;
* CPU + PCIe prefill bound (tok/s), a second prefill figure: the host work of a forward divided between
  the CPU lane, computing at its GEMM rate while copies run (``cpu_lane_gemm_flops_during_copy``, or the
  native lane's AMX rate ``cpu_native_gemm_flops_during_copy`` where measured and higher), and
  PCIe, moving bytes at its rate while the CPU computes (``h2d_bw_during_cpu``), so that both finish
  together: a forward takes ``1 / (gemm / flops + h2d / bytes)`` (never more than PCIe alone takes).

A host item is ``(bytes, p)`` with ``p`` the probability that one token reads it (1 for attention or a
dense MLP slice, the routing frequency for an expert). A step of ``tokens`` tokens reads it with
probability ``1 - (1 - p) ** tokens``; the step bytes are the sum of ``bytes`` times that probability.

Rates come from a hardware profile (any object with the attributes; missing ones count as 0): when
``cpu_gemv_bw_during_copy`` is missing the CPU rate is ``profile.cpu_weight_bw(batch)``, when
``h2d_bw_during_cpu`` is missing the PCIe share is ``h2d_bw``. A bound is "unbounded" (``None`` unless
the caller asks for another value) when no bytes are read or the rate is missing.

Pure Python: importing this module loads neither torch nor transformers.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

#: One host-side item: (bytes, probability that one token reads it).
HostItem = tuple[float, float]


def read_probability(p: float, tokens: int) -> float:
    """Probability that at least one of ``tokens`` tokens reads an item each token reads with prob. ``p``."""
    return 1.0 - (1.0 - min(max(p, 0.0), 1.0)) ** tokens


def host_read_bytes(items: Iterable[HostItem], tokens: int) -> float:
    """Expected host-side bytes read by a step of ``tokens`` tokens (see the module doc)."""
    return sum(nbytes * read_probability(p, tokens) for nbytes, p in items)


def transfer_rates(profile: Any, batch: int) -> tuple[float, float]:
    """``(prefill rate, decode rate)`` in bytes/s from ``profile``, with the fallbacks of the module doc.

    The prefill rate is ``h2d_bw``; the decode rate is the CPU lane's weight-read rate during copies
    plus the PCIe rate during CPU work.
    """
    h2d = float(getattr(profile, "h2d_bw", 0) or 0)
    cpu_during = float(getattr(profile, "cpu_gemv_bw_during_copy", 0) or 0)
    h2d_during = float(getattr(profile, "h2d_bw_during_cpu", 0) or 0)
    if not cpu_during and hasattr(profile, "cpu_weight_bw"):
        cpu_during = float(profile.cpu_weight_bw(batch))
    return h2d, cpu_during + (h2d_during or h2d)


def native_decode_rate(profile: Any) -> float:
    """The native CPU lane's weight-read rate during copies plus the copies' rate during it, in bytes/s (0
    where the profile did not measure both)."""
    cpu = float(getattr(profile, "cpu_native_bw_during_copy", 0) or 0)
    h2d = float(getattr(profile, "h2d_bw_during_native", 0) or 0)
    return cpu + h2d if cpu and h2d else 0.0


def prefill_passes(prompt: int, chunk: int | None) -> int:
    """Forwards a prefill of ``prompt`` tokens takes when each holds at most ``chunk`` tokens (0/None:
    one forward, whatever the length)."""
    if not chunk or chunk >= prompt:
        return 1
    return -(-prompt // chunk)


def prefill_flops(items: Iterable[HostItem], tokens: int, bytes_per_param: float = 2.0) -> float:
    """FLOPs of a forward of ``tokens`` tokens on the host items: each token that reads an item (with its
    probability) costs 2 FLOPs per parameter; ``bytes_per_param`` is the weights' element size."""
    return sum(2.0 * nbytes / bytes_per_param * min(max(p, 0.0), 1.0) * tokens for nbytes, p in items)


def _cpu_pcie_seconds(host_bytes: float, flops: float, profile: Any) -> float | None:
    """Seconds of one forward's host work divided between the CPU's GEMMs and PCIe (module doc)."""
    # the CPU lane's GEMMs while copies run: torch's kernels, or the native lane's AMX tiles where measured
    gemm = max(
        float(getattr(profile, "cpu_lane_gemm_flops_during_copy", 0) or 0),
        float(getattr(profile, "cpu_native_gemm_flops_during_copy", 0) or 0),
    )
    h2d = float(getattr(profile, "h2d_bw", 0) or 0)
    h2d_during = float(getattr(profile, "h2d_bw_during_cpu", 0) or 0) or h2d
    if host_bytes <= 0 or not h2d > 0:
        return None
    pcie_alone = host_bytes / h2d
    if not (gemm > 0 and flops > 0):
        return pcie_alone
    return min(pcie_alone, 1.0 / (gemm / flops + h2d_during / host_bytes))


def _tok_s(tokens: int, nbytes: float, rate: float, unbounded: Any) -> Any:
    if nbytes <= 0 or not rate > 0:
        return unbounded
    seconds = nbytes / rate
    return tokens / seconds if seconds else unbounded


def transfer_bounds(
    host_bytes: float,
    step_bytes: float,
    profile: Any,
    prompt: int,
    batch: int,
    unbounded: Any = None,
    prefill_chunk: int | None = None,
    prefill_flops: float | None = None,
) -> dict:
    """Prefill and decode transfer bounds in tok/s (see the module doc for the definition).

    ``host_bytes``: the bytes a prefill moves off the host; ``step_bytes``: the expected host-side bytes
    one decode step reads (:func:`host_read_bytes` of the host items at ``batch`` tokens);
    ``prefill_chunk``: tokens per prefill forward (longer prompts cross the host bytes once per chunk);
    ``prefill_flops``: the FLOPs of the host work of one such forward (:func:`prefill_flops`), for the CPU +
    PCIe bound. A bound that nothing limits is ``unbounded``. Returns ``prefill_bound_tok_s``,
    ``prefill_cpu_pcie_bound_tok_s`` (the PCIe-only bound when the profile has no CPU GEMM rate or no FLOPs
    are given), ``decode_bound_tok_s``, ``decode_native_bound_tok_s`` (the decode bound where the native
    lane was not measured), ``host_bytes``, ``decode_host_bytes_per_step``, ``h2d_bw`` and ``decode_bw``.
    """
    h2d, decode_bw = transfer_rates(profile, batch)
    passes = prefill_passes(prompt, prefill_chunk)
    forward_s = _cpu_pcie_seconds(host_bytes, prefill_flops or 0.0, profile)
    return {
        "prefill_bound_tok_s": _tok_s(prompt * batch, passes * host_bytes, h2d, unbounded),
        "prefill_cpu_pcie_bound_tok_s": (prompt * batch / (passes * forward_s) if forward_s else unbounded),
        "prefill_passes": passes,
        "decode_bound_tok_s": _tok_s(batch, step_bytes, decode_bw, unbounded),
        "decode_native_bound_tok_s": _tok_s(
            batch, step_bytes, max(decode_bw, native_decode_rate(profile)), unbounded
        ),
        "host_bytes": host_bytes,
        "decode_host_bytes_per_step": step_bytes,
        "h2d_bw": h2d,
        "decode_bw": decode_bw,
    }
