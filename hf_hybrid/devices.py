"""Which accelerator a call runs on: the one place that turns a user's ``device`` into a torch device."""

from __future__ import annotations

import torch
from transformers.utils import logging

from .errors import DeviceUnavailableError

logger = logging.get_logger(__name__)


def default_device_name() -> str:
    """``"cuda"`` when a CUDA device is visible, else ``"cpu"`` (the CPU standing in)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | torch.device | None, allow_cpu_fallback: bool = False) -> torch.device:
    """The accelerator to use; ``"cpu"`` makes the CPU stand in for it (same code path)."""
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        logger.warning_once(
            "hf_hybrid: no CUDA device: running with the CPU standing in for the accelerator. Pass "
            "device='cpu' to silence this, or gpu_memory= to keep testing a small budget."
        )
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            if allow_cpu_fallback:
                logger.warning(
                    "hf_hybrid: device=%r but CUDA is not available: the CPU stands in for it", device
                )
                return torch.device("cpu")
            raise DeviceUnavailableError(
                f"device={device!r} but this torch build sees no CUDA device "
                f"(torch {torch.__version__}, cuda={torch.version.cuda}). Install a CUDA build of torch, or pass "
                f"device='cpu' (or allow_cpu_fallback=True) to let the CPU stand in for the accelerator."
            )
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise DeviceUnavailableError(
                f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s)"
            )
    elif dev.type != "cpu":
        raise DeviceUnavailableError(f"device={device!r} is not supported: use 'cuda', 'cuda:N' or 'cpu'")
    return dev
