"""The CPU expert kernel: a gated MLP ``down(act(gate(x)) * up(x))`` on host-resident weights.

The same module serves a MoE expert and a row slice of a dense MLP. Weights are stored the way the
streaming path needs them (``gate_up [2*I, H]``, rows gate then up, and ``down [H, I]``), so gate and up
come out of ONE matmul and the activations ``x`` are read once.

Which matmul routine to use depends on the token count: torch's ``F.linear`` picks very different
kernels per M on CPU (16 GB/s at M=1, 71 GB/s at M=8 on a Xeon), while oneDNN on a pre-packed weight
is steadier. The choice per token count is measured by :func:`hf_hybrid.profile.measure` and stored in
``HardwareProfile.cpu_kernel``; this module only executes it.

A row slice of a dense MLP is one part of a sum: transformers computes the MLP's down projection as ONE
matmul that accumulates in fp32 and rounds once, so each slice's down output stays fp32 here
(:func:`fp32_linear`) and the executor adds the slices in fp32 and rounds the sum once. An expert's down
output is rounded to the model dtype, as transformers rounds it.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.utils import logging

from ..lanes import sync_thread_count

logger = logging.get_logger(__name__)

METHODS = ("linear", "matmul_t", "onednn_packed")
PLAIN_METHODS = ("linear", "matmul_t")

_packed_support: dict[torch.dtype, bool] = {}
_packed_lock = threading.Lock()


def _onednn_packed_works(dtype: torch.dtype) -> bool:
    """Try packing and running a tiny matrix once per dtype; any failure means "not available".

    oneDNN refuses fp16 without AVX512-FP16/AVX-NE-CONVERT and bf16 without AVX512 on some builds; the op
    may also be missing altogether (torch built without mkldnn), so nothing here may raise.
    """
    with _packed_lock:
        if dtype in _packed_support:
            return _packed_support[dtype]
        ok = False
        try:
            if torch.backends.mkldnn.is_available():
                weight = torch.linspace(-1, 1, 64 * 32).reshape(64, 32).to(dtype)
                x = torch.linspace(-1, 1, 2 * 32).reshape(2, 32).to(dtype)
                with torch.inference_mode():
                    packed = torch.ops.mkldnn._reorder_linear_weight(weight)
                    y = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
                    ref = F.linear(x.float(), weight.float())
                ok = y.shape == ref.shape and bool(torch.allclose(y.float(), ref, rtol=2e-2, atol=2e-2))
        except Exception:  # any failure just means the method is unavailable
            ok = False
        _packed_support[dtype] = ok
        return ok


def available_methods(dtype: torch.dtype) -> tuple[str, ...]:
    """CPU methods that work for ``dtype`` on this machine (``onednn_packed`` is probed once and cached)."""
    if _onednn_packed_works(dtype):
        return METHODS
    return PLAIN_METHODS


def plain_linear(x: Tensor, weight: Tensor, methods: Mapping[int, str] | str = "linear") -> Tensor:
    """``x @ weight.T`` with the plain method chosen for ``x``'s token count (no packed copy needed).

    For row ranges of an expert (a split between lanes), which have no packed copy of their own.
    """
    method = methods if isinstance(methods, str) else _nearest(methods, x.shape[0])
    sync_thread_count()
    if method == "matmul_t":
        return x @ weight.t()
    return F.linear(x, weight)


_mm_out_dtype: dict[str, bool] = {}


def _mm_to_fp32_works(device: torch.device) -> bool:
    """Whether ``torch.mm(..., out_dtype=torch.float32)`` takes bf16/fp16 operands on ``device``'s type
    (torch has it on CUDA, not on the CPU); tried once per device type, never raises."""
    known = _mm_out_dtype.get(device.type)
    if known is None:
        try:
            a = torch.ones((2, 8), dtype=torch.bfloat16, device=device)
            known = torch.mm(a, a.t(), out_dtype=torch.float32).dtype == torch.float32
        except Exception:  # an older torch, or a device type without the kernel
            known = False
        _mm_out_dtype[device.type] = known
    return known


def fp32_linear(x: Tensor, weight: Tensor) -> Tensor:
    """``x @ weight.T`` accumulated in fp32 and returned in fp32, NOT rounded to ``x``'s dtype: one part of
    a sum that is rounded once, after the parts are added (the products of bf16 values are exact in fp32, so
    this is the fp32 value a single bf16 matmul rounds at its end).

    On CUDA this is one bf16 x bf16 -> fp32 GEMM (``torch.mm(..., out_dtype=torch.float32)``): measured on
    an H200 (torch 2.11) it costs what the bf16 matmul costs (16-22 us against 16-21 us, T = 1..512 tokens,
    H x I up to 8192 x 1376), and its output rounded to bf16 has the bits of the bf16 matmul; widening the
    operands first cost 2-15x that. The CPU has no such op in torch: the operands are widened to fp32,
    which on a busy 2-core AVX-512-BF16 machine made a dense slice's down projection 2.4-6.5x slower and a
    whole slice (gate/up/down) 1.5-2x slower on the torch path (H x I 576x384 and 4096x1792, T = 1..256). Decode
    steps' CPU work runs on the native lane, whose fp32 down output costs nothing extra, so this is paid by
    prefill-sized CPU work (and by machines without the native kernel)."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.linear(x, weight)
    if x.dim() == 2 and x.device.type != "cpu" and _mm_to_fp32_works(x.device):
        return torch.mm(x, weight.t(), out_dtype=torch.float32)
    return F.linear(x.float(), weight.float())


def gated_mlp(
    x: Tensor, gate_up: Tensor, down: Tensor, act_fn: Callable[[Tensor], Tensor], fp32_out: bool = False
) -> Tensor:
    """``down(act(gate(x)) * up(x))`` with gate and up from one matmul on ``gate_up [2*I, H]``: exactly the
    formula transformers computes, so fp32 results are bit-identical (the GPU lane and the CPU's ``linear``
    method both use it). ``fp32_out``: the down output stays fp32 (:func:`fp32_linear`), for a row slice of
    a dense MLP whose slices are summed before one rounding."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    h = act_fn(gate) * up
    return fp32_linear(h, down) if fp32_out else F.linear(h, down)


def partial_gated_mlp(
    x: Tensor, gate: Tensor, up: Tensor, down: Tensor, act_fn: Callable[[Tensor], Tensor]
) -> Tensor:
    """One lane's part of a gated MLP divided along its intermediate dimension, in fp32: ``gate``/``up``
    hold rows of the gate and up projections and ``down`` the matching columns of the down projection.
    The activations are rounded as transformers rounds them; the down output stays fp32, so the parts of
    the lanes add up in fp32 and are rounded once (the native lane's ``partial`` jobs compute the same)."""
    h = act_fn(F.linear(x, gate)) * F.linear(x, up)
    return fp32_linear(h, down)


def _nearest(table: Mapping[int, str], tokens: int) -> str:
    """The entry of the smallest token count >= ``tokens``, else of the largest one."""
    keys = sorted(table)
    i = bisect.bisect_left(keys, tokens)
    return table[keys[min(i, len(keys) - 1)]]


def _packed_linear(x: Tensor, packed: Tensor) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


class CpuExpertKernel:
    """A gated MLP on host weights, dispatching the matmul routine by token count.

    Args:
        gate_up: ``[2*I, H]``, gate rows then up rows (contiguous is fastest; pinned is fine).
        down: ``[H, I]``.
        act_fn: the activation applied to the gate projection (e.g. ``ACT2FN["silu"]``).
        methods: one method name for every token count, or ``{token_count: method}`` as stored in
            ``HardwareProfile.cpu_kernel``: a call with ``n`` tokens uses the entry of the smallest token
            count ``>= n``, else the largest one.
        fp32_out: the kernel computes a row slice of a dense MLP: its down output stays fp32
            (:func:`fp32_linear`, with ``down`` as it is; only ``gate_up`` gets a packed copy), so the
            slices add up in fp32 and are rounded once.

    ``onednn_packed`` builds packed copies of both matrices once, here; they cost about as much host memory
    as the weights themselves (:attr:`extra_bytes`). If packing is not possible the kernel falls back to
    ``linear`` with a warning.
    """

    def __init__(
        self,
        gate_up: Tensor,
        down: Tensor,
        act_fn: Callable[[Tensor], Tensor],
        methods: Mapping[int, str] | str = "linear",
        fp32_out: bool = False,
    ) -> None:
        if gate_up.dim() != 2 or down.dim() != 2:
            raise ValueError(
                f"expected 2-D weights, got gate_up {tuple(gate_up.shape)}, down {tuple(down.shape)}"
            )
        inter2, hidden = gate_up.shape
        if inter2 % 2 or down.shape != (hidden, inter2 // 2):
            raise ValueError(
                f"shape mismatch: gate_up {tuple(gate_up.shape)} must be [2*I, H] and down {tuple(down.shape)} [H, I]"
            )
        if gate_up.dtype != down.dtype:
            raise ValueError(f"gate_up is {gate_up.dtype} but down is {down.dtype}")
        self.gate_up = gate_up
        self.down = down
        self.act_fn = act_fn
        self.fp32_out = fp32_out
        self.hidden_size = hidden
        self.intermediate_size = inter2 // 2

        if isinstance(methods, str):
            methods = {1: methods}
        if not methods:
            raise ValueError("methods must name at least one method")
        table = {}
        for tokens, method in methods.items():
            if method not in METHODS:
                raise ValueError(f"unknown CPU method {method!r}; known: {METHODS}")
            table[int(tokens)] = method

        self._packed_gate_up: Tensor | None = None
        self._packed_down: Tensor | None = None
        if "onednn_packed" in table.values() and not self._pack():
            table = {m: ("linear" if meth == "onednn_packed" else meth) for m, meth in table.items()}

        self.methods: dict[int, str] = dict(sorted(table.items()))
        # nbytes of an mkldnn tensor is its logical size; blocked layouts pad little for these shapes
        self.extra_bytes: int = sum(
            int(t.nbytes) for t in (self._packed_gate_up, self._packed_down) if t is not None
        )

    def _pack(self) -> bool:
        # One packed copy serves every token count, packed without a batch hint. Measured on a Sapphire
        # Rapids-class Xeon (AMX, 4096x28672 bf16): hint 1 selects the AB16b64a2b layout, which ran at
        # 47-55 GB/s for every M, while no hint or any hint >= 2 selects AB16b32a2b: 75-100 GB/s at
        # M=1..16 and about 55 GB/s at M=64. The layout, not the hint, decides the speed (oneDNN picks the
        # primitive for the runtime M), so one copy suffices and memory is not multiplied.
        dtype = self.gate_up.dtype
        if not _onednn_packed_works(dtype):
            logger.warning(
                "onednn_packed is not available for %s on this CPU; the expert kernel uses 'linear' instead.",
                dtype,
            )
            return False
        try:
            # no_grad, not inference_mode: inference tensors would break callers that run outside it
            with torch.no_grad():
                self._packed_gate_up = torch.ops.mkldnn._reorder_linear_weight(self.gate_up)
                if not self.fp32_out:  # a dense slice's down projection runs unpacked, to fp32
                    self._packed_down = torch.ops.mkldnn._reorder_linear_weight(self.down)
        except Exception as err:  # packing is an optimisation: fall back, don't fail
            self._packed_gate_up = self._packed_down = None
            logger.warning("Packing expert weights for oneDNN failed (%s); using 'linear' instead.", err)
            return False
        return True

    def method_for(self, tokens: int) -> str:
        """The method used for a call with ``tokens`` tokens."""
        return _nearest(self.methods, tokens)

    def __call__(self, x: Tensor) -> Tensor:
        """``x [n, H]`` on CPU in the weights' dtype -> ``[n, H]`` in the same dtype (fp32 with
        ``fp32_out``)."""
        sync_thread_count()
        n = x.shape[0]
        if n == 0:
            return x.new_empty((0, self.hidden_size), dtype=torch.float32 if self.fp32_out else x.dtype)
        method = self.method_for(n)
        if method == "linear":
            # Exactly the plain formula (as transformers computes it), so fp32 results are bit-identical.
            return gated_mlp(x, self.gate_up, self.down, self.act_fn, fp32_out=self.fp32_out)
        if method == "matmul_t":
            gate, up = (x @ self.gate_up.t()).chunk(2, dim=-1)
            h = self.act_fn(gate) * up
            return fp32_linear(h, self.down) if self.fp32_out else h @ self.down.t()
        gate, up = _packed_linear(x, self._packed_gate_up).chunk(2, dim=-1)
        h = self.act_fn(gate) * up
        return fp32_linear(h, self.down) if self.fp32_out else _packed_linear(h, self._packed_down)

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights read per call (both matrices)."""
        return int(self.gate_up.nbytes + self.down.nbytes)

    def flops(self, tokens: int) -> int:
        """Multiply-add FLOPs of one call with ``tokens`` tokens (2 per weight per token)."""
        return 2 * tokens * (self.gate_up.numel() + self.down.numel())

    def __repr__(self) -> str:
        return (
            f"CpuExpertKernel(H={self.hidden_size}, I={self.intermediate_size}, dtype={self.gate_up.dtype}, "
            f"methods={self.methods}, extra_bytes={self.extra_bytes})"
        )


def pick_methods(measured: Mapping[int, Mapping[str, float]]) -> dict[int, str]:
    """The fastest method per token count from ``{tokens: {method: rate}}`` (any rate unit, higher wins).

    Ties go to the method listed first in :data:`METHODS` (plain before packed: no extra memory). Rates
    that are missing, non-finite or not positive are ignored; a token count with none left gets ``linear``.
    """
    order = {name: i for i, name in enumerate(METHODS)}
    picked: dict[int, str] = {}
    for tokens, rates in measured.items():
        valid = [
            (rate, name)
            for name, rate in rates.items()
            if isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0
        ]
        if not valid:
            picked[int(tokens)] = "linear"
            continue
        best_rate = max(rate for rate, _ in valid)
        best = min(
            (name for rate, name in valid if rate == best_rate), key=lambda n: order.get(n, len(order))
        )
        picked[int(tokens)] = best
    return dict(sorted(picked.items()))
