"""The CPU expert kernel: exactness of the plain path, closeness of the others, dispatch by token count."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F

from hf_hybrid.kernels import METHODS, CpuExpertKernel, available_methods, pick_methods

H, INTER = 128, 352


def _weights(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    gate_up = (torch.randn(2 * INTER, H, generator=gen) * 0.05).to(dtype)
    down = (torch.randn(H, INTER, generator=gen) * 0.05).to(dtype)
    return gate_up, down


def _plain(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """How transformers computes a fused gate_up expert."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def test_methods_listed():
    assert available_methods(torch.float32)[:2] == ("linear", "matmul_t")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        methods = available_methods(dtype)
        assert set(methods) <= set(METHODS)
        assert methods == available_methods(dtype)  # cached, stable


@pytest.mark.parametrize("n", [1, 3, 8, 64])
def test_linear_is_bit_identical_fp32(n):
    gate_up, down = _weights(torch.float32)
    x = torch.randn(n, H)
    kernel = CpuExpertKernel(gate_up, down, F.silu, "linear")
    assert kernel.extra_bytes == 0
    assert torch.equal(kernel(x), _plain(x, gate_up, down))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 5, 64])
def test_every_method_close_to_plain(dtype, n):
    gate_up, down = _weights(dtype)
    x = torch.randn(n, H).to(dtype)
    ref = _plain(x.float(), gate_up.float(), down.float())
    # bf16: both matmuls round their outputs to 8 mantissa bits; fp32: only summation order differs
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for method in available_methods(dtype):
        kernel = CpuExpertKernel(gate_up, down, F.silu, method)
        y = kernel(x)
        assert y.shape == (n, H) and y.dtype == dtype
        assert _rel_err(y, ref) < tol, method
        assert _rel_err(y, _plain(x, gate_up, down)) < tol, method


def test_packed_extra_bytes_and_inference_mode():
    if "onednn_packed" not in available_methods(torch.bfloat16):
        pytest.skip("oneDNN packing not available for bf16 on this CPU")
    gate_up, down = _weights(torch.bfloat16)
    kernel = CpuExpertKernel(gate_up, down, F.silu, "onednn_packed")
    assert kernel.method_for(1) == "onednn_packed"
    assert kernel.extra_bytes >= gate_up.nbytes + down.nbytes
    x = torch.randn(4, H).bfloat16()
    with torch.inference_mode():
        y = kernel(x)
    assert _rel_err(y, _plain(x, gate_up, down)) < 2e-2
    assert kernel(x[:0]).shape == (0, H)


def test_packing_unavailable_falls_back(monkeypatch):
    import hf_hybrid.kernels.cpu as cpu

    monkeypatch.setattr(cpu, "_onednn_packed_works", lambda dtype: False)
    gate_up, down = _weights(torch.float32)
    kernel = CpuExpertKernel(gate_up, down, F.silu, {1: "onednn_packed", 64: "matmul_t"})
    assert kernel.methods == {1: "linear", 64: "matmul_t"}
    assert kernel.extra_bytes == 0
    x = torch.randn(2, H)
    assert torch.equal(kernel(x[:1]), _plain(x[:1], gate_up, down))


def test_dispatch_by_token_count(monkeypatch):
    gate_up, down = _weights(torch.float32)
    kernel = CpuExpertKernel(gate_up, down, F.silu, {1: "linear", 4: "matmul_t", 16: "linear"})
    assert [kernel.method_for(n) for n in (1, 2, 4, 5, 16, 17, 1000)] == [
        "linear",
        "matmul_t",
        "matmul_t",
        "linear",
        "linear",
        "linear",
        "linear",
    ]
    kernel = CpuExpertKernel(gate_up, down, F.silu, {2: "linear", 8: "matmul_t"})
    assert kernel.method_for(1) == "linear" and kernel.method_for(9) == "matmul_t"

    # the call really uses the method picked: count matmul_t's `@` against linear's F.linear
    calls = []
    real_linear = F.linear
    monkeypatch.setattr(F, "linear", lambda *a: calls.append("linear") or real_linear(*a))
    kernel = CpuExpertKernel(gate_up, down, F.silu, {1: "linear", 4: "matmul_t"})
    kernel(torch.randn(1, H))
    assert calls == ["linear", "linear"]
    kernel(torch.randn(3, H))
    assert calls == ["linear", "linear"]


def test_bad_arguments():
    gate_up, down = _weights(torch.float32)
    with pytest.raises(ValueError):
        CpuExpertKernel(gate_up, down, F.silu, "nope")
    with pytest.raises(ValueError):
        CpuExpertKernel(gate_up, down.t(), F.silu)
    with pytest.raises(ValueError):
        CpuExpertKernel(gate_up, down.bfloat16(), F.silu)


def test_pick_methods():
    measured = {
        1: {"linear": 16e9, "matmul_t": 17e9, "onednn_packed": 78e9},
        8: {"linear": 71e9, "matmul_t": 60e9, "onednn_packed": 70e9},
        64: {"linear": 5e9, "matmul_t": 5e9},  # tie: plain first
        512: {"onednn_packed": float("nan"), "matmul_t": 0.0},  # nothing valid
    }
    assert pick_methods(measured) == {1: "onednn_packed", 8: "linear", 64: "linear", 512: "linear"}


def test_worker_thread_call():
    dtype = torch.bfloat16
    gate_up, down = _weights(dtype)
    x = torch.randn(4, H).to(dtype)
    methods = {1: available_methods(dtype)[-1], 4: "linear", 16: "matmul_t"}
    kernel = CpuExpertKernel(gate_up, down, F.silu, methods)
    expected = kernel(x)

    def work() -> torch.Tensor:
        assert threading.current_thread() is not threading.main_thread()
        with torch.inference_mode():
            return kernel(x)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = [f.result() for f in [pool.submit(work) for _ in range(4)]]
    for y in results:
        assert torch.equal(y, expected)


def test_plain_linear_dispatches_by_token_count():
    from hf_hybrid.kernels.cpu import plain_linear

    torch.manual_seed(0)
    weight = torch.randn(24, 16)
    for tokens in (1, 3, 40):
        x = torch.randn(tokens, 16)
        assert torch.equal(plain_linear(x, weight), F.linear(x, weight))
        torch.testing.assert_close(plain_linear(x, weight, "matmul_t"), F.linear(x, weight))
        table = {1: "linear", 16: "matmul_t"}
        torch.testing.assert_close(plain_linear(x, weight, table), F.linear(x, weight))


@pytest.mark.parametrize("method", METHODS)
def test_a_dense_slice_kernel_keeps_its_down_output_in_fp32(method):
    # a dense MLP's slice is one part of a sum rounded once: its down output is the fp32 product of the bf16
    # activations and weights, not rounded to bf16 (and only gate_up gets a packed copy)
    if method not in available_methods(torch.bfloat16):
        pytest.skip(f"{method} is not available for bf16 here")
    gate_up, down = _weights(torch.bfloat16)
    x = (torch.randn(5, H, generator=torch.Generator().manual_seed(1))).to(torch.bfloat16)
    kernel = CpuExpertKernel(gate_up, down, F.silu, method, fp32_out=True)
    y = kernel(x)
    assert y.dtype == torch.float32 and kernel._packed_down is None
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    want = F.linear((F.silu(gate) * up).float(), down.float())
    if method == "onednn_packed":  # another gate/up routine may round an activation the other way
        torch.testing.assert_close(y, want, rtol=2e-2, atol=2e-3)
    else:
        torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)
    assert not torch.equal(y, y.to(torch.bfloat16).float())  # not rounded to bf16
    assert kernel(x[:0]).dtype == torch.float32
