"""The options of one bench run: engine names, :class:`BenchSettings` and their validation."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..devices import default_device_name
from ..units import parse_bytes
from .scenarios import Scenario, default_cache_dir, get_scenario, parse_skew

#: Engine names in the order they run by default.
ENGINES = ("hf_hybrid", "gpu", "accelerate", "cpu")
#: Engines that run the shorter baseline workload (they are too slow for the headline one).
SLOW_ENGINES = ("accelerate", "cpu")
#: Token-assignment modes ``--variants`` may name (each a load with ``token_assignment=<mode>``).
ASSIGNMENT_VARIANTS = ("stream", "static", "cpu", "whole", "adaptive")
#: What ``--variants`` may name: the token-assignment modes, "eager" (decode steps without the static cache
#: and attention graphs, as ``decode_graphs=False``), "unfused" (attention graphs, routers run by their MoE
#: blocks), "rebuilt_masks" (every decode step's attention mask built by transformers, not updated),
#: "predict" (``predict_next_layer=True``), "lookahead" (``decode_lookahead=True``), "balanced_splits" (divided experts' split moved by which lane finished first), "lane_thread" (native CPU jobs run by the lane's Python thread), "spin" (native threads spin before sleeping), "wait_spin" (only the wait for them spins), "eager_experts" (one-token steps' GPU-lane experts issued kernel by kernel, not replayed as CUDA graphs), "prefill_splits" (prefill steps divide large host experts between the CPU lane and the copy lane), "separate_parts" (each part of a divided expert weighted on its own, the old way) and "calibrated" (``model.calibrate`` on random prompts, then
#: measured). Each variant runs on the loaded model with the main row's placement.
SWITCH_VARIANTS = (
    "eager",
    "unfused",
    "rebuilt_masks",
    "predict",
    "lookahead",
    "balanced_splits",
    "lane_thread",
    "spin",
    "wait_spin",
    "eager_experts",
    "prefill_splits",
    "separate_parts",
)
VARIANTS = (*ASSIGNMENT_VARIANTS, *SWITCH_VARIANTS, "calibrated")


@dataclass
class BenchSettings:
    """Resolved options of one bench run (see :func:`hf_hybrid.bench.runner.run_bench` for each)."""

    scenario: Scenario
    skew: tuple[str, float] | None
    batch: int
    prompt: int
    new_tokens: int
    baseline_prompt: int
    baseline_new_tokens: int
    gpu_memory: str
    budget_bytes: int
    device: str
    engines: list[str]
    cache_dir: Path
    json_path: Path | None
    seed: int
    cleanup: bool
    profile: str
    command: str
    repeats: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def counts(self, engine: str) -> tuple[int, int]:
        """(prompt, new tokens) the given engine runs."""
        if engine in SLOW_ENGINES:
            return self.baseline_prompt, self.baseline_new_tokens
        return self.prompt, self.new_tokens


def log(message: str) -> None:
    """One progress line on stderr."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def parse_engines(engines: str | Sequence[str] | None, device: str) -> list[str]:
    """Engine list from ``"hf_hybrid,cpu"`` or a sequence; ``None``/``"all"`` -> all that apply here."""
    if engines is None or engines == "all" or engines == ["all"]:
        if device.startswith("cuda"):
            return list(ENGINES)
        return ["hf_hybrid", "cpu"]
    names = [e.strip() for e in engines.split(",")] if isinstance(engines, str) else [str(e) for e in engines]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in ENGINES]
    if unknown or not names:
        raise ValueError(f"unknown engine(s) {unknown or names}: choose from {', '.join(ENGINES)}")
    return list(dict.fromkeys(names))


def options_skew_text(skew: tuple[str, float] | None) -> str | None:
    """The spec string of a parsed skew (``None`` or ``zipf:S``)."""
    return None if skew is None else f"zipf:{skew[1]:g}"


def _name_list(value: str | Sequence[str] | None) -> list[str]:
    """``"a,b"`` or a sequence -> a list of names; ``None`` -> []."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value or ())


def resolve_settings(scenario: str | Scenario, **options: Any) -> BenchSettings:
    """Fill every option of ``run_bench`` from the scenario's defaults; validate them."""
    sc = get_scenario(scenario)
    skew = parse_skew(options.pop("skew", None))
    if skew is not None and not sc.is_moe:
        raise ValueError(f"scenario {sc.name} is dense: --skew applies to MoE scenarios only")
    device = options.pop("device", None) or default_device_name()
    batch = int(options.pop("batch", None) or sc.batch)
    prompt = int(options.pop("prompt", None) or sc.prompt)
    new_tokens = int(options.pop("new_tokens", None) or sc.new_tokens)
    baseline_prompt = options.pop("baseline_prompt", None)
    baseline_prompt = int(baseline_prompt) if baseline_prompt else min(sc.baseline_prompt, prompt)
    baseline_new = options.pop("baseline_new_tokens", None)
    baseline_new = int(baseline_new) if baseline_new else min(sc.baseline_new_tokens, new_tokens)
    for name, value in (
        ("batch", batch),
        ("prompt", prompt),
        ("new_tokens", new_tokens),
        ("baseline_prompt", baseline_prompt),
        ("baseline_new_tokens", baseline_new),
    ):
        if value < 1:
            raise ValueError(f"{name} must be at least 1 (got {value})")
    gpu_memory = str(options.pop("gpu_memory", None) or sc.gpu_memory)
    budget = parse_bytes(gpu_memory, "gpu_memory")
    cache_dir = options.pop("cache_dir", None)
    cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    json_alias = options.pop("json", None)
    json_path = options.pop("json_path", None) or json_alias
    profile = options.pop("profile", "auto") or "auto"
    if profile not in ("auto", "quick", "full", "default"):
        raise ValueError(f"profile must be 'auto', 'quick', 'full' or 'default' (got {profile!r})")
    seed = int(options.pop("seed", 0) or 0)
    settings = BenchSettings(
        scenario=sc,
        skew=skew,
        batch=batch,
        prompt=prompt,
        new_tokens=new_tokens,
        baseline_prompt=baseline_prompt,
        baseline_new_tokens=baseline_new,
        gpu_memory=gpu_memory,
        budget_bytes=budget,
        device=device,
        engines=parse_engines(options.pop("engines", None), device),
        cache_dir=cache_dir,
        json_path=Path(json_path).expanduser() if json_path else None,
        seed=seed,
        cleanup=bool(options.pop("cleanup", False)),
        profile=profile,
        command=str(options.pop("command", None) or ""),
        repeats=int(options.pop("repeats", None) or 1),
    )
    settings.extra["progress"] = bool(options.pop("progress", True))
    settings.extra["routing_stats"] = bool(options.pop("routing_stats", False))
    settings.extra["print_table"] = bool(options.pop("print_table", True))
    budgets = _name_list(options.pop("budgets", None))
    for b in budgets:
        parse_bytes(b, "budgets")  # fail before any build with the bad value named
    settings.extra["budgets"] = budgets
    variants = _name_list(options.pop("variants", None))
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS)}")
    settings.extra["variants"] = variants
    chunk = options.pop("prefill_chunk", None)
    if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1):
        raise ValueError(f"prefill_chunk must be a positive int (got {chunk!r})")
    settings.extra["prefill_chunk"] = chunk
    if options:
        raise TypeError(f"unknown option(s) for run_bench: {', '.join(sorted(options))}")
    if not settings.command:
        shown = {"skew": options_skew_text(skew), "gpu_memory": gpu_memory, "device": device}
        settings.command = (
            f"run_bench({sc.name!r}, " + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"
        )
    return settings
