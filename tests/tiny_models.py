"""Tiny random checkpoints of every supported family, saved as safetensors, for exactness tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    OlmoeConfig,
    PhimoeConfig,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

VOCAB = 160
# A larger initializer_range than the default 0.02 makes experts and routing matter for the logits.
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.15,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

CONFIGS = {
    "mixtral": lambda: MixtralConfig(
        intermediate_size=96, num_local_experts=4, num_experts_per_tok=2, **COMMON
    ),
    "qwen2_moe": lambda: Qwen2MoeConfig(
        intermediate_size=96,
        moe_intermediate_size=48,
        shared_expert_intermediate_size=80,
        num_experts=4,
        num_experts_per_tok=2,
        mlp_only_layers=[1],
        **COMMON,
    ),
    "qwen3_moe": lambda: Qwen3MoeConfig(
        intermediate_size=96,
        moe_intermediate_size=48,
        num_experts=8,
        num_experts_per_tok=2,
        head_dim=16,
        **COMMON,
    ),
    "phimoe": lambda: PhimoeConfig(
        intermediate_size=96, num_local_experts=4, num_experts_per_tok=2, **COMMON
    ),
    "olmoe": lambda: OlmoeConfig(intermediate_size=48, num_experts=4, num_experts_per_tok=2, **COMMON),
    "llama": lambda: LlamaConfig(intermediate_size=96, **COMMON),
    "mistral": lambda: MistralConfig(intermediate_size=96, sliding_window=None, **COMMON),
    "qwen2": lambda: Qwen2Config(intermediate_size=96, **COMMON),
}

# Placements that put units of one layer in all three homes (and stream one attention block).
MOE_PLACEMENT = {
    "layers.*.experts.0": "gpu",
    "layers.*.experts.1": "cpu",
    "layers.*.experts.[2-9]": "stream",
    "layers.1.attention": "stream",
}
DENSE_PLACEMENT = {
    "layers.*.mlp.0": "gpu",
    "layers.*.mlp.1": "cpu",
    "layers.*.mlp.[23]": "stream",
    "layers.0.attention": "stream",
}
QWEN2_MOE_PLACEMENT = {
    "layers.0.experts.0": "gpu",
    "layers.0.experts.1": "cpu",
    "layers.0.experts.[23]": "stream",
    "layers.0.shared_expert": "stream",
    "layers.1.mlp.0": "gpu",
    "layers.1.mlp.1": "cpu",
    "layers.1.mlp.[23]": "stream",
}


def placement_for(family: str) -> dict[str, str]:
    """A forced placement that uses every home for ``family``'s tiny model."""
    if family == "qwen2_moe":
        return QWEN2_MOE_PLACEMENT
    if family in ("llama", "mistral", "qwen2"):
        return DENSE_PLACEMENT
    return MOE_PLACEMENT


def build(family: str, directory: Path, seed: int = 0) -> Path:
    """Save a tiny random ``family`` model (float32 safetensors) into ``directory``."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[family](), dtype=torch.float32)
    model.save_pretrained(directory)
    return directory


def load_every_lane(directory: Path, family: str = "mixtral", **options):
    """The hybrid model of ``directory`` on the CPU standing in, in float32, with every lane in use
    (forced mixed homes, static assignment)."""
    import torch

    from hf_hybrid import HybridModelForCausalLM

    settings = dict(
        device="cpu",
        dtype=torch.float32,
        gpu_memory="256MiB",
        placement=placement_for(family),
        token_assignment="static",
        max_context=64,
        progress=False,
    )
    settings.update(options)
    return HybridModelForCausalLM.from_pretrained(directory, **settings)


def char_tokenizer():
    """A character-level tokenizer whose ids fit the tiny models' vocabulary (printable ASCII, one token per
    character; pad, bos and eos ids as in :data:`COMMON`), for tools that need text in and text out."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0, 1, 2 are COMMON's pad, bos and eos
    vocab = {token: i for i, token in enumerate(specials + [chr(c) for c in range(32, 127)])}
    assert len(vocab) <= VOCAB
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()  # characters join without the spaces WordLevel would put between
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
