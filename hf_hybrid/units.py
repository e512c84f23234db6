"""What a placeable piece of a model is, and byte-size helpers.

A *unit* is the smallest thing the planner gives a home: one attention block (with its KV cache
counted separately), one MoE expert, one row slice of a dense MLP, the embeddings, the lm_head.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

#: The three homes a unit can have.
GPU = "gpu"  # resident on the accelerator
CPU = "cpu"  # pinned host memory, computed by the CPU lane
STREAM = "stream"  # pinned host memory, copied over PCIe into a staging slot before use
HOMES = (GPU, CPU, STREAM)

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNIT_FACTORS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
    "ki": 1024,
    "mi": 1024**2,
    "gi": 1024**3,
    "ti": 1024**4,
}


def parse_bytes(value: int | float | str, what: str = "size") -> int:
    """Parse ``value`` ("6GiB", "512MiB", "1.5GB", 4096) into a number of bytes.

    Raises ``ValueError`` with the accepted forms when the value cannot be read or is negative.
    """
    if isinstance(value, bool):
        raise TypeError(f"{what} must be a number of bytes or a string like '6GiB', not a bool")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"{what} must not be negative (got {value})")
        return int(value)
    if not isinstance(value, str):
        raise TypeError(
            f"{what} must be a number of bytes or a string like '6GiB', not {type(value).__name__}"
        )
    match = _SIZE_RE.match(value)
    if not match:
        raise ValueError(
            f"cannot read {what}={value!r}: use a number of bytes or a string like '512MiB', '6GiB' or '1.5GB'"
        )
    number, unit = match.groups()
    return int(float(number) * _UNIT_FACTORS[(unit or "").lower()])


def format_bytes(num: float) -> str:
    """Format a byte count for people: 1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(num) < 1024:
            return f"{num:.0f} {unit}" if unit == "B" else f"{num:.1f} {unit}"
        num /= 1024
    return f"{num:.1f} TiB"


@dataclass(frozen=True)
class TensorSpec:
    """One tensor inside a unit: its name relative to the unit, shape and where it comes from."""

    name: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Unit:
    """A placeable piece of a model.

    ``kind`` is one of ``embed``, ``lm_head``, ``attention``, ``router``, ``shared_expert``, ``expert``,
    ``mlp_slice``, ``norm``. ``nbytes`` counts its weights in the load dtype; ``flops_per_token`` the
    multiply-adds x 2 one token costs. ``homes`` lists the homes the executor supports for it.
    ``row_bytes``: what one token's lookup reads, for an embedding that is a lookup only (not tied to the
    lm_head): a step touches its tokens' rows, never the whole table.
    """

    name: str
    kind: str
    layer: int | None
    nbytes: int
    flops_per_token: int
    homes: tuple[str, ...]
    index: int | None = None  # expert id or slice id inside its layer
    rows: tuple[int, int] | None = None  # for MLP slices: the intermediate rows [lo, hi) this slice holds
    tensors: tuple[TensorSpec, ...] = field(default=(), compare=False)
    row_bytes: int = 0
    #: experts and dense MLP slices share one execution path (a gated MLP over routed tokens); an attribute,
    #: not a property: the planner's search reads it tens of millions of times on models with many experts
    is_expert_like: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "is_expert_like", self.kind in ("expert", "mlp_slice"))


def dtype_size(dtype) -> int:
    """Bytes per element of a torch dtype."""
    import torch

    return torch.empty((), dtype=dtype).element_size()


def _module_bytes(module, elt: int) -> int:
    return sum(p.numel() for p in module.parameters()) * elt


def _gated_mlp_tensors(rows: int, hidden: int) -> tuple[TensorSpec, ...]:
    return (TensorSpec("gate_up", (2 * rows, hidden)), TensorSpec("down", (hidden, rows)))


def slice_bounds(intermediate: int, num_slices: int) -> list[tuple[int, int]]:
    """Row ranges of ``num_slices`` near-equal slices of a dense MLP's ``intermediate`` rows."""
    num_slices = max(1, min(num_slices, intermediate))
    base, extra = divmod(intermediate, num_slices)
    bounds, start = [], 0
    for i in range(num_slices):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def default_mlp_slices(intermediate: int, hidden: int, elt: int) -> int:
    """Slices per dense MLP: about 64 MiB each so the planner can split finely, and at least 4."""
    mlp_bytes = 3 * intermediate * hidden * elt
    return max(4, min(64, -(-mlp_bytes // (64 * 1024**2))))


def describe_units(model, adapter, dtype, mlp_slices: int | None = None) -> list[Unit]:
    """List the placeable units of a (possibly meta-device) transformers causal LM.

    Structure comes from ``adapter`` (a :class:`~hf_hybrid.families.FamilyAdapter`): a layer with experts is
    a MoE layer (router unit = the MoE block without its experts and shared expert), otherwise its MLP is
    a dense gated MLP that is split into row slices.
    """
    elt = dtype_size(dtype)
    embed = adapter.embeddings(model)
    lm_head = model.get_output_embeddings()
    tied = lm_head is not None and lm_head.weight is embed.weight
    units: list[Unit] = []
    hidden = embed.weight.shape[1]
    if tied:
        units.append(
            Unit("embed_tokens", "embed", None, _module_bytes(embed, elt), 2 * embed.weight.numel(), (GPU,))
        )
    else:
        units.append(
            Unit(
                "embed_tokens",
                "embed",
                None,
                _module_bytes(embed, elt),
                0,
                (GPU, CPU),
                row_bytes=embed.weight.shape[1] * elt,
            )
        )
    for i, layer in enumerate(adapter.layers(model)):
        attn = adapter.attention(layer)
        mlp = adapter.mlp(layer)
        attn_params = sum(p.numel() for p in attn.parameters())
        units.append(
            Unit(f"layers.{i}.attention", "attention", i, attn_params * elt, 2 * attn_params, (GPU, STREAM))
        )
        norm_bytes = _module_bytes(layer, elt) - attn_params * elt - _module_bytes(mlp, elt)
        units.append(Unit(f"layers.{i}.norms", "norm", i, norm_bytes, 0, (GPU,)))
        experts = adapter.experts(layer)
        if experts is not None:
            # the router unit holds everything small the MoE block needs on the GPU (incl. a shared-expert gate)
            r_bytes = _module_bytes(mlp, elt) - _module_bytes(experts, elt)
            shared = adapter.shared_expert(layer)
            if shared is not None:
                r_bytes -= _module_bytes(shared, elt)
            units.append(Unit(f"layers.{i}.router", "router", i, r_bytes, 2 * r_bytes // elt, (GPU,)))
            if shared is not None:
                s_bytes = _module_bytes(shared, elt)
                units.append(
                    Unit(
                        f"layers.{i}.shared_expert",
                        "shared_expert",
                        i,
                        s_bytes,
                        2 * s_bytes // elt,
                        (GPU, STREAM),
                    )
                )
            n_exp, inter, h = adapter.expert_shapes(layer)
            for e in range(n_exp):
                params = 3 * inter * h
                units.append(
                    Unit(
                        f"layers.{i}.experts.{e}",
                        "expert",
                        i,
                        params * elt,
                        2 * params,
                        (GPU, CPU, STREAM),
                        index=e,
                        tensors=_gated_mlp_tensors(inter, h),
                    )
                )
        else:
            inter = adapter.dense_mlp_projections(layer)[0].weight.shape[0]
            n_slices = mlp_slices or default_mlp_slices(inter, hidden, elt)
            for s, (lo, hi) in enumerate(slice_bounds(inter, n_slices)):
                params = 3 * (hi - lo) * hidden
                units.append(
                    Unit(
                        f"layers.{i}.mlp.{s}",
                        "mlp_slice",
                        i,
                        params * elt,
                        2 * params,
                        (GPU, CPU, STREAM),
                        index=s,
                        rows=(lo, hi),
                        tensors=_gated_mlp_tensors(hi - lo, hidden),
                    )
                )
    units.append(Unit("norm", "norm", None, _module_bytes(adapter.final_norm(model), elt), 0, (GPU,)))
    if not tied and lm_head is not None:
        head_bytes = _module_bytes(lm_head, elt)
        units.append(Unit("lm_head", "lm_head", None, head_bytes, 2 * head_bytes // elt, (GPU, STREAM)))
    return units
