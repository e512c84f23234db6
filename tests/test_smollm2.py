"""Real text: the embedded SmolLM2-135M-Instruct through the hybrid path answers like plain transformers."""

from __future__ import annotations

import torch
from smollm2_markers import SMOL_PLACEMENT, load_smollm2_pair, needs_smollm2_package

pytestmark = needs_smollm2_package


def test_capital_of_france_matches_transformers():
    tokenizer, ref, hybrid = load_smollm2_pair(
        placement={**SMOL_PLACEMENT, "layers.3.attention": "stream"}, token_assignment="static"
    )
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    want = ref.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert {h for h in hybrid.hybrid_plan.homes.values()} == {"gpu", "cpu", "stream"}
    got = hybrid.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, want)
    text = tokenizer.decode(got[0, inputs["input_ids"].shape[1] :])
    assert "Paris" in text
    stats = hybrid.hybrid.executor.stats
    assert stats.cpu_units and stats.streamed_units and stats.gpu_units
    hybrid.hybrid.close()
