"""The machine a bench runs on: versions and hardware for the record, and the hardware profile of the bounds."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

from ..system import cpu_model, meminfo
from .settings import log


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - a missing or broken package is just "unknown" here
        return None


def machine_info(device: str) -> dict:
    """Versions and hardware of this machine, for the JSON record."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "accelerate": _version("accelerate"),
        "safetensors": _version("safetensors"),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_total_bytes": meminfo("MemTotal"),
        "device": device,
        "cuda": torch.version.cuda,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        dev = torch.device(device)
        props = torch.cuda.get_device_properties(dev)
        info.update(
            gpu_name=props.name, gpu_total_bytes=props.total_memory, gpu_count=torch.cuda.device_count()
        )
    return info


def device_name(device: str) -> str:
    """Human name of the device the bench runs on."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({cpu_model()}, {torch.get_num_threads()} threads)"


def load_profile(device: str, mode: str = "auto", plan: dict | None = None) -> tuple[Any, str]:
    """The machine's :class:`~hf_hybrid.profile.HardwareProfile` for the bounds, and where it came from.

    ``auto``: the profile hf_hybrid's plan was made with when there is one (so bounds and the plan's
    predictions agree), else what hf_hybrid would use -- the cached full measurement on CUDA
    (:func:`hf_hybrid.measure.load_or_measure`), ``default_profile`` on the CPU. ``quick``/``full``: ``load_or_measure`` with
    that mode. ``default``: ``default_profile``. Falls back to ``default_profile`` when measuring fails.
    """
    from ..profile import HardwareProfile, default_profile

    if mode == "auto" and isinstance(plan, dict) and isinstance(plan.get("profile"), dict):
        try:
            return HardwareProfile.from_dict(plan["profile"]), "hf_hybrid plan"
        except Exception as exc:  # noqa: BLE001 - an unreadable plan profile only costs a measurement
            log(f"cannot read the plan's profile ({type(exc).__name__}: {exc}); loading one")
    if mode == "auto":
        mode = "full" if device.startswith("cuda") else "default"
    if mode != "default":
        try:
            from ..measure import load_or_measure

            return load_or_measure(
                device, torch.bfloat16, quick=(mode == "quick")
            ), f"load_or_measure({mode})"
        except Exception as exc:  # noqa: BLE001 - the bench still runs on the default figures
            log(f"measuring the hardware profile failed ({type(exc).__name__}: {exc}); using defaults")
            return default_profile(device), f"default_profile (load_or_measure failed: {exc})"
    return default_profile(device), "default_profile"
