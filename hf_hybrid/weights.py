"""The host weight layout: one pinned arena per layer, carved into aligned typed tensors, and the
expert groups that hold each layer's gated-MLP units in their homes.

Everything here is memory layout; nothing computes or moves bytes between devices (that is
:mod:`hf_hybrid.staging` over :mod:`hf_hybrid.lanes`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .units import GPU, Unit

ALIGN = 64  # bytes; keeps every carved tensor aligned for vector loads and oneDNN


def align(n: int) -> int:
    """Round ``n`` up to a multiple of :data:`ALIGN`."""
    return (n + ALIGN - 1) // ALIGN * ALIGN


def can_pin() -> bool:
    """Pinned host memory needs a CUDA build with a device."""
    return torch.cuda.is_available()


class HostArena:
    """One pinned (when possible) host allocation carved into aligned, typed tensors.

    One big allocation per layer instead of one per expert: pinning is slow per call and a contiguous
    region per unit lets a streamed unit cross PCIe in a single copy.
    """

    def __init__(self, nbytes: int, pin: bool):
        self.buffer = torch.empty(max(nbytes, ALIGN), dtype=torch.uint8, pin_memory=pin)
        self.offset = 0

    def take(self, nbytes: int) -> torch.Tensor:
        """The next ``nbytes`` bytes as a uint8 view (aligned)."""
        start = self.offset
        self.offset = start + align(nbytes)
        if self.offset > self.buffer.numel():
            raise RuntimeError("HostArena overflow: the layout was computed for fewer bytes")
        return self.buffer[start : start + nbytes]


def carve(region: torch.Tensor, shapes: list[tuple[int, ...]], dtype: torch.dtype) -> list[torch.Tensor]:
    """Typed tensors of ``shapes`` laid out back to back (aligned) inside the uint8 ``region``."""
    out, offset = [], 0
    elt = torch.empty((), dtype=dtype).element_size()
    for shape in shapes:
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * elt
        out.append(region[offset : offset + nbytes].view(dtype).view(shape))
        offset = align(offset + nbytes)
    return out


def layout_bytes(shapes: list[tuple[int, ...]], dtype: torch.dtype) -> int:
    """Bytes :func:`carve` needs for ``shapes``."""
    elt = torch.empty((), dtype=dtype).element_size()
    total = 0
    for shape in shapes:
        numel = 1
        for s in shape:
            numel *= s
        total = align(total + numel * elt)
    return total


@dataclass
class ExpertGroup:
    """The gated-MLP units of one layer: the experts of a MoE layer, or the row slices of a dense MLP.

    ``device_weights[i]`` holds (gate_up, down) of resident units; ``host_regions[i]`` the pinned bytes of
    host units and ``host_weights[i]`` typed views of them.
    """

    layer: int
    units: list[Unit]
    homes: list[str]
    act_fn: object
    dtype: torch.dtype
    routed: bool  # MoE (tokens routed with weights) or dense (every token to every slice, weight 1)
    device_weights: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    host_regions: dict[int, torch.Tensor] = field(default_factory=dict)
    host_weights: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    cpu_kernels: dict[int, object] = field(default_factory=dict)  # unit -> its CPU kernel, built on first use
    shapes: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    # a dense MLP whose slices are all resident, as one (gate_up, down) pair: computed in one piece, exactly
    # as transformers does (a sum of slices rounds each slice's output first)
    merged: tuple[torch.Tensor, torch.Tensor] | None = None


def rehome_unit(group: ExpertGroup, i: int, home: str, device: torch.device, pin: bool) -> None:
    """Move unit ``i`` of ``group`` to ``home``: its weights cross PCIe once (for re-planning).

    A unit leaving the device gets its own (pinned when ``pin``) host region; a unit arriving drops its
    host views (the layer's host arena itself is shared, so its bytes stay allocated until the model is
    freed).
    """
    old = group.homes[i]
    if old == home:
        return
    if group.merged is not None:
        split_merged(group)
    shapes = list(group.shapes[i])
    if old == GPU:
        gate_up, down = group.device_weights.pop(i)
        region = torch.empty(layout_bytes(shapes, group.dtype), dtype=torch.uint8, pin_memory=pin)
        host_gate_up, host_down = carve(region, shapes, group.dtype)
        host_gate_up.copy_(gate_up)
        host_down.copy_(down)
        group.host_regions[i] = region
        group.host_weights[i] = (host_gate_up, host_down)
    elif home == GPU:
        host_gate_up, host_down = group.host_weights.pop(i)
        group.host_regions.pop(i)
        group.device_weights[i] = (host_gate_up.to(device), host_down.to(device))
    group.homes[i] = home


def merge_resident_slices(group: ExpertGroup) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The dense MLP of ``group`` as one (gate_up, down) pair when every slice is resident (built once; the
    slices' own device copies are then released, so the device holds the MLP once); None otherwise."""
    if group.merged is not None:
        return group.merged
    if group.routed or any(home != GPU for home in group.homes) or not group.device_weights:
        return None
    parts = [group.device_weights[i] for i in range(len(group.units))]
    with torch.inference_mode(False), torch.no_grad():
        gate = torch.cat([gate_up[: gate_up.shape[0] // 2] for gate_up, _ in parts])
        up = torch.cat([gate_up[gate_up.shape[0] // 2 :] for gate_up, _ in parts])
        group.merged = (torch.cat([gate, up]), torch.cat([down for _, down in parts], dim=1))
    group.device_weights.clear()
    return group.merged


def split_merged(group: ExpertGroup) -> None:
    """Undo :func:`merge_resident_slices`: each slice gets its own (gate_up, down) on the device again."""
    gate_up, down = group.merged
    inter, start = gate_up.shape[0] // 2, 0
    with torch.inference_mode(False), torch.no_grad():
        for i in range(len(group.units)):
            rows = group.shapes[i][1][1]  # down is [H, rows]
            gate, up = gate_up[start : start + rows], gate_up[inter + start : inter + start + rows]
            group.device_weights[i] = (torch.cat([gate, up]), down[:, start : start + rows].contiguous())
            start += rows
    group.merged = None
