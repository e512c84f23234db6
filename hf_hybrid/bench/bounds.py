"""The bench's bounds: host-side items of a plan (or of an ideal placement), fed to :mod:`hf_hybrid.bounds`.

Host-side experts are read with the probability that at least one of the batch's tokens routes to them
(the checkpoint's measured routing, else top_k/num_experts). Embeddings are left out: a lookup reads a
few rows, it is neither streamed nor computed as a whole.
"""

from __future__ import annotations

import math
import re
from typing import Any

from ..bounds import HostItem, host_read_bytes, prefill_flops, transfer_bounds

_LAYER_RE = re.compile(r"layers?[._](\d+)")
_EXPERT_RE = re.compile(r"experts?[._](\d+)")


def finite(value: Any) -> float | None:
    """``value`` as a float when it is a finite positive number, else None."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def _unit_fields(unit: dict) -> tuple[str, int | None, int | None, int]:
    """(kind, layer, expert index, bytes) of a plan unit, reading the name when fields are missing."""
    name = str(unit.get("name", ""))
    kind = unit.get("kind")
    layer = unit.get("layer")
    index = unit.get("index")
    if layer is None and (m := _LAYER_RE.search(name)):
        layer = int(m.group(1))
    if kind is None:
        lowered = name.lower()
        if "shared_expert" in lowered:
            kind = "shared_expert"
        elif _EXPERT_RE.search(lowered):
            kind = "expert"
        elif "embed" in lowered:
            kind = "embed"
        elif "lm_head" in lowered:
            kind = "lm_head"
        else:
            kind = "other"
    if kind == "expert" and index is None and (m := _EXPERT_RE.search(name)):
        index = int(m.group(1))
    nbytes = unit.get("bytes", unit.get("nbytes", 0)) or 0
    return str(kind), layer, index, int(nbytes)


def _expert_prob(meta: dict, layer: int | None, expert: int | None, num_experts: int, top_k: int) -> float:
    routing = meta.get("routing") or {}
    layers = routing.get("layers") or []
    if layer is not None and expert is not None and layer in layers:
        probs = routing["expert_probs"][layers.index(layer)]
        if 0 <= expert < len(probs):
            return float(probs[expert])
    return top_k / num_experts if num_experts else 1.0


def host_items_from_plan(plan: dict, meta: dict) -> list[HostItem] | None:
    """(bytes, per-token read probability) of every unit the plan keeps off the GPU; None without units."""
    units = plan.get("units") if isinstance(plan, dict) else None
    if not units:
        return None
    layers = {e["layer"]: e for e in meta.get("bytes", {}).get("layers", [])}
    items = []
    for unit in units:
        if not isinstance(unit, dict) or unit.get("home", "gpu") == "gpu":
            continue
        kind, layer, index, nbytes = _unit_fields(unit)
        if kind == "embed":
            continue
        if kind == "expert":
            entry = layers.get(layer, {})
            prob = _expert_prob(meta, layer, index, entry.get("num_experts", 0), entry.get("top_k", 0))
        else:
            prob = 1.0
        items.append((nbytes, prob))
    return items


def host_items_estimate(meta: dict, budget: int) -> list[HostItem]:
    """Without a plan: an ideal placement under ``budget`` -- non-expert weights first, then experts
    (or dense MLP slices) by popularity -- and what stays off the GPU. Embeddings stay on the host."""
    info = meta["bytes"]
    always = info.get("lm_head", 0) + info.get("final_norm", 0)
    optional: list[HostItem] = []
    for entry in info["layers"]:
        always += entry["attention"] + entry["router"] + entry["norms"]
        if entry.get("num_experts"):
            for expert in range(entry["num_experts"]):
                prob = _expert_prob(meta, entry["layer"], expert, entry["num_experts"], entry["top_k"])
                optional.append((entry["expert_bytes"], prob))
        if entry.get("mlp"):
            slices = 16  # dense rows are needed by every token; slicing only makes the fill finer
            optional.extend([(entry["mlp"] // slices, 1.0)] * slices)
    items: list[HostItem] = []
    room = budget - always
    if room < 0:
        items.append((-room, 1.0))
        room = 0
    for nbytes, prob in sorted(optional, key=lambda item: -item[1]):
        if nbytes <= room:
            room -= nbytes
        else:
            items.append((nbytes, prob))
    return items


def compute_bounds(
    meta: dict,
    profile: Any,
    budget_bytes: int,
    prompt: int,
    batch: int,
    plan: dict | None = None,
) -> dict:
    """Prefill and decode tok/s bounds for ``prompt`` x ``batch`` under the budget (:mod:`hf_hybrid.bounds`).

    From the plan's units when given, else from an ideal placement estimated from the checkpoint's byte
    breakdown. A bound is ``None`` when nothing limits it (every weight on the GPU). The result also
    says which (``source``: ``plan.units`` or ``estimate``).
    """
    items = host_items_from_plan(plan, meta) if plan else None
    source = "plan.units"
    if items is None:
        items = host_items_estimate(meta, budget_bytes)
        source = "estimate"
    host_bytes = sum(n for n, _ in items)
    chunk = (plan or {}).get("prefill_chunk") if isinstance(plan, dict) else None
    forward_tokens = min(chunk or prompt, prompt) * batch
    bounds = transfer_bounds(
        host_bytes,
        host_read_bytes(items, batch),
        profile,
        prompt,
        batch,
        prefill_chunk=chunk,
        prefill_flops=prefill_flops(items, forward_tokens),
    )
    bounds["source"] = source
    return bounds


def row_bounds(
    row: dict,
    meta: dict,
    profile: Any,
    budget_bytes: int,
    batch: int,
    plan: dict | None,
    hybrid_counts: tuple | None,
) -> dict | None:
    """The bounds of one measured row: None for engines that move no weights off the GPU.

    The plan's own ``predicted`` bounds win when the row ran the workload the plan was made for.
    """
    if not (row["engine"].startswith("hf_hybrid") or row["engine"] == "accelerate"):
        return None  # all-on-GPU and all-on-CPU are not limited by moving weights off the GPU
    bounds = compute_bounds(meta, profile, budget_bytes, row["prompt"], batch, plan)
    predicted = (plan or {}).get("predicted") if isinstance(plan, dict) else None
    if isinstance(predicted, dict) and (row["prompt"], row["new_tokens"]) == hybrid_counts:
        for key in (
            "prefill_bound_tok_s",
            "prefill_cpu_pcie_bound_tok_s",
            "decode_bound_tok_s",
            "decode_native_bound_tok_s",
        ):
            value = finite(predicted.get(key))
            if value:
                bounds[key] = value
                bounds["source"] = "plan.predicted"
            elif predicted.get(key) is not None:
                bounds[key] = None  # the plan says nothing limits it (inf): no percentage to show
                bounds["source"] = "plan.predicted"
    return bounds
