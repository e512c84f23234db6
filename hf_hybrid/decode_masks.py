"""The attention mask of each decode step on the kept static KV cache, updated in place of rebuilt.

With a static cache, transformers' ``generate`` builds a 4-D mask over all ``max_context`` positions before
every forward (``create_masks_for_generate``): a dozen small device ops and ~0.5 ms of host time per token
on the GPU machine, while the CPU and copy lanes sit idle between two tokens. Between two decode steps of
one call that mask changes in one column: the new token's position becomes visible (generate extends the
2-D mask by a column of ones). :class:`DecodeMasks` keeps the last mask and sets that column; it builds the
first masks of a call with transformers' own function and checks its first update against it (once per
call), so a transformers release that builds masks differently, or a model whose mask is not plain causal
(sliding windows, several layer types, float masks), keeps transformers' masks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger("hf_hybrid")


def plain_causal(config: Any) -> bool:
    """Whether every layer of ``config`` attends causally over the whole cache (no window, no chunks)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layer_types = getattr(text, "layer_types", None)
    if layer_types:  # transformers builds the masks by layer type when the config lists them
        return all(kind == "full_attention" for kind in layer_types)
    return getattr(text, "sliding_window", None) is None and not getattr(text, "attention_chunk_size", None)


def _one_query_bool(mask: Any) -> bool:
    return (
        isinstance(mask, torch.Tensor)
        and mask.dtype == torch.bool
        and mask.dim() == 4
        and mask.shape[1:3] == (1, 1)
    )


@dataclass
class DecodeMasks:
    """The last decode mask of the running call (see the module docstring); :meth:`reset` per call.

    A mask is what transformers returns: a tensor, or a dict of tensors by layer type (all of them full
    attention here); both are kept as a dict, the tensor under the key ``None``.
    """

    enabled: bool = True
    masks: dict | None = None  # bool [batch, 1, 1, cache length] each: what the last forward received
    length: int = 0  # columns of the 2-D mask they were made from
    checked: bool = False  # this call's first update was compared with transformers' masks
    updates: int = 0  # masks made by an update (for tests)

    def reset(self) -> None:
        """Forget the last mask (a new generate call)."""
        self.masks, self.length, self.checked = None, 0, False

    def next(self, build: Callable[..., Any], kwargs: dict) -> Any:
        """The mask ``build(**kwargs)`` (transformers' function) would return, by an update where possible."""
        attention_mask = kwargs.get("attention_mask")
        if not self._updatable(attention_mask, kwargs):
            return self._keep(build(**kwargs), attention_mask)
        position = attention_mask.shape[1] - 1
        column = attention_mask[:, position].to(torch.bool)
        # in place: the forward that read the last mask was issued before this update (stream order)
        masks = self.masks
        for mask in masks.values():
            mask[:, 0, 0, position] = column
        if not self.checked:
            reference = build(**kwargs)
            self.checked = True
            if not self._same(reference, masks):
                logger.info("hf_hybrid: decode masks are rebuilt by transformers for this model")
                self.enabled = False
                self.reset()
                return reference
        self.masks, self.length = masks, attention_mask.shape[1]
        self.updates += 1
        # new tensor objects each step: the decode graphs copy a step's inputs when they are new objects
        views = {key: mask.view(mask.shape) for key, mask in masks.items()}
        return views[None] if None in views else views

    def _updatable(self, attention_mask, kwargs: dict) -> bool:
        embeds = kwargs.get("inputs_embeds")
        if not (self.enabled and self.masks and isinstance(attention_mask, torch.Tensor)):
            return False
        batch, cache_length = next(iter(self.masks.values())).shape[::3]
        return (
            isinstance(embeds, torch.Tensor)
            and embeds.shape[1] == 1
            and attention_mask.dim() == 2
            and attention_mask.shape == (batch, self.length + 1)
            and self.length < cache_length
            and all(kwargs.get(name) is None for name in ("or_mask_function", "and_mask_function"))
            and kwargs.get("block_sequence_ids") is None
        )

    @staticmethod
    def _same(reference: Any, masks: dict) -> bool:
        got = reference if isinstance(reference, dict) else {None: reference}
        return got.keys() == masks.keys() and all(
            _one_query_bool(got[key]) and got[key].shape == mask.shape and torch.equal(got[key], mask)
            for key, mask in masks.items()
        )

    def _keep(self, mask: Any, attention_mask) -> Any:
        """Remember ``mask`` as the base of the next update when it is made of plain bool masks of one query."""
        masks = mask if isinstance(mask, dict) else {None: mask}
        keys_ok = all(key in (None, "full_attention") for key in masks)
        if (
            self.enabled
            and keys_ok
            and all(_one_query_bool(m) for m in masks.values())
            and (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2)
        ):
            self.masks, self.length = dict(masks), attention_mask.shape[1]
        else:
            self.masks, self.length = None, 0
        return mask
