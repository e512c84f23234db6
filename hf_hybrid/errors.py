"""Exceptions hf_hybrid raises. Each subclasses the built-in a caller would naturally catch."""

from __future__ import annotations


class HybridError(Exception):
    """Base class of every hf_hybrid error."""


class UnsupportedModelError(HybridError, ValueError):
    """The checkpoint's architecture is not one hf_hybrid can run."""


class BudgetError(HybridError, ValueError):
    """The GPU memory budget is unreadable or too small for the model's minimum."""


class PlacementError(HybridError, ValueError):
    """A forced placement names an unknown unit or a home the unit cannot have."""


class CheckpointError(HybridError, ValueError):
    """The checkpoint is missing tensors, has wrong shapes, or cannot be read."""


class WeightsNotFoundError(HybridError, FileNotFoundError):
    """The path or hub id has no loadable weights."""


class HostMemoryError(HybridError, MemoryError):
    """The plan needs more host memory than the machine has."""


class DeviceUnavailableError(HybridError, RuntimeError):
    """The requested accelerator is not available."""


class ContextLengthError(HybridError, ValueError):
    """A generate call would exceed the ``max_context`` the KV cache was reserved for."""


class ExecutionError(HybridError, RuntimeError):
    """A step failed inside the executor (a CPU worker or a device lane); the model stays usable."""


class ServingError(HybridError, ImportError):
    """``hf-hybrid serve`` cannot start: its extra packages are missing, or the installed transformers'
    server is not one it can adapt."""
