"""hf_hybrid: run LLMs that do not fit on one GPU across GPU, CPU and PCIe at once, behind the HF API."""

import os as _os
import sys as _sys

# OpenMP threads that spin after a parallel region steal cores from the CPU lane: on the H100 machine the
# CPU expert kernel ran at 29 GB/s in a loaded model and 56 GB/s with passive waiting. The policy is read
# once, when torch loads OpenMP, so it can only be set here if torch is not imported yet.
if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .errors import (
    BudgetError,
    CheckpointError,
    ContextLengthError,
    DeviceUnavailableError,
    ExecutionError,
    HostMemoryError,
    HybridError,
    PlacementError,
    ServingError,
    UnsupportedModelError,
    WeightsNotFoundError,
)

# The heavy names (torch, transformers) are imported on first use, so ``import hf_hybrid.planner`` and the
# command line's ``--help`` stay cheap.
_LAZY = {
    "HybridModelForCausalLM": ".modeling",
    "HybridPlan": ".planner",
    "Workload": ".planner",
    "HardwareProfile": ".profile",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hf_hybrid' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__version__ = "0.1.0"

__all__ = [
    "BudgetError",
    "CheckpointError",
    "ContextLengthError",
    "DeviceUnavailableError",
    "ExecutionError",
    "HardwareProfile",
    "HostMemoryError",
    "HybridError",
    "HybridModelForCausalLM",
    "HybridPlan",
    "PlacementError",
    "ServingError",
    "UnsupportedModelError",
    "WeightsNotFoundError",
    "Workload",
    "__version__",
]
