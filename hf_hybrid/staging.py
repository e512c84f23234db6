"""Where a weight crosses PCIe: reusable device slots that streamed units are copied into.

The copies themselves are issued on the copy lane (:class:`hf_hybrid.lanes.DeviceLanes`); this module
decides which slot a unit goes to, when a slot may be overwritten, and keeps recently used units so a
unit requested again before its slot is reused costs no copy.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from .errors import ExecutionError
from .lanes import DeviceLanes
from .weights import ALIGN, align


@dataclass
class _Slot:
    buffer: torch.Tensor
    tag: object = None
    ready: object = None  # copy finished
    free: object = None  # last reader finished


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

    def __init__(self, lanes: DeviceLanes, slot_bytes: int, slots: int):
        self.lanes = lanes
        slot_bytes = align(slot_bytes) + self.PADDING
        self.slot_bytes = slot_bytes
        self.slots = [
            _Slot(torch.empty(slot_bytes, dtype=torch.uint8, device=lanes.device)) for _ in range(slots)
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
        parts = host_region if isinstance(host_region, list) else [host_region]
        sizes = [p.numel() * p.element_size() for p in parts]
        total = sum(align(n) for n in sizes[:-1]) + sizes[-1]
        if total > self.slot_bytes:
            raise ExecutionError(f"staging slot of {self.slot_bytes} B is too small for {tag} ({total} B)")
        index = self.by_tag.get(tag)
        if index is not None:
            self.lru.move_to_end(index)
            self.hits += 1
            slot = self.slots[index]
            return slot.buffer[:total], slot.ready, True
        index = next(iter(self.lru))
        self.lru.move_to_end(index)
        slot = self.slots[index]
        if slot.tag is not None:
            self.by_tag.pop(slot.tag, None)
        view = slot.buffer[:total]
        offset = 0
        for part, nbytes in zip(parts, sizes):
            dst = view[offset : offset + nbytes].view(part.dtype).view(part.shape)
            # every part waits for the slot's last reader; the copy stream keeps them in order
            slot.ready = self.lanes.copy_into(dst, part, wait_for=slot.free, label=_label(tag))
            offset = align(offset + nbytes)
        slot.tag = tag
        self.by_tag[tag] = index
        self.misses += 1
        self.bytes_copied += sum(sizes)
        return view, slot.ready, False

    def release(self, tag: object) -> None:
        """Mark the slot holding ``tag`` as read by everything issued so far on the GPU lane."""
        index = self.by_tag.get(tag)
        if index is not None:
            self.slots[index].free = self.lanes.record()

    def forget(self) -> None:
        """Drop all cached tags (e.g. after a failed step, when slot contents may be partial)."""
        self.by_tag.clear()
        for slot in self.slots:
            slot.tag = None
