"""Greedy decode steps start the next step's first layer before ``generate`` asks for it.

Between two decode forwards the expert lanes idle for several milliseconds: the last layer's output goes
through the final norm and ``lm_head``, ``generate`` runs its Python (logits processors, stopping criteria,
input preparation), the next forward embeds the token, builds its inputs and runs layer 0's attention and
router, and only then can layer 0's experts start on the CPU and copy lanes. On S1 that boundary was about a
tenth of a decode step.

In a greedy call the next token is the argmax of the logits the forward just returned, unless a logits
processor changes it. So at the end of decode forward n (:meth:`DecodeLookahead.after_forward`, a forward
hook) the lookahead embeds that argmax, advances the step's inputs by one position (position ids + 1, their
rotary embeddings, the attention mask with the next column set, as ``generate`` and
:mod:`hf_hybrid.decode_masks` will), replays layer 0's attention half (which writes the token's keys and
values into the static cache) and starts layer 0's expert step on the lanes
(:meth:`hf_hybrid.executor.Executor.start_group`), then returns the logits to ``generate``. ``generate``'s
own host work now runs while the lanes compute.

Forward n + 1 claims that work in layer 0 (:meth:`DecodeLookahead.claim`) only when every input of layer 0's
attention half equals what the lookahead used (hidden states, rotary cos/sin, mask, position ids, other
arguments): then the same ops ran on the same inputs, so the result is the one forward n + 1 would compute,
bit for bit. Otherwise (a logits processor or sampling changed the token, a finished sequence got padding)
the started step is finished and dropped, the cache position is left where ``generate`` expects it (the
lookahead puts it back after its write; a claim advances it), layer 0 runs as usual, and the lookahead stays
off for the rest of the call. The lookahead never runs past the last token of a call.

Measured on S1 on the H200 machine (docs/benchmarks.md, 2026-12-04): the lanes start layer 0 about 2 ms
sooner, but the next layer starts no sooner and decode is 3% slower, because at the token boundary the
feeding thread is the longest path (its own work for layer 0, generate's loop and the next forward's
preamble take longer than layer 0's lanes), and the lookahead adds to it. It is therefore off by default
(``decode_lookahead=True`` switches it on); it pays where layer 0's lane work is longer than that host path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from .executor import StepStarted

logger = logging.getLogger("hf_hybrid")


@dataclass
class _Inputs:
    """What layer 0's attention half was called with in one decode step."""

    hidden: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    rest: dict
    cache_name: str


@dataclass
class _Started:
    """Layer 0 of the next step, run ahead: its inputs, its attention-half outputs and the cache position
    the write moved to."""

    inputs: _Inputs
    outputs: tuple
    position_after: torch.Tensor


class DecodeLookahead:
    """Runs layer ``layer`` (the first decoder layer) of the next greedy decode step ahead of ``generate``.

    ``graphs``: the model's :class:`~hf_hybrid.decode_graphs.DecodeGraphs` (cache, layer graphs, masks);
    ``executor``: the model's executor; ``embed``: the input embedding; ``rotary``: the decoder's rotary
    embedding module (``rotary(x, position_ids) -> (cos, sin)``).
    """

    def __init__(self, graphs, executor, embed, rotary, layer: int = 0) -> None:
        self.graphs = graphs
        self.executor = executor
        self.embed = embed
        self.rotary = rotary
        self.layer = layer
        self.enabled = True  # the model's switch (``decode_lookahead``); a call looks ahead only when set
        self.active = False  # this call may look ahead (greedy, and no miss yet)
        self.tokens_left = 0  # decode forwards still to come in this call
        self.starts = 0  # layer steps started ahead (each a claim, a miss or dropped at the end of a call)
        self.hits = 0
        self.misses = 0
        self._last: _Inputs | None = None  # layer 0's inputs in the forward now running
        self._written = 0
        self._started: _Started | None = None

    # ----------------------------------------------------------------------------- a generate call
    def begin_call(self, new_tokens: int | None, prompt: int) -> None:
        """A greedy ``generate`` call starts: look ahead for its ``new_tokens`` tokens after a prompt of
        ``prompt`` positions."""
        self.end_call()
        self._written = prompt  # cache positions written (kept on the host: reading the cache's would wait)
        self.active = self.enabled and self.rotary is not None and self.layer in self.graphs.graphable
        self.tokens_left = (new_tokens - 1) if new_tokens is not None else 1 << 30

    def end_call(self, failed: bool = False) -> None:
        """The call ends: drop a step started ahead that no forward took. ``failed``: the call is raising
        already, so the dropped step's own error (if any) must not replace that one."""
        self.active = False
        self._last = None
        self.drop(quiet=failed)

    def drop(self, quiet: bool = False) -> None:
        """Finish and drop a step started ahead whose forward did not come (``quiet``: without raising)."""
        if self._started is not None:
            self._started = None
            if quiet:
                self.executor.drop_ahead()
            else:
                self.executor.settle_ahead()

    # ------------------------------------------------------------------------- inside a forward
    def remember(self, hidden, kwargs: dict, cache_name: str, rest: dict) -> None:
        """Layer 0's decode inputs of the running forward (the base of the next step's)."""
        if not self.active:
            return
        self._written += 1
        position_embeddings = kwargs.get("position_embeddings")
        if position_embeddings is None:
            self._last = None
            return
        self._last = _Inputs(
            hidden,
            position_embeddings[0],
            position_embeddings[1],
            kwargs.get("attention_mask"),
            kwargs.get("position_ids"),
            rest,
            cache_name,
        )

    def claim(self, hidden, kwargs: dict, cache_name: str, rest: dict) -> tuple | None:
        """Layer 0's attention-half outputs when the lookahead ran this step on exactly these inputs (the
        lanes are then already working on its experts); None otherwise (anything started is dropped)."""
        started, self._started = self._started, None
        if started is None:
            return None
        if self._same_inputs(started.inputs, hidden, kwargs, cache_name, rest):
            self.hits += 1
            self.graphs.cache.layers[self.layer].cumulative_length.copy_(started.position_after)
            self.executor.ahead_verified = True
            return started.outputs
        self.misses += 1
        self.active = False  # this call's tokens are not the argmax: stop guessing
        self.executor.settle_ahead()
        return None

    def after_forward(self, logits: torch.Tensor | None) -> None:
        """End of a forward: start the next greedy step's layer 0 when this was a decode step on the graphs'
        cache and another decode forward will come."""
        last, self._last = self._last, None
        if last is None or not self.active or logits is None:
            return
        self.tokens_left -= 1
        if self.tokens_left <= 0:
            return
        following = self._next_inputs(last, logits)
        if following is not None:
            self._start(following)

    # ------------------------------------------------------------------------------------ helpers
    def _next_inputs(self, last: _Inputs, logits: torch.Tensor) -> _Inputs | None:
        """Layer 0's inputs of the next step if its token is the argmax of ``logits`` (None when this step's
        inputs cannot be advanced: no position ids, or a mask that is not one boolean row per sequence)."""
        mask = last.mask
        if last.position_ids is None:
            return None
        if mask is not None:
            if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1:3] != (1, 1):
                return None
            # the new token's keys go to the cache position the last step's write moved to; the next step
            # sees that column too (generate extends the 2-D mask by a column of ones)
            position = self._written
            if position >= mask.shape[-1]:
                return None
            mask = mask.clone()
            mask[:, :, :, position] = True
        token = logits[:, -1, :].argmax(dim=-1, keepdim=True)
        hidden = self.embed(token)
        if hidden.shape != last.hidden.shape or hidden.dtype != last.hidden.dtype:
            return None
        position_ids = last.position_ids + 1
        cos, sin = self.rotary(hidden, position_ids=position_ids)
        return _Inputs(hidden, cos, sin, mask, position_ids, last.rest, last.cache_name)

    def _start(self, inputs: _Inputs) -> None:
        graphs, executor, index = self.graphs, self.executor, self.layer
        layer = graphs.layers[index]
        cache_layer = graphs.cache.layers[index]
        before = cache_layer.cumulative_length.clone()
        kwargs = {
            "position_embeddings": (inputs.cos, inputs.sin),
            "attention_mask": inputs.mask,
            "position_ids": inputs.position_ids,
            **inputs.rest,
        }
        try:
            outputs = graphs._attention(index, layer, inputs.hidden, inputs.cache_name, kwargs)
            after = cache_layer.cumulative_length.clone()
            # generate may read the cache's length before the next forward: it must not see this write
            cache_layer.cumulative_length.copy_(before)
            residual, mlp_input, routing = outputs
            if routing is not None:
                graphs._pending[index] = (mlp_input, routing)
            executor.start_only = True
            try:
                layer.mlp(mlp_input)
            except StepStarted:
                pass
            finally:
                executor.start_only = False
                graphs._pending.pop(index, None)
        except BaseException:
            cache_layer.cumulative_length.copy_(before)
            executor.settle_ahead()
            raise
        self._started = _Started(inputs, outputs, after)
        self.starts += 1

    @staticmethod
    def _same_inputs(started: _Inputs, hidden, kwargs: dict, cache_name: str, rest: dict) -> bool:
        position_embeddings = kwargs.get("position_embeddings")
        mask = kwargs.get("attention_mask")
        position_ids = kwargs.get("position_ids")
        if (
            position_embeddings is None
            or cache_name != started.cache_name
            or rest.keys() != started.rest.keys()
            or any(repr(rest[k]) != repr(started.rest[k]) for k in rest)
            or (mask is None) != (started.mask is None)
            or (position_ids is None) != (started.position_ids is None)
        ):
            return False
        pairs = [
            (hidden, started.hidden),
            (position_embeddings[0], started.cos),
            (position_embeddings[1], started.sin),
        ]
        if mask is not None:
            pairs.append((mask, started.mask))
        if position_ids is not None:
            pairs.append((position_ids, started.position_ids))
        if any(a.shape != b.shape or a.dtype != b.dtype or a.device != b.device for a, b in pairs):
            return False
        if hidden.device.type == "cpu":
            return all(torch.equal(a, b) for a, b in pairs)
        # one read-back for all comparisons (each torch.equal would wait on the device)
        return bool(torch.stack([(a == b).all() for a, b in pairs]).all())


def greedy_call(kwargs: dict, generation_config: Any) -> bool:
    """Whether a ``generate`` call picks each token as the argmax (no sampling, one beam)."""

    def setting(name: str, default):
        value = kwargs.get(name, getattr(generation_config, name, None))
        return default if value is None else value

    return not setting("do_sample", False) and setting("num_beams", 1) == 1
