"""Shared by the diagnostic scripts: a benchmark scenario's checkpoint, loaded, with a seeded prompt."""

from __future__ import annotations

# first, before torch: hf_hybrid sets OMP_WAIT_POLICY=PASSIVE, which OpenMP reads once, when torch loads it
import hf_hybrid

# isort: split

import torch

from hf_hybrid.bench.checkpoint import build_checkpoint
from hf_hybrid.bench.scenarios import Scenario, get_scenario


def load_scenario_model(
    name: str,
    *,
    new_tokens: int,
    prompt: int | None = None,
    gpu_memory: str | None = None,
    skew: str | None = None,
    context_slack: int = 0,
) -> tuple[Scenario, torch.nn.Module, torch.Tensor]:
    """(scenario, hybrid model, prompt ids [1, prompt] on the host) for scenario ``name``.

    The checkpoint is built once (or reused); the model gets the scenario's GPU budget unless
    ``gpu_memory`` is given, and a KV cache for ``prompt + new_tokens + context_slack`` positions.
    """
    scenario = get_scenario(name)
    prompt = prompt or scenario.prompt
    path = build_checkpoint(scenario, skew=skew)
    model = hf_hybrid.HybridModelForCausalLM.from_pretrained(
        path,
        gpu_memory=gpu_memory or scenario.gpu_memory,
        dtype=torch.bfloat16,
        max_context=prompt + new_tokens + context_slack,
    )
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=generator)
    return scenario, model, ids
