"""Where a weight crosses PCIe: reusable device slots that streamed units are copied into.

The copies themselves are issued on the copy lane (:class:`hf_hybrid.lanes.DeviceLanes`); this module
decides which slot a unit goes to, when a slot may be overwritten, and keeps recently used units so a
unit requested again before its slot is reused costs no copy.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from .errors import ExecutionError
from .lanes import DeviceLanes
from .weights import ALIGN, align, carve


@dataclass
class _Slot:
    buffer: torch.Tensor
    tag: object = None
    view: torch.Tensor | None = None  # the bytes the tag occupies
    ready: object = None  # copy finished
    free: object = None  # last reader finished
    # events recorded again at every use (creating one costs the feeding thread more than recording it)
    ready_event: object = None
    free_event: object = None
    # a layout's destination views and typed tensors, made once per slot: the same units come back step
    # after step, and making views costs the feeding thread several microseconds each
    layouts: dict = field(default_factory=dict)
    carved: dict = field(default_factory=dict)


def _label(tag: object) -> str:
    if isinstance(tag, tuple) and len(tag) == 2:
        return f"L{tag[0]} unit {tag[1]}"
    if isinstance(tag, tuple) and len(tag) == 3:
        return f"L{tag[0]} unit {tag[1]} rows {tag[2]}:"
    return str(tag)


class StagingRing:
    """Reusable device slots for streamed weights, least recently used first.

    A slot keeps its weights after use, so a unit requested again before its slot is reused (experts
    the next decode steps still route to) costs no copy.
    """

    #: room for the alignment padding between a unit's tensors (the planner counts weight bytes only)
    PADDING = ALIGN * 32
    #: layouts (and typed tensors) kept per slot before they are made afresh: divided units bring a layout
    #: per split, and the split moves with the learned rates
    LAYOUTS_MAX = 64

    def __init__(self, lanes: DeviceLanes, slot_bytes: int, slots: int):
        self.lanes = lanes
        slot_bytes = align(slot_bytes) + self.PADDING
        self.slot_bytes = slot_bytes
        self.slots = [
            _Slot(
                torch.empty(slot_bytes, dtype=torch.uint8, device=lanes.device),
                ready_event=lanes.event(),
                free_event=lanes.event(),
            )
            for _ in range(slots)
        ]
        self.lru: OrderedDict[int, None] = OrderedDict((i, None) for i in range(slots))
        self.by_tag: dict[object, int] = {}
        self.hits = 0
        self.misses = 0
        self.bytes_copied = 0

    def fetch(
        self, tag: object, host_region: torch.Tensor | list[torch.Tensor]
    ) -> tuple[torch.Tensor, object, bool]:
        """Make ``host_region`` available on the device; returns (slot bytes view, ready event, was cached).

        A list of host tensors is laid out back to back at aligned offsets (as :func:`carve` reads them),
        one copy each: how a part of an expert that is not contiguous on the host crosses PCIe (row ranges,
        and column blocks of the down projection, which cross as one 2-D copy each).
        """
        index = self.by_tag.get(tag)
        if index is not None:
            self.lru.move_to_end(index)
            self.hits += 1
            slot = self.slots[index]
            return slot.view, slot.ready, True
        parts = host_region if isinstance(host_region, list) else [host_region]
        index = next(iter(self.lru))
        slot = self.slots[index]
        view, dsts, nbytes = self._layout(slot, tag, parts)
        self.lru.move_to_end(index)
        if slot.tag is not None:
            self.by_tag.pop(slot.tag, None)
        # every part waits for the slot's last reader; the copy stream keeps them in order
        slot.ready = self.lanes.copy_parts(
            dsts, parts, wait_for=slot.free, event=slot.ready_event, label=_label(tag)
        )
        slot.tag, slot.view = tag, view
        self.by_tag[tag] = index
        self.misses += 1
        self.bytes_copied += nbytes
        return view, slot.ready, False

    def fetch_carved(
        self,
        tag: object,
        host_region: torch.Tensor | list[torch.Tensor],
        shapes: tuple[tuple[int, ...], ...],
        dtype: torch.dtype,
    ) -> tuple[list[torch.Tensor], object, bool]:
        """:meth:`fetch`, returning the slot's bytes as typed tensors of ``shapes`` (:func:`carve`), made
        once per slot and layout."""
        view, ready, cached = self.fetch(tag, host_region)
        slot = self.slots[self.by_tag[tag]]
        key = (view.numel(), shapes, dtype)
        tensors = slot.carved.get(key)
        if tensors is None:
            with torch.inference_mode(False):  # kept: usable by calls in and out of inference mode
                tensors = carve(view, list(shapes), dtype)
            if len(slot.carved) >= self.LAYOUTS_MAX:
                slot.carved.clear()
            slot.carved[key] = tensors
        return tensors, ready, cached

    def _layout(self, slot: _Slot, tag: object, parts: list[torch.Tensor]):
        """(slot view, destination of each part, bytes copied) of ``parts`` laid out in ``slot``."""
        key = tuple((p.dtype, p.shape) for p in parts)
        layout = slot.layouts.get(key)
        if layout is not None:
            return layout
        sizes = [p.numel() * p.element_size() for p in parts]
        total = sum(align(n) for n in sizes[:-1]) + sizes[-1]
        if total > self.slot_bytes:
            raise ExecutionError(f"staging slot of {self.slot_bytes} B is too small for {tag} ({total} B)")
        dsts, offset = [], 0
        with torch.inference_mode(False):  # kept: usable by calls in and out of inference mode
            view = slot.buffer[:total]
            for part, nbytes in zip(parts, sizes):
                dsts.append(view[offset : offset + nbytes].view(part.dtype).view(part.shape))
                offset = align(offset + nbytes)
        layout = (view, dsts, sum(sizes))
        if len(slot.layouts) >= self.LAYOUTS_MAX:
            slot.layouts.clear()
        slot.layouts[key] = layout
        return layout

    def release(self, tag: object) -> None:
        """Mark the slot holding ``tag`` as read by everything issued so far on the GPU lane."""
        index = self.by_tag.get(tag)
        if index is not None:
            slot = self.slots[index]
            slot.free = self.lanes.record(slot.free_event)

    def forget(self) -> None:
        """Drop all cached tags (e.g. after a failed step, when slot contents may be partial)."""
        self.by_tag.clear()
        for slot in self.slots:
            slot.tag = None
