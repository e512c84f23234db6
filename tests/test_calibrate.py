"""Calibration records real routing and moves hot experts onto the GPU, keeping results exact."""

from __future__ import annotations

import pytest
import torch
from test_exactness import prompt
from transformers import AutoModelForCausalLM

from hf_hybrid import HybridModelForCausalLM


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_calibrate_puts_hot_experts_on_gpu_and_stays_exact(tiny_checkpoints, family):
    directory = tiny_checkpoints[family]
    ref = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    hybrid = HybridModelForCausalLM.from_pretrained(
        directory, device="cpu", dtype=torch.float32, gpu_memory="16.9MiB", max_context=64, progress=False
    )
    before = hybrid.hybrid_plan
    stats = hybrid.calibrate([prompt(batch=1, length=48, seed=s)[0] for s in range(4)])
    # the new plan keeps what calibration does not change: the prefill chunk, the KV cache's cost per 1k of
    # context (shown in the plan), the options the predictions assume
    after = hybrid.hybrid_plan
    assert after is not before and before.kv_cache_bytes_per_1k > 0
    for name in ("prefill_chunk", "kv_cache_bytes_per_1k", "token_assignment", "prefill_splits"):
        assert getattr(after, name) == getattr(before, name), name
    top_k = hybrid.config.num_experts_per_tok
    layers = {name.split(".experts.")[0] for name in stats}
    for layer in layers:
        total = sum(v for k, v in stats.items() if k.startswith(layer + ".experts."))
        assert total == pytest.approx(top_k)
    plan = hybrid.hybrid_plan
    assert plan.routing == stats
    assert plan.device_bytes <= plan.budget_bytes
    for layer in layers:
        names = [k for k in stats if k.startswith(layer + ".experts.")]
        on_gpu = [stats[n] for n in names if plan.homes[n] == "gpu"]
        off_gpu = [stats[n] for n in names if plan.homes[n] != "gpu"]
        if on_gpu and off_gpu:
            assert min(on_gpu) >= max(off_gpu) - 1e-9 or sum(on_gpu) / len(on_gpu) > sum(off_gpu) / len(
                off_gpu
            )
    # the executor's groups follow the new plan
    for group in hybrid.hybrid.loaded.groups.values():
        for i, u in enumerate(group.units):
            assert group.homes[i] == plan.homes[u.name]
            assert (i in group.device_weights) == (plan.homes[u.name] == "gpu")
    ids = prompt(batch=1, seed=7)
    assert torch.equal(
        hybrid.generate(ids, max_new_tokens=8, do_sample=False),
        ref.generate(ids, max_new_tokens=8, do_sample=False),
    )


def test_calibrate_refuses_dense_models(tiny_checkpoints):
    hybrid = HybridModelForCausalLM.from_pretrained(
        tiny_checkpoints["llama"],
        device="cpu",
        dtype=torch.float32,
        gpu_memory="16.9MiB",
        max_context=64,
        progress=False,
    )
    with pytest.raises(ValueError, match="mixture-of-experts"):
        hybrid.calibrate([prompt(batch=1)[0]])


def test_calibrate_moves_experts_when_routing_is_skewed(tiny_checkpoints):
    directory = tiny_checkpoints["mixtral"]
    hybrid = HybridModelForCausalLM.from_pretrained(
        directory, device="cpu", dtype=torch.float32, gpu_memory="16.9MiB", max_context=64, progress=False
    )
    before = dict(hybrid.hybrid_plan.homes)
    stats = hybrid.calibrate([prompt(batch=1, length=48, seed=s)[0] for s in range(4)])
    after = hybrid.hybrid_plan.homes
    hottest = {
        layer: max((n for n in stats if n.startswith(f"layers.{layer}.")), key=stats.get) for layer in (0, 1)
    }
    for name in hottest.values():
        assert after[name] == "gpu"
    assert before != after or all(before[n] == "gpu" for n in hottest.values())
