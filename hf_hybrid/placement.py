"""What a plan is: the workload it optimises for, each unit's home, the staging rings, the device bytes
it costs and what it predicts; printed as a table or JSON. Pure data (no torch)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from .profile import HardwareProfile
from .units import GPU, HOMES, Unit, format_bytes

#: Budgets at or above this are "unlimited" (the CPU standing in with no gpu_memory given).
UNLIMITED = 1 << 61


@dataclass(frozen=True)
class Workload:
    """What the user will run: prompt length, new tokens and batch size (tokens per decode step)."""

    prompt_tokens: int = 512
    new_tokens: int = 128
    batch: int = 1

    def __post_init__(self):
        for name in ("prompt_tokens", "new_tokens", "batch"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"Workload.{name} must be >= 1 (got {getattr(self, name)})")


@dataclass
class StagingClass:
    """A ring of equal device slots that streamed units of one kind are copied into."""

    name: str
    slot_bytes: int
    slots: int

    @property
    def nbytes(self) -> int:
        """Device bytes the ring reserves."""
        return self.slot_bytes * self.slots


@dataclass
class HybridPlan:
    """The partition: each unit's home, the device memory it costs, and what it predicts.

    ``print(plan)`` shows a table; ``plan.to_dict()`` is JSON-able.
    """

    units: list[Unit]
    homes: dict[str, str]
    budget_bytes: int
    kv_cache_bytes: int
    workspace_bytes: int
    staging: list[StagingClass]
    profile: HardwareProfile
    workload: Workload
    routing: dict[str, float] = field(default_factory=dict)
    # tokens per prefill forward the workspace holds (longer prompts are prefilled in chunks of this size),
    # and the KV cache's device bytes per 1,024 positions of max_context (for max_batch_size sequences)
    prefill_chunk: int = 0
    kv_cache_bytes_per_1k: int = 0
    token_assignment: str = "adaptive"  # the executor's policy, which the predictions assume
    prefill_splits: bool = False  # prefill steps divide large host experts too (the executor's option)
    predicted: dict[str, float] = field(default_factory=dict)
    unit_times: dict[str, dict[str, float]] = field(default_factory=dict)
    # what the last generate call really did (set by the model after each call; empty before the first):
    # prompt_tokens, batch, prefill_tok_s, decode_tok_s, decode_steps -- to set beside the predictions
    measured: dict[str, float] = field(default_factory=dict)

    # -- queries
    def units_in(self, home: str) -> list[Unit]:
        """All units whose home is ``home``."""
        return [u for u in self.units if self.homes[u.name] == home]

    @property
    def resident_bytes(self) -> int:
        """Weight bytes resident on the device."""
        return sum(u.nbytes for u in self.units_in(GPU))

    @property
    def staging_bytes(self) -> int:
        """Device bytes of all staging rings."""
        return sum(s.nbytes for s in self.staging)

    @property
    def device_bytes(self) -> int:
        """Everything the plan puts on the device: weights, KV cache, workspace, staging."""
        return self.resident_bytes + self.kv_cache_bytes + self.workspace_bytes + self.staging_bytes

    def to_dict(self) -> dict:
        """JSON-able form of the plan."""
        return {
            "units": [
                {
                    "name": u.name,
                    "kind": u.kind,
                    "layer": u.layer,
                    "home": self.homes[u.name],
                    "bytes": u.nbytes,
                    "predicted_s": self.unit_times.get(u.name, {}),
                }
                for u in self.units
            ],
            "budget": {
                "total": self.budget_bytes,
                "resident_weights": self.resident_bytes,
                "kv_cache": self.kv_cache_bytes,
                "workspace": self.workspace_bytes,
                "staging": self.staging_bytes,
                "free": self.budget_bytes - self.device_bytes,
                "kv_cache_per_1k_context": self.kv_cache_bytes_per_1k,
            },
            "prefill_chunk": self.prefill_chunk,
            "staging": [{"name": s.name, "slot_bytes": s.slot_bytes, "slots": s.slots} for s in self.staging],
            "homes": {h: len(self.units_in(h)) for h in HOMES},
            "workload": {
                "prompt_tokens": self.workload.prompt_tokens,
                "new_tokens": self.workload.new_tokens,
                "batch": self.workload.batch,
            },
            "token_assignment": self.token_assignment,
            "prefill_splits": self.prefill_splits,
            "predicted": {k: (v if math.isfinite(v) else None) for k, v in self.predicted.items()},
            "measured": dict(self.measured),
            "profile": self.profile.to_dict(),
        }

    def to_json(self) -> str:
        """The plan as a JSON string."""
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        lines = ["hf_hybrid plan", ""]
        lines.append(
            f"{'unit':<28} {'kind':<13} {'home':<6} {'bytes':>10} {'prefill ms':>10} {'decode ms':>10}"
        )
        grouped = _group_rows(self)
        for name, kind, home, nbytes, pre, dec in grouped:
            lines.append(
                f"{name:<28} {kind:<13} {home:<6} {format_bytes(nbytes):>10} {pre * 1e3:>10.3f} {dec * 1e3:>10.3f}"
            )
        d = self.to_dict()["budget"]
        lines.append("")
        unlimited = d["total"] >= UNLIMITED
        lines.append(
            f"device budget {'unlimited' if unlimited else format_bytes(d['total'])}: weights "
            f"{format_bytes(d['resident_weights'])}, KV cache {format_bytes(d['kv_cache'])}, workspace "
            f"{format_bytes(d['workspace'])}, staging {format_bytes(d['staging'])}"
            + ("" if unlimited else f", free {format_bytes(d['free'])}")
        )
        if self.kv_cache_bytes_per_1k:
            lines.append(
                f"each 1k positions of max_context cost {format_bytes(self.kv_cache_bytes_per_1k)} of KV cache"
                f"; prompts longer than {self.prefill_chunk} tokens are prefilled in chunks of that size"
            )
        counts = ", ".join(f"{h} {len(self.units_in(h))}" for h in HOMES)
        lines.append(f"units per home: {counts}")
        p = self.predicted
        if p:
            wl = self.workload
            # a rate above its bound is no error: the bound moves every host unit over PCIe, while the plan
            # computes some of them on the CPU instead, in parallel with the copies
            on_cpu = len(self.units_in("cpu"))
            above = (
                f": above it because the bound counts PCIe transfers only, while this plan also computes "
                f"{on_cpu} host units on the CPU"
                if on_cpu
                else ""
            )
            # the decode bound prices the CPU lane at torch's GEMV rate (its first definition); the native lane,
            # which computes decode steps where it runs, reads faster: its bound is the second figure
            above_decode = (
                ": above it because it prices the CPU lane at torch's kernel rate, not the native lane's"
            )
            for phase, what, digits in (
                ("prefill", f"prefill ({wl.prompt_tokens} tokens x {wl.batch})", 1),
                ("decode", f"decode (batch {wl.batch})", 2),
            ):
                bound = p[f"{phase}_bound_tok_s"]
                fraction = p[f"{phase}_fraction_of_bound"]
                # nothing off the device means no transfer bound to compare with
                why = above if phase == "prefill" else above_decode
                tail = (
                    f" (bound {bound:.{digits}f}, {100 * fraction:.0f}%" + (why if fraction > 1 else "") + ")"
                    if math.isfinite(bound)
                    else " (everything resident: no PCIe/CPU bound)"
                )
                second, label = (
                    (p.get("prefill_cpu_pcie_bound_tok_s"), "CPU+PCIe bound")
                    if phase == "prefill"
                    else (p.get("decode_native_bound_tok_s"), "native-lane bound")
                )
                if (
                    second is not None
                    and math.isfinite(bound)
                    and math.isfinite(second)
                    and (phase == "prefill" or second > bound)
                ):
                    tail = (
                        tail[:-1]
                        + f"; {label} {second:.{digits}f}, {100 * p[f'{phase}_tok_s'] / second:.0f}%)"
                    )
                lines.append(f"predicted {what}: {p[f'{phase}_tok_s']:.{digits}f} tok/s{tail}")
        m = self.measured
        if m.get("prefill_tok_s"):
            line = f"measured by the last generate: prefill ({m['prompt_tokens']:.0f} tokens x {m['batch']:.0f}) "
            line += f"{m['prefill_tok_s']:.1f} tok/s"
            if m.get("decode_tok_s"):
                line += f", decode {m['decode_tok_s']:.2f} tok/s over {m['decode_steps']:.0f} steps"
            lines.append(line)
        return "\n".join(lines)

    __repr__ = __str__


def _group_rows(plan: HybridPlan) -> list[tuple]:
    """Table rows; runs of experts/slices of one layer with the same home are folded into one row."""
    rows: list[tuple] = []
    for u in plan.units:
        home = plan.homes[u.name]
        t = plan.unit_times.get(u.name, {})
        pre, dec = t.get("prefill", 0.0), t.get("decode", 0.0)
        if u.is_expert_like and rows and rows[-1][6] == (u.layer, u.kind, home):
            name, kind, _, nbytes, p0, d0, key, first = rows[-1]
            rows[-1] = (
                f"layers.{u.layer}.{_plural(u)}.{first}-{u.index}",
                kind,
                home,
                nbytes + u.nbytes,
                p0 + pre,
                d0 + dec,
                key,
                first,
            )
        else:
            rows.append((u.name, u.kind, home, u.nbytes, pre, dec, (u.layer, u.kind, home), u.index))
    return [r[:6] for r in rows]


def _plural(unit: Unit) -> str:
    return "experts" if unit.kind == "expert" else "mlp"


# ---------------------------------------------------------------------------------------------- planning
