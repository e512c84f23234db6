"""Decode steps with the attention half of every decoder layer replayed as one CUDA graph.

A decode step of a decoder layer is ~40 small CUDA ops before its MLP/experts (two norms, q/k/v, rotary,
the KV cache write, attention, o_proj, residual adds). Launched one by one from Python they cost the host
~1-2 ms per layer, time in which the CPU and copy lanes sit idle, because the layer's experts cannot start
before its router has run. Here each layer's attention half (input norm, attention with the KV cache write,
residual add, post-attention norm) and, in a MoE layer, its router (gate logits, softmax, top-k) are
captured once as a CUDA graph and replayed per step: one launch. The MoE block then calls its router as
usual and gets the replay's outputs back (:meth:`DecodeGraphs.wrap_router`), so the routing is on the
device before the block's Python starts and the read-back that feeds the lanes waits on nothing else.

That needs tensors at fixed addresses, so ``generate`` runs on a transformers ``StaticCache`` of
``max_context`` positions held by this object (reset per call, the same memory the plan reserved for the KV
cache), and each graph reads its inputs (hidden states, rotary cos/sin, attention mask, positions) from
buffers the step copies into. Only the attention half is captured: the MLP/experts run through the executor
as before (their lanes are decided per step). Every supported family has the same decoder layer layout
(norm, attention, residual, norm, MLP, residual), and the layer's own modules compute both halves, so the
results are those of transformers running with a static cache. Where a step does not qualify (prefill,
another cache, a streamed attention block, keyword arguments that are tensors) the stock forward runs.

On the CPU standing in for the accelerator the same path runs without capture (``capture=False``), so the
split forward and the static cache are tested everywhere.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from .decode_masks import DecodeMasks, plain_causal

logger = logging.getLogger("hf_hybrid")


def cache_argument(model_class) -> str:
    """The name transformers gives the KV cache argument of ``model_class.forward``: ``"cache"`` from 5.24
    on, ``"past_key_values"`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def attention_half(
    layer, hidden, position_embeddings, attention_mask, position_ids, cache, kwargs, router=None
):
    """The decoder layer up to its MLP: returns (residual stream after attention, MLP input, routing).

    ``cache`` is ``(argument name, cache)``: the layer passes the cache on under the name it received.
    ``router``: the MoE router's own forward, applied to the MLP input as the MoE block applies it (one row
    per token); routing is its output, or None without a router."""
    normed = layer.input_layernorm(hidden)
    attended, _ = layer.self_attn(
        hidden_states=normed,
        position_embeddings=position_embeddings,
        attention_mask=attention_mask,
        position_ids=position_ids,
        **{cache[0]: cache[1]},
        **kwargs,
    )
    residual = hidden + attended
    mlp_input = layer.post_attention_layernorm(residual)
    routing = None if router is None else router(mlp_input.reshape(-1, mlp_input.shape[-1]))
    return residual, mlp_input, routing


@dataclass
class _StepInputs:
    """Buffers every layer graph of one shape reads; a step copies its inputs in once (the model passes the
    same position embeddings, mask and positions to every layer)."""

    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    sources: tuple = ()

    def load(self, position_embeddings, attention_mask, position_ids) -> None:
        sources = (position_embeddings[0], position_embeddings[1], attention_mask, position_ids)
        # the same objects as the last step's layer: already copied (held here, so never a reused id)
        if len(self.sources) == 4 and all(a is b for a, b in zip(sources, self.sources)):
            return
        self.cos.copy_(sources[0])
        self.sin.copy_(sources[1])
        if self.mask is not None:
            self.mask.copy_(attention_mask)
        if self.position_ids is not None:
            self.position_ids.copy_(position_ids)
        self.sources = sources


@dataclass
class _LayerGraph:
    graph: Any
    hidden: torch.Tensor
    inputs: _StepInputs
    outputs: tuple  # (residual, MLP input, routing or None)


@dataclass
class DecodeGraphs:
    """The static KV cache and the per-layer attention graphs of decode steps (see the module docstring).

    ``layers``: the model's decoder layers; ``graphable``: indices of the layers whose attention half may be
    captured (its weights stay on the device); ``capture``: record CUDA graphs (else run the same path
    eagerly, for the CPU standing in); ``lanes``: the executor's :class:`~hf_hybrid.lanes.DeviceLanes`;
    ``fuse_routers``: compute MoE routers with the attention half (see :meth:`wrap_router`).
    """

    config: Any
    layers: list
    graphable: set[int]
    max_context: int
    lanes: Any
    capture: bool
    cache: Any = None
    batch: int = 0
    graphs: dict = field(default_factory=dict)
    step_inputs: dict = field(default_factory=dict)
    failed: set = field(default_factory=set)
    steps: int = 0  # layer steps that took the split path (captured or not)
    replays: int = 0  # ... of which replayed a graph
    pool: Any = None
    fuse_routers: bool = True
    routers: dict = field(default_factory=dict)  # layer index -> the router's own forward
    router_hits: int = 0  # router calls answered from the attention half's outputs
    _pending: dict = field(default_factory=dict)  # layer index -> (MLP input, routing) of the running step
    _fingerprint: tuple = ()  # the captured modules' state when the graphs were recorded
    masks: DecodeMasks = None  # each decode step's attention mask on the cache, by update
    lookahead: Any = None  # a DecodeLookahead: the next greedy step's first layer, started early

    def __post_init__(self) -> None:
        if self.masks is None:
            self.masks = DecodeMasks(enabled=plain_causal(self.config))

    def cache_for(self, batch: int):
        """An empty ``StaticCache`` of ``max_context`` positions for ``batch`` sequences, reused across calls
        (its memory is the KV cache the plan reserved; the graphs hold its addresses)."""
        from transformers import StaticCache

        self.masks.reset()
        if self.cache is not None and self.batch == batch:
            try:
                self.cache.reset()
                return self.cache
            except RuntimeError:
                # its tensors were made under torch.inference_mode and this call runs outside it: they
                # cannot be written here, so a fresh cache (and fresh graphs) replace them
                pass
        self.release()
        self.cache = StaticCache(config=self.config, max_cache_len=self.max_context)
        self.batch = batch
        return self.cache

    def follow_module_changes(self) -> None:
        """Drop the graphs when a module they replay has changed since they were recorded: a module
        replaced or wrapped (peft's LoRA layers), a parameter replaced by another tensor, an adapter
        switched on or off. A graph replays the kernels and addresses it recorded, not the Python that
        chose them. Called once per ``generate`` call (a few hundred attribute reads)."""
        fingerprint = self._module_state()
        if fingerprint != self._fingerprint:
            if self._fingerprint:
                self.release()
            self._fingerprint = fingerprint

    def _module_state(self) -> tuple:
        state = []
        for i in sorted(self.graphable):
            layer = self.layers[i]
            parts = [layer.input_layernorm, layer.self_attn, layer.post_attention_layernorm]
            router = self.routers.get(i)
            if router is not None:
                parts.append(getattr(router, "__self__", None) or layer.mlp)
            for part in parts:
                for module in part.modules():
                    state.append(
                        (
                            id(module),
                            type(module),
                            tuple(id(p) for p in module._parameters.values()),
                            # peft's LoRA layers: adapters switched off, merged, or another adapter active
                            getattr(module, "_disable_adapters", None),
                            getattr(module, "merged_adapters", None) and tuple(module.merged_adapters),
                            repr(getattr(module, "active_adapter", None)),
                        )
                    )
        return tuple(state)

    def release(self) -> None:
        """Drop the cache and every graph (a new batch size, or the model closing)."""
        if self.lookahead is not None:
            self.lookahead.drop(quiet=True)
        self.graphs.clear()
        self.step_inputs.clear()
        self.failed.clear()
        self._pending.clear()
        self.cache = None
        self.batch = 0
        # the memory pool goes with its last graph: capturing into its handle again trips an allocator
        # assertion (use_count > 0), so the next capture opens a new pool
        self.pool = None

    def wrap(self, index: int, layer, original):
        """The decoder layer's forward: decode steps on this object's cache take the split path."""

        def forward(hidden_states, *args, **kwargs):
            name = "cache" if "cache" in kwargs else "past_key_values"
            cache = kwargs.get(name)
            if (
                args
                or cache is None
                or cache is not self.cache
                or hidden_states.dim() != 3
                or hidden_states.shape[1] != 1
                or index not in self.graphable
                or any(isinstance(v, torch.Tensor) for k, v in kwargs.items() if k not in _STEP_ARGS)
            ):
                if self.lookahead is not None and index == self.lookahead.layer:
                    self.lookahead.drop()  # this forward is not the decode step it started
                return original(hidden_states, *args, **kwargs)
            self.steps += 1
            lookahead = (
                self.lookahead if self.lookahead is not None and index == self.lookahead.layer else None
            )
            claimed = None
            if lookahead is not None:
                rest = {k: v for k, v in kwargs.items() if k not in _STEP_ARGS}
                claimed = lookahead.claim(hidden_states, kwargs, name, rest)
                lookahead.remember(hidden_states, kwargs, name, rest)
            if claimed is not None:
                residual, mlp_input, routing = claimed
            else:
                with self.lanes.host_span("host", f"L{index} attention graph"):
                    residual, mlp_input, routing = self._attention(index, layer, hidden_states, name, kwargs)
            if routing is None:
                return residual + layer.mlp(mlp_input)
            self._pending[index] = (mlp_input, routing)
            try:
                return residual + layer.mlp(mlp_input)
            finally:
                self._pending.pop(index, None)

        return forward

    def wrap_router(self, index: int, router, original):
        """The MoE router's forward: in a split decode step, the MoE block's call on the MLP input gets the
        routing the attention half already computed (the same ops on the same tensor); any other call
        computes it. The router module is still called, so its hooks (e.g. router-logit recording) run."""
        self.routers[index] = original

        def forward(hidden_states, *args, **kwargs):
            pending = self._pending.pop(index, None)
            if pending is not None and not args and not kwargs and not router.training:
                source, routing = pending
                if (
                    hidden_states.data_ptr() == source.data_ptr()
                    and hidden_states.numel() == source.numel()
                    and hidden_states.shape[-1] == source.shape[-1]
                ):
                    self.router_hits += 1
                    return routing
            return original(hidden_states, *args, **kwargs)

        return forward

    def _attention(self, index: int, layer, hidden, cache_name: str, kwargs):
        position_embeddings = kwargs.get("position_embeddings")
        mask = kwargs.get("attention_mask")
        position_ids = kwargs.get("position_ids")
        rest = {k: v for k, v in kwargs.items() if k not in _STEP_ARGS}
        cache = (cache_name, self.cache)
        router = self.routers.get(index) if self.fuse_routers and not layer.training else None

        def eager():
            return attention_half(layer, hidden, position_embeddings, mask, position_ids, cache, rest, router)

        # a sliding-window cache layer decides in Python where to write: only the plain static layer captures
        if (
            not self.capture
            or position_embeddings is None
            or type(self.cache.layers[index]) is not _static_layer()
        ):
            return eager()
        key = (
            index,
            tuple(hidden.shape),
            None if mask is None else (tuple(mask.shape), mask.dtype),
            None if position_ids is None else tuple(position_ids.shape),
            tuple(sorted((k, repr(v)) for k, v in rest.items())),
            cache_name,
            router is not None,
        )
        entry = self.graphs.get(key)
        if entry is None and key not in self.failed:
            entry = self._record(
                key, index, layer, hidden, position_embeddings, mask, position_ids, cache, rest, router
            )
        if entry is None:
            return eager()
        entry.inputs.load(position_embeddings, mask, position_ids)
        entry.hidden.copy_(hidden)
        entry.graph.replay()
        self.replays += 1
        return entry.outputs

    def _record(
        self, key, index, layer, hidden, position_embeddings, mask, position_ids, cache, rest, router
    ):
        shape_key = key[1:-1]
        inputs = self.step_inputs.get(shape_key)
        if inputs is None:
            inputs = _StepInputs(
                cos=position_embeddings[0].clone(),
                sin=position_embeddings[1].clone(),
                mask=None if mask is None else mask.clone(),
                position_ids=None if position_ids is None else position_ids.clone(),
            )
            self.step_inputs[shape_key] = inputs
        inputs.load(position_embeddings, mask, position_ids)
        static_hidden = hidden.clone()
        cache_layer = self.cache.layers[index]
        position = cache_layer.cumulative_length.clone()

        def step():
            return attention_half(
                layer,
                static_hidden,
                (inputs.cos, inputs.sin),
                inputs.mask,
                inputs.position_ids,
                cache,
                rest,
                router,
            )

        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        try:
            # the warm-up run writes this step's keys/values and advances the layer's position: rewind it
            # before the capture, and the replay below then computes the step for real
            graph, outputs = self.lanes.capture_graph(
                step, self.pool, before_capture=lambda: cache_layer.cumulative_length.copy_(position)
            )
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back to the eager path
            cache_layer.cumulative_length.copy_(position)
            self.failed.add(key)
            logger.warning(
                "hf_hybrid: layer %d's attention could not be captured as a CUDA graph (%s: %s); "
                "it runs eagerly",
                index,
                type(exc).__name__,
                exc,
            )
            return None
        entry = _LayerGraph(graph, static_hidden, inputs, outputs)
        self.graphs[key] = entry
        return entry


def _static_layer():
    from transformers.cache_utils import StaticLayer

    return StaticLayer


def graphable_layers(layers, streamed_modules) -> set[int]:
    """Indices of the decoder layers whose attention half has the standard layout (input norm, attention,
    post-attention norm) and stays on the device (a streamed attention block swaps its weights per call,
    which a graph cannot follow)."""
    streamed = {id(m) for m in streamed_modules}
    found = set()
    for i, layer in enumerate(layers):
        parts = [
            getattr(layer, name, None)
            for name in ("input_layernorm", "self_attn", "post_attention_layernorm")
        ]
        if any(p is None for p in parts) or getattr(layer, "mlp", None) is None:
            continue
        if any(id(m) in streamed for p in parts for m in p.modules()):
            continue
        found.add(i)
    return found


#: The keyword arguments a model passes to every decoder layer that the graph reads from its buffers.
_STEP_ARGS = ("position_embeddings", "attention_mask", "position_ids", "cache", "past_key_values")
