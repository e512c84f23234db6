"""Real text: the embedded SmolLM2-135M-Instruct through the hybrid path answers like plain transformers."""

from __future__ import annotations

import pytest
import torch
from smollm2_markers import needs_smollm2_package
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_hybrid import HybridModelForCausalLM

pytestmark = needs_smollm2_package


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    from hf_hybrid.default_model import default_model_dir

    return default_model_dir()


def test_capital_of_france_matches_transformers(smollm2_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    ref = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    want = ref.generate(**inputs, max_new_tokens=8, do_sample=False)
    hybrid = HybridModelForCausalLM.from_pretrained(
        smollm2_dir,
        device="cpu",
        dtype=torch.float32,
        gpu_memory="300MiB",
        max_context=256,
        progress=False,
        placement={
            "layers.*.mlp.0": "gpu",
            "layers.*.mlp.1": "cpu",
            "layers.*.mlp.2": "stream",
            "layers.3.attention": "stream",
        },
        token_assignment="static",
    )
    assert {h for h in hybrid.hybrid_plan.homes.values()} == {"gpu", "cpu", "stream"}
    got = hybrid.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, want)
    text = tokenizer.decode(got[0, inputs["input_ids"].shape[1] :])
    assert "Paris" in text
    stats = hybrid.hybrid.executor.stats
    assert stats.cpu_units and stats.streamed_units and stats.gpu_units
