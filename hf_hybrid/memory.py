"""Device memory accounting: what a model needs on the accelerator besides its resident weights.

One place for the KV cache, the workspace of one step and (through the plan) the staging rings, so the
library, the planner and the benchmark count the same bytes. Pure Python: no torch.
"""

from __future__ import annotations

from typing import Any

#: fixed device workspace every plan keeps (allocator slack, small temporaries)
FIXED_WORKSPACE_BYTES = 16 * 1024**2


def kv_cache_bytes(config: Any, max_context: int, max_batch_size: int, element_size: int) -> int:
    """Bytes of a full KV cache for ``max_context`` x ``max_batch_size`` on every layer.

    ``element_size`` is the bytes per element of the cache's dtype (2 for bf16/fp16, 4 for fp32).
    """
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * max_batch_size * max_context * kv_heads * head_dim * element_size


def workspace_bytes(
    config: Any,
    units: list,
    max_context: int,
    max_batch_size: int,
    prefill_tokens: int,
    divided_copies: int = 0,
) -> int:
    """Device activations of one prefill step (hidden states, expert intermediates, attention, logits).

    ``divided_copies``: rows per token that a prefill step's divided experts add (the executor's
    ``prefill_splits``: up to the experts per token): each such row is held as the CPU lane's input (model
    dtype), its part coming back (fp32) and the GPU's part kept for the sum (fp32)."""
    tokens = max_batch_size * min(prefill_tokens, max_context)
    hidden = config.hidden_size
    widest = max((u.tensors[0].shape[0] for u in units if u.tensors), default=4 * hidden)
    per_token = 4 * (8 * hidden + 2 * widest)  # fp32 accumulators, residual, norms, gate/up outputs
    per_token += divided_copies * (2 + 4 + 4) * hidden
    logits = 4 * max_batch_size * config.vocab_size * 2
    attention = 2 * max_batch_size * config.num_attention_heads * min(prefill_tokens, max_context) * 128
    return FIXED_WORKSPACE_BYTES + tokens * per_token + logits + attention
