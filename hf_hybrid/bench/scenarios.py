"""The benchmark's scenarios: real layer shapes with few layers, and tiny twins for tests and CI.

Every scenario is one model family at the shapes of a public checkpoint (random weights, fewer layers)
plus the GPU budget that forces part of it off the GPU. Nothing here imports torch, so the CLI can list
scenarios and parse options without paying for the import.

Budgets, and why (sizes are bf16 weights; "non-expert" = attention, norms, routers, lm_head):

* S0 (Mixtral-8x7B shapes, 4 layers, 11.3 GiB): 4 GiB holds the non-expert weights (0.6 GiB) and about
  a third of the experts.
* S1 (same, 8 layers, 22.1 GiB): the headline. 6 GiB holds the non-expert weights (0.9 GiB) plus about a
  quarter of the experts; the rest must be computed on the CPU or streamed over PCIe.
* S2 (Llama-2-70B shapes, 10 layers, 16.9 GiB): dense, so every MLP row slice is needed for every token;
  6 GiB keeps attention (2.8 GiB) and lm_head resident and about a fifth of the MLP rows.
* S3 (Qwen3-30B-A3B shapes, 16 layers, 19.7 GiB): 4 GiB. Attention is small in this family (36 MiB a
  layer) but the 151936-token vocabulary makes lm_head alone 0.6 GiB, so 4 GiB leaves roughly 2.8 GiB --
  about 15 % of the 2048 small (9 MiB) experts -- on the GPU. A larger budget would leave too little to
  offload to be interesting; a smaller one would not hold attention + lm_head + KV cache comfortably.
* S4 (Phi-3.5-MoE shapes, 8 layers, 19.9 GiB): 6 GiB, about a quarter of the experts resident.
* tiny-*: under 1.1 MiB of weights. hf_hybrid counts its fixed device costs inside the budget (a 16 MiB
  workspace, KV cache, staging rings: about 16.3-16.8 MiB at prompt 32), so each tiny budget is that
  minimum plus a bit under half the weights, which forces offload. (accelerate's ``max_memory`` counts
  weights only, so on a GPU it keeps a tiny model whole: the tiny scenarios are for exercising code
  paths on the CPU, not for comparing engines.) A longer ``--prompt`` raises the minimum; pass a larger
  ``--gpu-memory`` then.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..system import cache_root

#: Families and the transformers config class that builds each.
FAMILY_CONFIGS = {
    "mixtral": "MixtralConfig",
    "llama": "LlamaConfig",
    "qwen3_moe": "Qwen3MoeConfig",
    "phimoe": "PhimoeConfig",
}


@dataclass(frozen=True)
class Scenario:
    """One benchmark setting: a model family at given shapes, a GPU budget and a default workload.

    ``baseline_prompt``/``baseline_new_tokens`` are the shorter workload the slow baselines (accelerate
    offload, the all-CPU model) run by default, since accelerate decodes at well under 1 tok/s on S1.
    """

    name: str
    family: str
    description: str
    config: dict[str, Any]
    gpu_memory: str
    batch: int = 1
    prompt: int = 512
    new_tokens: int = 128
    baseline_prompt: int = 128
    baseline_new_tokens: int = 8
    tiny: bool = False
    notes: tuple[str, ...] = field(default=())

    @property
    def is_moe(self) -> bool:
        """Whether the family routes tokens to experts (and so can take a routing skew)."""
        return self.family != "llama"

    @property
    def num_layers(self) -> int:
        """Number of decoder layers the checkpoint has."""
        return int(self.config["num_hidden_layers"])


def _mixtral(layers: int) -> dict[str, Any]:
    return {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": layers,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "vocab_size": 32000,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 32768,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
        "tie_word_embeddings": False,
    }


def _llama70b(layers: int) -> dict[str, Any]:
    return {
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": layers,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "vocab_size": 32000,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": False,
    }


def _qwen3_30b_a3b(layers: int) -> dict[str, Any]:
    return {
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "moe_intermediate_size": 768,
        "num_hidden_layers": layers,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "vocab_size": 151936,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 40960,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
        "tie_word_embeddings": False,
    }


def _phi35_moe(layers: int) -> dict[str, Any]:
    return {
        "hidden_size": 4096,
        "intermediate_size": 6400,
        "num_hidden_layers": layers,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "num_local_experts": 16,
        "num_experts_per_tok": 2,
        "vocab_size": 32064,
        "rms_norm_eps": 1e-5,
        "attention_bias": True,
        "lm_head_bias": True,
        "max_position_embeddings": 131072,
        # Phi-3.5-MoE uses LongRoPE; plain RoPE has the same weights and cost at these lengths.
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": False,
    }


_TINY_COMMON = {
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}

SCENARIOS: dict[str, Scenario] = {
    "S0": Scenario(
        "S0", "mixtral", "Mixtral-8x7B shapes, 4 layers (11.3 GiB bf16)", _mixtral(4), gpu_memory="4GiB"
    ),
    "S1": Scenario(
        "S1", "mixtral", "Mixtral-8x7B shapes, 8 layers (22.1 GiB bf16)", _mixtral(8), gpu_memory="6GiB"
    ),
    "S2": Scenario(
        "S2",
        "llama",
        "Llama-2-70B shapes, 10 layers, dense (16.9 GiB bf16)",
        _llama70b(10),
        gpu_memory="6GiB",
    ),
    "S3": Scenario(
        "S3",
        "qwen3_moe",
        "Qwen3-30B-A3B shapes, 16 layers, 128 experts top-8 (19.7 GiB bf16)",
        _qwen3_30b_a3b(16),
        gpu_memory="4GiB",
    ),
    "S4": Scenario(
        "S4",
        "phimoe",
        "Phi-3.5-MoE shapes, 8 layers, 16 experts top-2 (19.9 GiB bf16)",
        _phi35_moe(8),
        gpu_memory="6GiB",
    ),
    # Tiny twins: the same code paths in seconds on a CPU. Intermediate sizes differ from hidden sizes on
    # purpose, so a weight's orientation is never ambiguous.
    "tiny-moe": Scenario(
        "tiny-moe",
        "mixtral",
        "Mixtral family, tiny: hidden 64, 8 experts top-2, 2 layers",
        {
            **_TINY_COMMON,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            "vocab_size": 256,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
        },
        gpu_memory="16.8MiB",
        prompt=32,
        new_tokens=8,
        baseline_prompt=32,
        baseline_new_tokens=8,
        tiny=True,
    ),
    "tiny-dense": Scenario(
        "tiny-dense",
        "llama",
        "Llama family, tiny: hidden 128, intermediate 512, 2 layers",
        {
            **_TINY_COMMON,
            "hidden_size": 128,
            "intermediate_size": 512,
            "vocab_size": 256,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        },
        gpu_memory="17.3MiB",
        prompt=32,
        new_tokens=8,
        baseline_prompt=32,
        baseline_new_tokens=8,
        tiny=True,
    ),
    "tiny-qwen3moe": Scenario(
        "tiny-qwen3moe",
        "qwen3_moe",
        "Qwen3-MoE family, tiny: hidden 64, 16 experts top-4, 2 layers",
        {
            **_TINY_COMMON,
            "hidden_size": 64,
            "intermediate_size": 192,
            "moe_intermediate_size": 32,
            "head_dim": 16,
            "num_experts": 16,
            "num_experts_per_tok": 4,
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "vocab_size": 512,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
        },
        gpu_memory="16.55MiB",
        prompt=32,
        new_tokens=8,
        baseline_prompt=32,
        baseline_new_tokens=8,
        tiny=True,
    ),
    "tiny-phimoe": Scenario(
        "tiny-phimoe",
        "phimoe",
        "PhiMoE family, tiny: hidden 64, 8 experts top-2, 2 layers",
        {
            **_TINY_COMMON,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            "vocab_size": 256,
            "attention_bias": True,
            "lm_head_bias": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        },
        gpu_memory="16.8MiB",
        prompt=32,
        new_tokens=8,
        baseline_prompt=32,
        baseline_new_tokens=8,
        tiny=True,
    ),
}


def get_scenario(name: str | Scenario) -> Scenario:
    """Look a scenario up by name (case-insensitive for the S0..S4 names)."""
    if isinstance(name, Scenario):
        return name
    if name in SCENARIOS:
        return SCENARIOS[name]
    for key, scenario in SCENARIOS.items():
        if key.lower() == str(name).lower():
            return scenario
    raise ValueError(f"unknown scenario {name!r}; choose one of: {', '.join(SCENARIOS)}")


def make_config(scenario: str | Scenario) -> Any:
    """The transformers config object for ``scenario`` (bf16, default ``initializer_range``)."""
    import transformers

    sc = get_scenario(scenario)
    cls = getattr(transformers, FAMILY_CONFIGS[sc.family])
    config = cls(**sc.config)
    config.dtype = "bfloat16"
    return config


_ZIPF_RE = re.compile(r"^zipf(?:[:=]?([0-9]*\.?[0-9]+))?$", re.IGNORECASE)


def parse_skew(skew: str | None) -> tuple[str, float] | None:
    """Read a routing-skew spec: ``None``/``"none"``/``"uniform"`` -> None, ``"zipf"`` -> ("zipf", 1.0),
    ``"zipf:1.5"`` (or ``"zipf1.5"``) -> ("zipf", 1.5)."""
    if skew is None:
        return None
    text = str(skew).strip()
    if text.lower() in ("", "none", "uniform", "off"):
        return None
    match = _ZIPF_RE.match(text)
    if not match:
        raise ValueError(
            f"cannot read skew={skew!r}: use 'none', 'zipf' or 'zipf:S' (S = Zipf exponent, e.g. 1.2)"
        )
    exponent = float(match.group(1)) if match.group(1) else 1.0
    if exponent <= 0:
        raise ValueError(f"the Zipf exponent must be positive (got {exponent})")
    return ("zipf", exponent)


def skew_label(skew: tuple[str, float] | None) -> str:
    """Short, file-name-safe label of a parsed skew: ``uniform`` or ``zipf1`` / ``zipf1.5``."""
    if skew is None:
        return "uniform"
    return f"zipf{skew[1]:g}"


def default_cache_dir() -> Path:
    """``$HF_HYBRID_CACHE/bench`` when that variable is set, else ``~/.cache/hf_hybrid/bench``."""
    return cache_root() / "bench"
