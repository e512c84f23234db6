"""Compute kernels for the parts of a model that run off the accelerator."""

from .cpu import METHODS, CpuExpertKernel, available_methods, pick_methods

__all__ = ["METHODS", "CpuExpertKernel", "available_methods", "pick_methods"]
