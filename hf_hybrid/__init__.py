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
    UnsupportedModelError,
    WeightsNotFoundError,
)
from .modeling import HybridModelForCausalLM
from .planner import HybridPlan, Workload
from .profile import HardwareProfile

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
    "UnsupportedModelError",
    "WeightsNotFoundError",
    "Workload",
    "__version__",
]
