"""The hybrid path on a real CUDA device: streams, events, pinned memory. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
from test_exactness import bf16_ulps, prompt
from tiny_models import CONFIGS, placement_for
from transformers import AutoModelForCausalLM

from hf_hybrid import HybridModelForCausalLM

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _pair(directory, family, dtype, mode="static"):
    ref = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to("cuda")
    hybrid = HybridModelForCausalLM.from_pretrained(
        directory,
        device="cuda",
        dtype=dtype,
        gpu_memory="256MiB",
        placement=placement_for(family),
        max_context=64,
        max_batch_size=2,
        progress=False,
        token_assignment=mode,
    )
    return ref, hybrid


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_cuda_float32_exact(tiny_checkpoints, family):
    ref, hybrid = _pair(tiny_checkpoints[family], family, torch.float32)
    ids = prompt().cuda()
    with torch.no_grad():
        torch.testing.assert_close(hybrid(ids).logits, ref(ids).logits, rtol=1e-5, atol=2e-5)
    assert torch.equal(
        hybrid.generate(ids, max_new_tokens=10, do_sample=False),
        ref.generate(ids, max_new_tokens=10, do_sample=False),
    )
    stats = hybrid.hybrid.executor.stats
    assert stats.cpu_units > 0 and stats.streamed_units > 0 and stats.gpu_units > 0
    # weights that stay on the host are pinned, so copies are asynchronous DMA
    group = next(iter(hybrid.hybrid.loaded.groups.values()))
    assert all(region.is_pinned() for region in group.host_regions.values())


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_cuda_bfloat16_within_ulps(tiny_checkpoints, family):
    ref, hybrid = _pair(tiny_checkpoints[family], family, torch.bfloat16, mode="adaptive")
    ids = prompt().cuda()
    with torch.no_grad():
        assert bf16_ulps(hybrid(ids).logits.float(), ref(ids).logits.float()) <= 4.0
