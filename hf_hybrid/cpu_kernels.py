"""Which code computes a CPU unit: the torch kernels (one per unit, with the profile's fastest method per
token count, packed copies for CPU-home units) and the native lane for decode-sized jobs, and for bf16 jobs
of any size where the native lane has AMX-BF16 tiles."""

from __future__ import annotations

import torch
from transformers.utils.logging import tqdm

from .errors import ExecutionError
from .kernels.cpu import PLAIN_METHODS, CpuExpertKernel, pick_methods
from .profile import HardwareProfile
from .units import CPU
from .weights import ExpertGroup

#: Tokens per unit up to which the native kernel computes a CPU job (decode and small batches): a
#: memory-bound GEMV, where torch's per-op overheads lose half the DRAM rate. Bigger jobs go to torch's
#: GEMMs (oneDNN), unless the native lane has AMX tiles (see :meth:`CpuKernels.native_applies`).
NATIVE_MAX_TOKENS = 16


class CpuKernels:
    """The CPU kernels of one model's units, built on first use, and its native lane (if any)."""

    def __init__(self, profile: HardwareProfile, methods: dict[int, str] | str, backend: str, threads: int):
        self.methods = methods
        self.plain_methods = plain_methods(profile) if methods != "linear" else "linear"
        self.native_lane = _native_lane(backend, threads)

    def native_applies(self, group: ExpertGroup, counts: list[int]) -> bool:
        """Whether a CPU job of ``group`` with these per-unit token counts runs on the native lane.

        Decode-sized jobs (up to :data:`NATIVE_MAX_TOKENS` tokens per unit) always do. Bigger bf16 jobs do
        where the lane computes them on AMX tiles: torch's per-expert ops (oneDNN, one expert at a time from
        a worker thread) reached only about 0.8 TFLOP/s in-process on a 16-core Sapphire Rapids-class Xeon,
        while the tiles read each weight once for all of a job's tokens, all jobs of the step in one
        parallel region. Without AMX the native kernel's vector path is compute-bound past ~16 tokens, and
        torch's GEMMs keep those jobs.
        """
        lane = self.native_lane
        if lane is None:
            return False
        if max(counts, default=0) > NATIVE_MAX_TOKENS and not (lane.amx and group.dtype == torch.bfloat16):
            return False
        from .kernels.native import supports

        return supports(group.dtype, group.act_fn)

    def kernel(self, group: ExpertGroup, i: int) -> CpuExpertKernel:
        """The torch kernel of unit ``i`` of ``group`` (built and cached on first use)."""
        kernel = group.cpu_kernels.get(i)
        if kernel is None:
            gate_up, down = group.host_weights[i]
            # CPU-home units may hold a packed copy (the profile's fastest kernel per token count); units
            # streamed by default run the fastest plain kernel when assignment sends them to the CPU
            methods = self.methods if group.homes[i] == CPU else self.plain_methods
            # a dense MLP's slice is one part of a sum: its down output stays fp32 until the sum is rounded
            kernel = CpuExpertKernel(gate_up, down, group.act_fn, methods, fp32_out=not group.routed)
            group.cpu_kernels[i] = kernel
        return kernel

    def prepare(self, groups, progress: bool = True) -> int:
        """Build the kernels (and packed copies) of every CPU-home unit now, not in the first step.

        Returns the extra host bytes the kernels hold.
        """
        todo = [(g, i) for g in groups for i, h in enumerate(g.homes) if h == CPU]
        extra = 0
        for g, i in tqdm(todo, desc="Preparing CPU kernels", unit="unit", disable=not progress or not todo):
            extra += self.kernel(g, i).extra_bytes
        return extra

    def close(self) -> None:
        """Stop the native lane's threads."""
        if self.native_lane is not None:
            self.native_lane.close()


def _native_lane(backend: str, threads: int):
    """The native expert lane for ``backend`` ("auto": when it builds here; "native": required)."""
    if backend == "torch":
        return None
    from .kernels import native

    if not native.available():
        if backend == "native":
            raise ExecutionError(
                f"cpu_backend='native' but the native CPU expert kernel is unavailable: "
                f"{native.unavailable_reason()}. Use cpu_backend='auto' or 'torch'."
            )
        return None
    return native.NativeExpertLane(threads)


def plain_methods(profile: HardwareProfile) -> dict[int, str] | str:
    """The fastest kernel per token count among those that need no packed copy of the weights."""
    if not profile.cpu_method_bw:
        return "linear"
    plain = {
        m: {k: v for k, v in rates.items() if k in PLAIN_METHODS}
        for m, rates in profile.cpu_method_bw.items()
    }
    return pick_methods(plain)
