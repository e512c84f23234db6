"""From a checkpoint to a model whose weights sit in their homes, one tensor at a time.

The model skeleton is built on the meta device (no memory); each tensor is then read from its
safetensors shard (memory-mapped) straight into its home: the device for resident units, a pinned host
arena for everything the executor may stream or compute on the CPU. The host never holds two copies of
the model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers.utils import logging

from .checkpoint import CheckpointReader, checkpoint_files
from .errors import CheckpointError, HostMemoryError
from .families import FamilyAdapter
from .held import hold_in_tree
from .planner import HybridPlan
from .system import meminfo
from .units import CPU, GPU, STREAM, Unit, format_bytes
from .weights import ExpertGroup, HostArena, can_pin, carve, layout_bytes

logger = logging.get_logger(__name__)


@dataclass
class StreamedModule:
    """A module whose parameters live in one pinned host region and visit a device slot when it runs."""

    unit: str
    module: torch.nn.Module
    params: list[tuple[torch.nn.Module, str, tuple[int, ...]]]
    host_region: torch.Tensor
    host_views: list[torch.Tensor]
    dtype: torch.dtype


@dataclass
class LoadedModel:
    """What loading produced besides the model: the executor's groups and streamed modules."""

    groups: dict[int, ExpertGroup] = field(default_factory=dict)
    streamed: list[StreamedModule] = field(default_factory=list)
    cpu_embedding: bool = False
    host_bytes: int = 0


def host_memory_available() -> int | None:
    """MemAvailable from /proc/meminfo in bytes, or None where unknown."""
    return meminfo("MemAvailable")


def check_host_memory(plan: HybridPlan, device: torch.device | None = None) -> int:
    """Raise :class:`HostMemoryError` when what the plan keeps in host memory does not fit in available RAM.

    On a CUDA device that is the weights of every unit not resident on it; with ``device="cpu"`` (the CPU
    standing in for the accelerator) every weight and the KV cache live in host memory. Returns the bytes
    of weights kept on the host.
    """
    host_weights = sum(u.nbytes for u in plan.units if plan.homes[u.name] != GPU)
    if device is not None and device.type == "cpu":
        weights = sum(u.nbytes for u in plan.units)
        need = weights + plan.kv_cache_bytes
        what = (
            f"{format_bytes(need)} (weights {format_bytes(weights)}, KV cache "
            f"{format_bytes(plan.kv_cache_bytes)}; with device='cpu' the whole model lives in host memory)"
        )
        todo = (
            "Free host memory, lower max_context / max_batch_size, load in a smaller dtype, or use a machine "
            "with more RAM."
        )
    else:
        need = host_weights
        what = f"{format_bytes(need)} of weights"
        todo = "Raise gpu_memory, free host memory, or use a machine with more RAM."
    have = host_memory_available()
    if have is not None and need > have:
        raise HostMemoryError(
            f"this plan keeps {what} in host memory but only {format_bytes(have)} is available. {todo}"
        )
    return host_weights


def layer_indices(keys: Iterable[str], adapter: FamilyAdapter) -> set[int]:
    """The decoder layers that ``keys`` (checkpoint tensor names) hold tensors of."""
    marker = "4294967295"
    head, _, tail = adapter.layer_key(int(marker)).partition(marker)
    pattern = re.compile(re.escape(head) + r"(\d+)" + re.escape(tail) + r"\.")
    return {int(m.group(1)) for key in keys if (m := pattern.match(adapter.to_model_key(key)))}


def format_layers(layers: list[int]) -> str:
    """Sorted layer indices as ranges: ``2-5, 9``."""
    spans: list[list[int]] = []
    for i in layers:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    text = [f"{a}-{b}" if b > a else str(a) for a, b in spans[:5]]
    return ", ".join(text) + (", ..." if len(spans) > 5 else "")


def check_layers(directory: Path, config, adapter: FamilyAdapter, *, allow_pickle: bool) -> None:
    """Raise :class:`CheckpointError` when ``config`` has decoder layers the checkpoint has no tensors for.

    Needs only tensor names (the index, or a safetensors file's header), so it runs before anything is
    planned; a single ``pytorch_model.bin`` is left to loading, which finds the missing tensors too. A
    checkpoint with more layers than the config is not refused here: loading reports the extra tensors.
    """
    expected = getattr(config, "num_hidden_layers", None)
    keys = checkpoint_files(directory, allow_pickle=allow_pickle).keys()
    if not isinstance(expected, int) or expected <= 0 or keys is None:
        return
    present = layer_indices(keys, adapter)
    missing = sorted(set(range(expected)) - present)
    if missing:
        raise CheckpointError(
            f"config.json sets num_hidden_layers={expected} but the checkpoint in {directory} has no tensors "
            f"for layer(s) {format_layers(missing)} (it holds {len(present)} layer(s)): the weights are not "
            f"those of this config, or the download is incomplete. Check that config.json and the weights come "
            f"from the same checkpoint."
        )


def unexpected_keys(model: torch.nn.Module, adapter: FamilyAdapter, keys: Iterable[str]) -> list[str]:
    """The checkpoint tensors (of ``keys``) no unit of ``model`` uses, sorted, as transformers counts them.

    A tensor is used when its module-tree name (:meth:`FamilyAdapter.to_model_key`) is a parameter or buffer
    of ``model`` (tied ones under each name) or one of the expert / dense MLP weights of one of its layers;
    the model class's ``_keys_to_ignore_on_load_unexpected`` are never reported.
    """
    used = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    used.update(name for name, _ in model.named_buffers(remove_duplicate=False))
    moe_layers = adapter.moe_layers(model)
    for i, layer in enumerate(adapter.layers(model)):
        if i not in moe_layers:
            used.update(adapter.dense_mlp_weight_keys(i))
            continue
        used.update(adapter.fused_expert_weight_keys(i))
        for expert in range(adapter.expert_shapes(layer)[0]):
            used.update(adapter.expert_weight_keys(i, expert))
    ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()]
    return sorted(
        key
        for key in keys
        if adapter.to_model_key(key) not in used and not any(p.search(key) for p in ignored)
    )


def warn_unexpected_keys(model: torch.nn.Module, adapter: FamilyAdapter, reader: CheckpointReader) -> None:
    """Log a warning naming (a few of) the checkpoint's :func:`unexpected_keys`, and the layers beyond the
    config's when the checkpoint has more; transformers reports them the same way and loads the rest."""
    extra = unexpected_keys(model, adapter, reader.keys())
    if not extra:
        return
    count = len(adapter.layers(model))
    beyond = sorted(i for i in layer_indices(extra, adapter) if i >= count)
    layers = (
        f" The checkpoint has layer(s) {format_layers(beyond)} beyond the num_hidden_layers={count} of the "
        f"config: they are not loaded."
        if beyond
        else ""
    )
    logger.warning(
        "hf_hybrid: %d tensor(s) of the checkpoint in %s are UNEXPECTED: %s has no weights by those names, so "
        "they are not loaded (%s%s).%s This can be ignored when loading a checkpoint of another task or "
        "architecture; it is not ok if you expect the identical architecture.",
        len(extra),
        reader.directory,
        type(model).__name__,
        ", ".join(extra[:5]),
        ", ..." if len(extra) > 5 else "",
        layers,
    )


def _param_owner(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    module_path, _, leaf = name.rpartition(".")
    return model.get_submodule(module_path), leaf


def load_weights(
    model: torch.nn.Module,
    reader: CheckpointReader,
    adapter: FamilyAdapter,
    plan: HybridPlan,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool = True,
) -> LoadedModel:
    """Materialise every tensor of ``model`` (built on meta) from ``reader`` into its planned home."""
    from transformers.utils.logging import tqdm

    pin = can_pin() and device.type == "cuda"
    result = LoadedModel()
    result.host_bytes = check_host_memory(plan, device)
    layers = adapter.layers(model)
    moe_layers = adapter.moe_layers(model)
    model_to_ckpt = {adapter.to_model_key(k): k for k in reader.keys()}
    warn_unexpected_keys(model, adapter, reader)

    # group module-tree params by unit
    by_unit: dict[str, list[tuple[str, torch.nn.Parameter]]] = {}
    for name, param in model.named_parameters():
        unit = adapter.unit_of_param(name, moe_layers)
        if unit is not None:
            by_unit.setdefault(unit, []).append((name, param))

    expert_units = [u for u in plan.units if u.is_expert_like]
    total = len(by_unit) + len(expert_units)
    bar = tqdm(total=total, desc="Loading weights", unit="unit", disable=not progress)
    try:
        for unit_name, params in by_unit.items():
            home = plan.homes.get(unit_name, GPU)
            tensors = []
            for name, param in params:
                key = model_to_ckpt.get(name)
                if key is None:
                    raise CheckpointError(
                        f"the checkpoint has no tensor for {name} (looked for it under {adapter.name} names); "
                        f"is this the right checkpoint for {type(model).__name__}?"
                    )
                _expect_shape(reader, key, tuple(param.shape))
                tensors.append((name, reader.get(key)))
            if home == STREAM:
                result.streamed.append(_stream_module(model, adapter, unit_name, tensors, dtype, pin))
            else:
                target = device if home == GPU else torch.device("cpu")
                for name, value in tensors:
                    owner, leaf = _param_owner(model, name)
                    owner._parameters[leaf] = torch.nn.Parameter(value.to(target, dtype), requires_grad=False)
                if unit_name == "embed_tokens" and home == CPU:
                    result.cpu_embedding = True
            bar.update(1)

        names = CheckpointNames(reader, adapter, model_to_ckpt)
        for i, layer in enumerate(layers):
            layer_units = [u for u in expert_units if u.layer == i]
            if not layer_units:
                continue
            group = _load_group(i, layer, layer_units, plan, names, i in moe_layers, device, dtype, pin, bar)
            result.groups[i] = group
    finally:
        bar.close()

    if model.config.tie_word_embeddings and model.get_output_embeddings() is not None:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.device != device:
                module._buffers[name] = buf.to(device)
    for name, param in model.named_parameters():
        if param.device.type == "meta":
            raise CheckpointError(f"{name} was not loaded from the checkpoint")
    return result


def _stream_module(model, adapter, unit_name, tensors, dtype, pin) -> StreamedModule:
    shapes = [tuple(v.shape) for _, v in tensors]
    arena = HostArena(layout_bytes(shapes, dtype), pin)
    region = arena.take(layout_bytes(shapes, dtype))
    views = carve(region, shapes, dtype)
    params = []
    for (name, value), view in zip(tensors, views):
        view.copy_(value)
        owner, leaf = _param_owner(model, name)
        owner._parameters[leaf] = torch.nn.Parameter(view, requires_grad=False)
        params.append((owner, leaf, tuple(value.shape)))
    return StreamedModule(unit_name, owner_root(model, adapter, unit_name), params, region, views, dtype)


def owner_root(model: torch.nn.Module, adapter: FamilyAdapter, unit_name: str) -> torch.nn.Module:
    """The module whose forward a streamed unit's hook wraps."""
    if unit_name == "lm_head":
        return model.get_output_embeddings()
    m = re.match(r"layers\.(\d+)\.(attention|shared_expert)$", unit_name)
    if not m:
        raise ValueError(f"unit {unit_name} cannot be streamed")
    layer = adapter.layers(model)[int(m.group(1))]
    return adapter.attention(layer) if m.group(2) == "attention" else adapter.shared_expert(layer)


@dataclass
class CheckpointNames:
    """The checkpoint tensors of a layer's experts or dense MLP, found by the names the family adapter
    gives them (``model_to_ckpt`` maps :meth:`FamilyAdapter.to_model_key` of every checkpoint name back)."""

    reader: CheckpointReader
    adapter: FamilyAdapter
    model_to_ckpt: dict[str, str]

    def _find(self, keys) -> tuple[str, ...] | None:
        found = tuple(self.model_to_ckpt.get(k) for k in keys)
        return found if all(found) else None

    def expert(self, layer: int, expert: int) -> tuple[str, ...] | None:
        """Checkpoint names of one expert's (gate, up, down), or None when experts are not stored one by one."""
        return self._find(self.adapter.expert_weight_keys(layer, expert))

    def fused_experts(self, layer: int) -> tuple[str, ...] | None:
        """Checkpoint names of a layer's fused (gate_up, down) expert tensors, or None."""
        return self._find(self.adapter.fused_expert_weight_keys(layer))

    def dense_mlp(self, layer: int) -> tuple[str, ...]:
        """Checkpoint names of a dense MLP's (gate, up, down); :class:`CheckpointError` when one is missing."""
        wanted = self.adapter.dense_mlp_weight_keys(layer)
        for key in wanted:
            if key not in self.model_to_ckpt:
                raise CheckpointError(f"the checkpoint has no {key}")
        return tuple(self.model_to_ckpt[k] for k in wanted)


def _expect_shape(reader, key: str, expected: tuple[int, ...]) -> None:
    """Raise :class:`CheckpointError` naming ``key``, its shard and both shapes when they differ."""
    actual = tuple(reader.shape(key))
    if actual != tuple(expected):
        raise CheckpointError(
            f"tensor {key} in {reader.key_to_file[key].name} has shape {actual} but config.json expects "
            f"{tuple(expected)}: the shards do not match the config. Check that config.json and the weights "
            f"come from the same checkpoint."
        )


def _check_group_shapes(names: CheckpointNames, layer: int, units: list[Unit], routed: bool) -> None:
    """Check the full checkpoint tensors an expert group reads from, before any slice of them is taken
    (a row slice of a too-large dense MLP tensor would otherwise load silently)."""
    reader = names.reader
    for u in units:
        two_r, hidden = u.tensors[0].shape
        if not routed:
            inter = max(v.rows[1] for v in units)
            for key, expected in zip(
                names.dense_mlp(layer), ((inter, hidden), (inter, hidden), (hidden, inter))
            ):
                _expect_shape(reader, key, expected)
            return
        r = two_r // 2
        keys = names.expert(layer, u.index)
        if keys is not None:
            for key, expected in zip(keys, ((r, hidden), (r, hidden), (hidden, r))):
                _expect_shape(reader, key, expected)
            continue
        fused = names.fused_experts(layer)
        if fused is not None:
            experts = max(v.index for v in units) + 1
            _expect_shape(reader, fused[0], (experts, two_r, hidden))
            _expect_shape(reader, fused[1], (experts, hidden, r))
            return


def _read_unit(
    names: CheckpointNames, layer, unit: Unit, routed: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate [r, H], up [r, H], down [H, r]) of an expert or MLP slice."""
    reader = names.reader
    if routed:
        keys = names.expert(layer, unit.index)
        if keys is not None:
            return tuple(reader.get(k) for k in keys)
        fused = names.fused_experts(layer)
        if fused is not None:
            gate_up = reader.get(fused[0])[unit.index]
            inter = gate_up.shape[0] // 2
            return gate_up[:inter], gate_up[inter:], reader.get(fused[1])[unit.index]
        raise CheckpointError(f"the checkpoint has no weights for expert {unit.index} of layer {layer}")
    lo, hi = unit.rows
    gate, up, down = names.dense_mlp(layer)
    return (
        reader.get(gate, rows=(lo, hi)),
        reader.get(up, rows=(lo, hi)),
        reader.get(down, cols=(lo, hi)),
    )


def _load_group(i, layer, units, plan, names, routed, device, dtype, pin, bar) -> ExpertGroup:
    act_fn = names.adapter.mlp_activation(layer)
    homes = [plan.homes[u.name] for u in units]
    group = ExpertGroup(layer=i, units=units, homes=homes, act_fn=act_fn, dtype=dtype, routed=routed)
    shapes = {u.index: (u.tensors[0].shape, u.tensors[1].shape) for u in units}
    group.shapes = shapes
    host_bytes = sum(layout_bytes(list(shapes[u.index]), dtype) for u, h in zip(units, homes) if h != GPU)
    _check_group_shapes(names, i, units, routed)
    arena = HostArena(host_bytes, pin) if host_bytes else None
    for u, home in zip(units, homes):
        gate, up, down = _read_unit(names, i, u, routed)
        gate_up_shape, down_shape = shapes[u.index]
        if tuple(gate.shape) + tuple(up.shape) != (gate_up_shape[0] // 2, gate_up_shape[1]) * 2 or tuple(
            down.shape
        ) != tuple(down_shape):
            raise CheckpointError(
                f"{u.name}: checkpoint shapes gate {tuple(gate.shape)}, up {tuple(up.shape)}, down "
                f"{tuple(down.shape)} do not match the config ({gate_up_shape}, {down_shape})"
            )
        if home == GPU:
            gate_up = torch.empty(gate_up_shape, dtype=dtype, device=device)
            half = gate_up_shape[0] // 2
            gate_up[:half].copy_(gate)
            gate_up[half:].copy_(up)
            group.device_weights[u.index] = (gate_up, down.to(device, dtype).contiguous())
        else:
            region = arena.take(layout_bytes([gate_up_shape, down_shape], dtype))
            gate_up, down_host = carve(region, [gate_up_shape, down_shape], dtype)
            half = gate_up_shape[0] // 2
            gate_up[:half].copy_(gate)
            gate_up[half:].copy_(up)
            down_host.copy_(down)
            group.host_regions[u.index] = region
            group.host_weights[u.index] = (gate_up, down_host)
        bar.update(1)
    # the executor's group owns these weights now; the module tree keeps placeholders of their shapes
    hold_in_tree(layer, names.adapter, group, device)
    return group
