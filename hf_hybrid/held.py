"""The expert and dense-MLP weights the executor holds, kept visible in transformers' module tree.

The executor keeps a layer's gated-MLP weights in its own homes (the device, host arenas, staging slots),
cut into row slices or experts (:class:`~hf_hybrid.weights.ExpertGroup`). The module tree keeps its shape
anyway, so tools that walk it see the model transformers would build:

* a dense MLP keeps ``gate_proj`` / ``up_proj`` / ``down_proj`` as :class:`HeldLinear` modules (an
  ``nn.Linear`` subclass with the right ``in_features`` / ``out_features``), so peft's LoRA can wrap them;
* a fused experts module keeps its 3-D ``gate_up_proj`` / ``down_proj`` parameters;
* every such weight is a :class:`HeldWeight`: a parameter of the right shape, dtype and device that stores
  one element, so ``num_parameters()``, ``model.dtype`` and peft's device placement see the real model
  without a second copy of the weights. Reading its values (``weight @ x``, ``weight.clone()``) assembles
  them from the executor's homes; writing to it raises :class:`HeldWeightError`.

The default forward does not touch any of this: a dense MLP whose projections are still the
:class:`HeldLinear` modules runs through :meth:`~hf_hybrid.executor.Executor.run_group` as before, and so do
experts without a parametrization. Once peft wraps a projection (or parametrizes the experts' weights with
``target_parameters``), that block runs transformers' own forward instead, each projection computing from
the weights where they live (:func:`dense_forward`, :func:`experts_adapter_forward`), so adapters add their
deltas exactly where they would on plain transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves, tree_map_only

from .weights import ExpertGroup

if TYPE_CHECKING:
    from .executor import Executor
    from .families import FamilyAdapter

_T = torch.Tensor

#: reads of a held weight that need only its metadata (shape, dtype, device, storage address, grad flags)
_METADATA = {
    _T.shape.__get__,
    _T.dtype.__get__,
    _T.device.__get__,
    _T.layout.__get__,
    _T.ndim.__get__,
    _T.is_cuda.__get__,
    _T.is_meta.__get__,
    _T.is_leaf.__get__,
    _T.grad.__get__,
    _T.grad_fn.__get__,
    _T.requires_grad.__get__,
    _T.requires_grad.__set__,
    _T.size,
    _T.dim,
    _T.numel,
    _T.nelement,
    _T.element_size,
    _T.is_floating_point,
    _T.is_complex,
    _T.data_ptr,
    _T.stride,
    _T.storage_offset,
    _T.get_device,
}
#: operations whose result is the same held weight again (an alias): parameters are made with these
_ALIASES = {_T.detach, _T.requires_grad_, _T.data.__get__}


class HeldWeightError(RuntimeError):
    """A write to a weight the executor holds (a LoRA merge, ``weight.data = ...``, ``copy_``)."""


class HeldWeight(torch.Tensor):
    """A weight held by the executor, as a tensor of its shape, dtype and device that stores one element.

    ``assemble()`` returns the weight's values as an ordinary tensor on ``device``; ``part(i)`` (optional)
    returns ``weight[i]`` alone, which fused experts' forward reads one expert at a time. Metadata reads are
    free; any other operation runs on the assembled values (a temporary copy); in-place writes raise
    :class:`HeldWeightError`, since the values live in the executor's homes (split into slices or experts,
    some on the host) and are not this tensor's storage. The stored element is NaN, so a path that reads the
    storage without going through torch's function dispatch shows it at once.
    """

    _assemble: Callable[[], torch.Tensor]
    _part: Callable[[int], torch.Tensor] | None
    _label: str

    @staticmethod
    def __new__(
        cls,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
        assemble: Callable[[], torch.Tensor],
        part: Callable[[int], torch.Tensor] | None = None,
        label: str = "weight",
    ) -> HeldWeight:
        storage = torch.full((), float("nan"), dtype=dtype, device=device).expand(shape)
        tensor = torch.Tensor._make_subclass(cls, storage, False)
        tensor._assemble, tensor._part, tensor._label = assemble, part, label
        return tensor

    def _alias_of(self, other: torch.Tensor) -> HeldWeight:
        out = other if type(other) is HeldWeight else other.as_subclass(HeldWeight)
        out._assemble, out._part, out._label = self._assemble, self._part, self._label
        return out

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        held = next(a for a in tree_leaves((args, kwargs)) if isinstance(a, HeldWeight))
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if func in _ALIASES:
            with torch._C.DisableTorchFunctionSubclass():
                return held._alias_of(func(*args, **kwargs))
        if func is _T.set_ and len(args) == 2 and args[1] is args[0]:
            return args[0]  # torch's parametrize "re-sets" a parameter to itself when registering
        name = getattr(func, "__name__", "")
        if name in ("__setitem__", "__set__") or (name.endswith("_") and not name.endswith("__")):
            raise HeldWeightError(
                f"{held._label} is held by hf_hybrid's executor (split into slices or experts across the "
                f"device, host memory and staging slots), so it cannot be written to ({name}): neither by "
                "load_state_dict nor by a LoRA merge (merge_adapter / merge_and_unload). Keep a LoRA adapter "
                "unmerged (it computes the same outputs; load adapters with peft's set_peft_model_state_dict / "
                "PeftModel.from_pretrained), or merge with peft on plain transformers, save, and load that "
                "checkpoint."
            )
        if func is _T.__getitem__ and held._part is not None and args[0] is held and _is_index(args[1]):
            return held._part(int(args[1]))  # one expert of a fused stack: assemble only that one
        args, kwargs = tree_map_only(HeldWeight, lambda w: w._assemble(), (args, kwargs))
        return func(*args, **kwargs)

    def __repr__(self, *, tensor_contents=None) -> str:
        return (
            f"HeldWeight({self._label}, shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"
        )


def _is_index(key) -> bool:
    """Whether ``key`` picks one item of the first dimension (an int or a 0-d integer tensor)."""
    if isinstance(key, torch.Tensor):
        return key.dim() == 0 and not key.is_floating_point() and key.dtype != torch.bool
    return isinstance(key, int) and not isinstance(key, bool)


def unit_weights(group: ExpertGroup, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (gate_up [2r, H], down [H, r]) of unit ``i`` of ``group``, wherever they live now (homes change
    with ``calibrate``; a dense MLP whose slices are all resident is held merged)."""
    if group.merged is not None:
        gate_up, down = group.merged
        lo, hi = group.units[i].rows
        inter = gate_up.shape[0] // 2
        return torch.cat([gate_up[lo:hi], gate_up[inter + lo : inter + hi]]), down[:, lo:hi]
    if i in group.device_weights:
        return group.device_weights[i]
    return group.host_weights[i]


ROLES = ("gate", "up", "down")


def _dense_rows(gate_up: torch.Tensor, role: str) -> torch.Tensor:
    """The gate or up half of a slice's fused [2r, H] gate_up."""
    half = gate_up.shape[0] // 2
    return gate_up[:half] if role == "gate" else gate_up[half:]


def assemble_dense(group: ExpertGroup, role: str, device: torch.device) -> torch.Tensor:
    """The whole dense MLP weight of ``role`` (gate / up [I, H], down [H, I]) on ``device``, a new tensor."""
    if group.merged is not None:
        gate_up, down = group.merged
        return (down if role == "down" else _dense_rows(gate_up, role)).to(device, copy=True)
    parts = [unit_weights(group, i) for i in range(len(group.units))]
    if role == "down":
        return torch.cat([down.to(device) for _, down in parts], dim=1)
    return torch.cat([_dense_rows(gate_up, role).to(device) for gate_up, _ in parts])


def assemble_experts(group: ExpertGroup, fused: str, device: torch.device, expert: int | None = None):
    """A fused experts parameter (``gate_up_proj`` [E, 2I, H] or ``down_proj`` [E, H, I]) on ``device``, a
    new tensor; with ``expert``, only that expert's [2I, H] or [H, I]."""
    which = 0 if fused == "gate_up_proj" else 1
    if expert is not None:
        return unit_weights(group, expert)[which].to(device, copy=True)
    return torch.stack([unit_weights(group, i)[which].to(device) for i in range(len(group.units))])


class HeldLinear(torch.nn.Linear):
    """A dense MLP projection (``gate_proj``, ``up_proj`` or ``down_proj``) whose weight the executor holds.

    It is an ``nn.Linear`` of the projection's shape, so peft wraps it like the projection of plain
    transformers; its ``weight`` is a :class:`HeldWeight`. Its forward (which runs only when the MLP takes
    transformers' forward, i.e. once peft wraps one of its projections) gathers the projection's slices
    from their homes into one temporary weight on ``x``'s device and computes ``F.linear(x, weight)``: the
    matmul transformers computes, with the same bits. The temporary is the size of one projection (an MLP
    whose slices are all resident needs none); a per-slice sum would need less memory but round
    differently.
    """

    group: ExpertGroup
    role: str

    @classmethod
    def hold(cls, linear: torch.nn.Linear, group: ExpertGroup, role: str, device: torch.device) -> HeldLinear:
        """Turn the skeleton's ``linear`` (on meta) into the held projection ``role`` of ``group``."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {role!r}")
        if linear.bias is not None:
            raise ValueError(f"the {role} projection of layer {group.layer} has a bias: dense MLPs have none")
        linear.__class__ = cls
        linear.group, linear.role = group, role
        weight = HeldWeight(
            (linear.out_features, linear.in_features),
            group.dtype,
            device,
            lambda: assemble_dense(group, role, device),
            label=f"the {role} projection of layer {group.layer}'s MLP",
        )
        linear._parameters["weight"] = torch.nn.Parameter(weight, requires_grad=False)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.group.merged is not None:  # every slice resident, held as one pair: no copy needed
            gate_up, down = self.group.merged
            return F.linear(x, down if self.role == "down" else _dense_rows(gate_up, self.role))
        return F.linear(x, assemble_dense(self.group, self.role, x.device))


def hold_in_tree(
    layer: torch.nn.Module, adapter: FamilyAdapter, group: ExpertGroup, device: torch.device
) -> None:
    """Give the module tree of ``layer`` held weights for what ``group`` (the executor) now owns: the dense
    MLP's projections become :class:`HeldLinear`, a fused experts module's parameters :class:`HeldWeight`."""
    experts = adapter.experts(layer)
    if experts is None:
        for role, linear in zip(ROLES, adapter.dense_mlp_projections(layer)):
            HeldLinear.hold(linear, group, role, device)
        return
    for fused in ("gate_up_proj", "down_proj"):
        old = experts._parameters.get(fused)
        if old is None:
            continue
        weight = HeldWeight(
            tuple(old.shape),
            group.dtype,
            device,
            lambda fused=fused: assemble_experts(group, fused, device),
            part=lambda e, fused=fused: assemble_experts(group, fused, device, e),
            label=f"experts.{fused} of layer {group.layer}",
        )
        experts._parameters[fused] = torch.nn.Parameter(weight, requires_grad=False)


def dense_forward(
    executor: Executor, group: ExpertGroup, mlp: torch.nn.Module, projections: tuple[HeldLinear, ...]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The dense MLP's forward: its row slices through the executor while ``projections`` (the
    :class:`HeldLinear` modules) are still its own, or peft's layers around them add nothing now
    (:func:`_adds_nothing`); transformers' MLP forward once an active adapter wraps one (or anyone replaced
    one), each projection then computing for itself."""
    modules = mlp._modules
    # the attribute names the projections sit under (gate_proj, up_proj, down_proj in every built-in family)
    (gate_name, gate), (up_name, up), (down_name, down) = (
        (next(k for k, v in modules.items() if v is p), p) for p in projections
    )
    stock = type(mlp).forward

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        # the check of the default path: three dict lookups (peft replaces a module it wraps in _modules)
        if (
            modules.get(gate_name) is gate
            and modules.get(up_name) is up
            and modules.get(down_name) is down
            or _adds_nothing(modules.get(gate_name), gate)
            and _adds_nothing(modules.get(up_name), up)
            and _adds_nothing(modules.get(down_name), down)
        ):
            shape = hidden_states.shape
            out = executor.run_group(group, hidden_states.reshape(-1, shape[-1]))
            return out.reshape(shape)
        return stock(mlp, hidden_states)

    return forward


def _adds_nothing(module: torch.nn.Module | None, held: HeldLinear) -> bool:
    """Whether ``module`` computes exactly what ``held`` does: it is ``held``, or a peft layer around it
    whose adapters are switched off (``disable_adapter()``) or not active (``set_adapter`` chose an adapter
    that has no weights here). Then the MLP keeps the executor path, with the bits it has without peft."""
    if module is held:
        return True
    base = getattr(module, "get_base_layer", None)
    if base is None or base() is not held or getattr(module, "merged", False):
        return False
    if module.disable_adapters:
        return True
    layers = [getattr(module, name, {}) for name in getattr(module, "adapter_layer_names", ())]
    return not any(adapter in layer for layer in layers for adapter in module.active_adapters)


def experts_adapter_forward(experts: torch.nn.Module, hidden_states, top_k_index, top_k_weights):
    """Fused experts whose weights peft has parametrized (LoRA ``target_parameters``): transformers' own
    experts forward, reading each expert's weight plus the adapter's delta (the held weight is assembled
    on the device for that)."""
    eager = getattr(type(experts).forward, "__wrapped__", None)
    if eager is None:
        raise RuntimeError(
            f"{type(experts).__name__} has no transformers experts forward to run its parametrized weights "
            "with (expected transformers' use_experts_implementation decorator)"
        )
    return eager(experts, hidden_states, top_k_index, top_k_weights)
