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


def test_cuda_trace_times_device_lanes(tiny_checkpoints, tmp_path):
    import json

    from hf_hybrid.trace import LANES

    _, hybrid = _pair(tiny_checkpoints["mixtral"], "mixtral", torch.float32)
    path = hybrid.trace(tmp_path / "trace.json", prompt(batch=1).cuda(), max_new_tokens=3)
    spans = [e for e in json.loads(path.read_text())["traceEvents"] if e["ph"] == "X"]
    assert {LANES["CPU lane"], LANES["PCIe copy"], LANES["GPU"]} <= {e["tid"] for e in spans}
    assert all(e["dur"] >= 0 for e in spans)


def test_cuda_calibrate_moves_experts_and_stays_exact(tiny_checkpoints):
    directory = tiny_checkpoints["qwen3_moe"]
    ref = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).to("cuda")
    hybrid = HybridModelForCausalLM.from_pretrained(
        directory, device="cuda", dtype=torch.float32, gpu_memory="16.9MiB", max_context=64, progress=False
    )
    hybrid.calibrate([prompt(batch=1, length=48, seed=s)[0] for s in range(3)])
    for group in hybrid.hybrid.loaded.groups.values():
        for i, home in enumerate(group.homes):
            if home == "gpu":
                assert group.device_weights[i][0].is_cuda
            else:
                assert group.host_regions[i].is_pinned()
    ids = prompt(batch=1, seed=9).cuda()
    assert torch.equal(
        hybrid.generate(ids, max_new_tokens=8, do_sample=False),
        ref.generate(ids, max_new_tokens=8, do_sample=False),
    )


def test_cuda_cpu_lane_fault_leaves_model_usable(tiny_checkpoints):
    from hf_hybrid import ExecutionError

    ref, hybrid = _pair(tiny_checkpoints["mixtral"], "mixtral", torch.float32)
    ids = prompt(batch=1).cuda()
    want = ref.generate(ids, max_new_tokens=6, do_sample=False)

    def fail(lane):
        if lane == "cpu":
            raise RuntimeError("injected")

    hybrid.hybrid.executor.fault_injector = fail
    with pytest.raises(ExecutionError, match="CPU lane"):
        hybrid.generate(ids, max_new_tokens=6, do_sample=False)
    hybrid.hybrid.executor.fault_injector = None
    assert torch.equal(hybrid.generate(ids, max_new_tokens=6, do_sample=False), want)
