"""Small hooks that route a stock transformers model through the executor; removing them restores it.

* MoE experts: an implementation registered in transformers' experts interface (``"hybrid"``), so the
  router, shared experts and attention stay stock and only the experts call the executor.
* Dense MLPs: the module's ``forward`` is replaced by one that runs its row slices through the executor
  (transformers' own forward once peft wraps a projection: :func:`hf_hybrid.held.dense_forward`).
* Streamed modules (attention, shared experts, lm_head): pre/post forward hooks swap the parameters to
  their staging slot and back, and prefetch the next streamed module.
* A CPU-resident embedding: inputs go to the CPU, the looked-up activations come back to the device.
* Decode graphs (:mod:`hf_hybrid.decode_graphs`): each decoder layer's ``forward`` is replaced by one that
  replays its attention half as a CUDA graph in decode steps on the static cache.
* On CUDA, the cuDNN backend of ``scaled_dot_product_attention`` is switched off for the model's forward
  (see :func:`cudnn_attention_off`).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .decode_graphs import DecodeGraphs
from .executor import Executor
from .families import FamilyAdapter
from .held import dense_forward, experts_adapter_forward
from .loading import LoadedModel, StreamedModule
from .weights import carve

EXPERTS_IMPLEMENTATION = "hybrid"


def hybrid_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """The ``"hybrid"`` experts implementation: hand the routed tokens to this layer's executor group.

    Experts whose weights peft parametrizes (LoRA with ``target_parameters``) run transformers' own experts
    forward on the held weights plus the adapter's delta instead (:func:`~hf_hybrid.held.experts_adapter_forward`).
    """
    if "parametrizations" in self._modules:
        return experts_adapter_forward(self, hidden_states, top_k_index, top_k_weights)
    executor, group = self._hf_hybrid
    return executor.run_group(group, hidden_states, top_k_index, top_k_weights)


def register_experts_implementation() -> None:
    """Register :func:`hybrid_experts_forward` with transformers (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

    if EXPERTS_IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ExpertsInterface.register(EXPERTS_IMPLEMENTATION, hybrid_experts_forward)


class _StreamHook:
    """Swap a streamed module's parameters into a staging slot for one forward, then back."""

    def __init__(self, executor: Executor, streamed: StreamedModule, following: StreamedModule | None):
        self.executor = executor
        self.streamed = streamed
        self.following = following

    def pre(self, module, args, kwargs):
        s = self.streamed
        view = self.executor.stage_module(s.unit, s.host_region)
        for (owner, leaf, _), slot_tensor in zip(s.params, carve(view, [p[2] for p in s.params], s.dtype)):
            owner._parameters[leaf].data = slot_tensor
        if self.following is not None and self.following is not s:
            # the copy lane starts on the next streamed module while this one computes
            self.executor.prefetch_module(self.following.unit, self.following.host_region)
        return args, kwargs

    def post(self, module, args, kwargs, output):
        s = self.streamed
        self.executor.release_module(s.unit)
        for (owner, leaf, _), host_tensor in zip(s.params, s.host_views):
            owner._parameters[leaf].data = host_tensor
        return output


@contextmanager
def cudnn_attention_off():
    """Switch off cuDNN SDPA inside the block and restore the caller's setting afterwards, also on errors.

    cuDNN attention builds an execution graph for every new key length, and a decode step has a new key
    length every time: on the H100 machine that was ~40 ms of host time per step (S1, torch 2.11), more
    than half of a decode step. Flash / memory-efficient attention have no per-shape setup and compute
    the same attention. The flag is process-wide in torch, so it is set only while the block runs.
    """
    saved = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(saved)


class _NoCudnnAttention:
    """:func:`cudnn_attention_off` around one forward, as a pre/post hook pair."""

    def __init__(self):
        self.open: list = []

    def pre(self, module, args, kwargs):
        block = cudnn_attention_off()
        block.__enter__()
        self.open.append(block)
        return args, kwargs

    def post(self, module, args, kwargs, output):
        if self.open:
            self.open.pop().__exit__(None, None, None)
        return output


def attach(
    model: torch.nn.Module,
    executor: Executor,
    loaded: LoadedModel,
    adapter: FamilyAdapter,
    decode_graphs: DecodeGraphs | None = None,
) -> list:
    """Install every hook (``adapter`` says where the experts and MLPs are); returns the handles (``detach``
    removes them). With ``decode_graphs``, every decoder layer's forward takes its split decode path."""
    register_experts_implementation()
    handles: list = []
    # stays after detach: a model whose runtime was closed refuses to run instead of touching freed weights
    model.register_forward_pre_hook(lambda *_: executor.check_open())
    layers = adapter.layers(model)
    executor.groups = dict(loaded.groups)
    for i, group in loaded.groups.items():
        if group.routed:
            adapter.experts(layers[i])._hf_hybrid = (executor, group)
            router = adapter.router(layers[i])
            if router is not None:
                # the next-layer routing prediction of a decode step applies this layer's router early
                executor.router_weights[i] = router.weight
        else:
            mlp = adapter.mlp(layers[i])
            mlp.forward = dense_forward(executor, group, mlp, adapter.dense_mlp_projections(layers[i]))
            handles.append(("forward", mlp))
    if any(g.routed for g in loaded.groups.values()):
        model.config._experts_implementation = EXPERTS_IMPLEMENTATION
    order = loaded.streamed
    for n, s in enumerate(order):
        hook = _StreamHook(executor, s, order[(n + 1) % len(order)])
        handles.append(s.module.register_forward_pre_hook(hook.pre, with_kwargs=True))
        handles.append(s.module.register_forward_hook(hook.post, with_kwargs=True))
    if executor.lanes.is_cuda:
        guard = _NoCudnnAttention()
        handles.append(model.register_forward_pre_hook(guard.pre, with_kwargs=True))
        # always_call: the setting is restored even when the forward raises
        handles.append(model.register_forward_hook(guard.post, with_kwargs=True, always_call=True))
    if decode_graphs is not None:
        for i, layer in enumerate(layers):
            layer.forward = decode_graphs.wrap(i, layer, layer.forward)
            handles.append(("forward", layer))
            group = loaded.groups.get(i)
            router = adapter.router(layer) if group is not None and group.routed else None
            if router is not None:  # always on the device (the planner gives routers no other home)
                router.forward = decode_graphs.wrap_router(i, router, router.forward)
                handles.append(("forward", router))
    if loaded.cpu_embedding:
        embed = model.get_input_embeddings()
        device = executor.device
        handles.append(embed.register_forward_pre_hook(lambda m, args: tuple(a.to("cpu") for a in args)))
        handles.append(embed.register_forward_hook(lambda m, args, out: _rows_to_device(out, device)))
    return handles


def _rows_to_device(rows: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU-home embedding's looked-up rows, on the device. On a GPU they cross from pinned memory: a copy
    from ordinary memory runs at a fraction of PCIe's rate and holds the feeding thread until it is done
    (torch's host allocator keeps the pinned block until the copy has run)."""
    if device.type == "cuda":
        rows = rows.pin_memory()
    return rows.to(device, non_blocking=True)


def detach(handles: list) -> None:
    """Remove hooks installed by :func:`attach`."""
    for handle in handles:
        if isinstance(handle, tuple):
            _, module = handle
            module.__dict__.pop("forward", None)
        else:
            handle.remove()
