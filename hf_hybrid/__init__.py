"""hf_hybrid: run LLMs that do not fit on one GPU across GPU, CPU and PCIe at once, behind the HF API."""

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
