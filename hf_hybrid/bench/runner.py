"""Measure hf_hybrid and the baselines on a scenario's checkpoint, in one process.

Engines (each loaded, measured and freed before the next):

* ``hf_hybrid``: :class:`hf_hybrid.HybridModelForCausalLM` under the scenario's GPU budget;
* ``gpu``: plain transformers with every weight on the GPU -- only when the checkpoint fits in free GPU
  memory (the reference for what the budget costs);
* ``accelerate``: ``device_map="auto"`` with ``max_memory={0: budget, "cpu": ...}`` (offload hooks that
  copy CPU weights to the GPU layer by layer) -- CUDA only;
* ``cpu``: plain transformers on the CPU.

Per engine: one short warm-up ``generate``; prefill = ``generate(max_new_tokens=1)``; full = ``generate``
of N new tokens (``min_new_tokens=N`` so a random model's EOS cannot stop it early). prefill tok/s =
prompt*batch / t_prefill; decode tok/s = batch*(N-1) / (t_full - t_prefill); end-to-end = t_full.
The slow baselines (accelerate, cpu) run a shorter workload by default; for the speedup column their
end-to-end time is projected to the headline workload as t_prefill (not scaled with the prompt: offload
prefill is bound by moving the weights once, so this favours the baseline) + (N-1) * t_decode_step.

Bounds (the best any engine could do with this GPU budget on this machine): prefill = prompt tokens /
(bytes off the GPU / h2d_bw); decode = batch / (expected host-side bytes read per decode step /
(CPU weight-read rate + h2d rate, both as measured while the other runs)). Host-side experts are read
with the probability that at least one of the batch's tokens routes to them (the checkpoint's measured
routing, else top_k/num_experts). The plan's own ``predicted`` bounds are used when it has them.
These are transfer bounds, as defined above: an engine that computes some host-side units on the CPU
during prefill instead of copying them can come out slightly above 100 % of the prefill bound.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import re
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..hooks import cudnn_attention_off
from ..system import cpu_model, meminfo
from ..units import format_bytes, parse_bytes
from .checkpoint import build_checkpoint, checkpoint_key, read_meta
from .scenarios import Scenario, default_cache_dir, get_scenario, parse_skew, skew_label

#: Engine names in the order they run by default.
ENGINES = ("hf_hybrid", "gpu", "accelerate", "cpu")
#: Engines that run the shorter baseline workload (they are too slow for the headline one).
SLOW_ENGINES = ("accelerate", "cpu")
_GIB = 1024**3

TABLE_COLUMNS = (
    "engine",
    "prompt",
    "new",
    "prefill tok/s",
    "decode tok/s",
    "end-to-end s",
    "prefill % of bound",
    "decode % of bound",
    "speedup vs accelerate (e2e)",
    "note",
)


class EngineSkipped(Exception):
    """Raised by an engine loader when the engine does not apply here (the row says why)."""


@dataclass
class BenchSettings:
    """Resolved options of one bench run (see :func:`run_bench` for what each means)."""

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


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def default_device() -> str:
    """``cuda`` when a CUDA device is visible, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


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


def resolve_settings(scenario: str | Scenario, **options: Any) -> BenchSettings:
    """Fill every option of :func:`run_bench` from the scenario's defaults; validate them."""
    sc = get_scenario(scenario)
    skew = parse_skew(options.pop("skew", None))
    if skew is not None and not sc.is_moe:
        raise ValueError(f"scenario {sc.name} is dense: --skew applies to MoE scenarios only")
    device = options.pop("device", None) or default_device()
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
    budgets = options.pop("budgets", None) or ()
    if isinstance(budgets, str):
        budgets = [b.strip() for b in budgets.split(",") if b.strip()]
    for b in budgets:
        parse_bytes(b, "budgets")  # fail before any build with the bad value named
    settings.extra["budgets"] = list(budgets)
    variants = options.pop("variants", None) or ()
    if isinstance(variants, str):
        variants = [v.strip() for v in variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS)}")
    settings.extra["variants"] = list(variants)
    if options:
        raise TypeError(f"unknown option(s) for run_bench: {', '.join(sorted(options))}")
    if not settings.command:
        shown = {"skew": options_skew_text(skew), "gpu_memory": gpu_memory, "device": device}
        settings.command = (
            f"run_bench({sc.name!r}, " + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"
        )
    return settings


def options_skew_text(skew: tuple[str, float] | None) -> str | None:
    """The spec string of a parsed skew (``None`` or ``zipf:S``)."""
    return None if skew is None else f"zipf:{skew[1]:g}"


# --------------------------------------------------------------------------------------------------------
# machine and profile


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - a missing or broken package is just "unknown" here
        return None


def machine_info(device: str) -> dict:
    """Versions and hardware of this machine, for the JSON record."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "accelerate": _version("accelerate"),
        "safetensors": _version("safetensors"),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_total_bytes": meminfo("MemTotal"),
        "device": device,
        "cuda": torch.version.cuda,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        dev = torch.device(device)
        props = torch.cuda.get_device_properties(dev)
        info.update(
            gpu_name=props.name, gpu_total_bytes=props.total_memory, gpu_count=torch.cuda.device_count()
        )
    return info


def device_name(device: str) -> str:
    """Human name of the device the bench runs on."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({cpu_model()}, {torch.get_num_threads()} threads)"


def load_profile(device: str, mode: str = "auto", plan: dict | None = None) -> tuple[Any, str]:
    """The machine's :class:`~hf_hybrid.profile.HardwareProfile` for the bounds, and where it came from.

    ``auto``: the profile hf_hybrid's plan was made with when there is one (so bounds and the plan's
    predictions agree), else what hf_hybrid would use -- the cached full measurement on CUDA
    (``load_or_measure``), ``default_profile`` on the CPU. ``quick``/``full``: ``load_or_measure`` with
    that mode. ``default``: ``default_profile``. Falls back to ``default_profile`` when measuring fails.
    """
    from .. import profile as profile_mod

    if mode == "auto" and isinstance(plan, dict) and isinstance(plan.get("profile"), dict):
        try:
            return profile_mod.HardwareProfile.from_dict(plan["profile"]), "hf_hybrid plan"
        except Exception as exc:  # noqa: BLE001 - an unreadable plan profile only costs a measurement
            _log(f"cannot read the plan's profile ({type(exc).__name__}: {exc}); loading one")
    if mode == "auto":
        mode = "full" if device.startswith("cuda") else "default"
    loader = getattr(profile_mod, "load_or_measure", None)
    if mode != "default" and callable(loader):
        try:
            try:
                return loader(device, torch.bfloat16, quick=(mode == "quick")), f"load_or_measure({mode})"
            except TypeError:  # an implementation that wants the dtype's name
                return loader(device, "bfloat16", quick=(mode == "quick")), f"load_or_measure({mode})"
        except Exception as exc:  # noqa: BLE001 - the bench still runs on the default figures
            _log(f"measuring the hardware profile failed ({type(exc).__name__}: {exc}); using defaults")
            return profile_mod.default_profile(device), f"default_profile (load_or_measure failed: {exc})"
    return profile_mod.default_profile(device), "default_profile"


# --------------------------------------------------------------------------------------------------------
# bounds

_LAYER_RE = re.compile(r"layers?[._](\d+)")
_EXPERT_RE = re.compile(r"experts?[._](\d+)")


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


def _read_prob(p: float, batch: int) -> float:
    """Probability that at least one of ``batch`` tokens needs a unit each token needs with prob. ``p``."""
    return 1.0 - (1.0 - min(max(p, 0.0), 1.0)) ** batch


def _host_items_from_plan(plan: dict, meta: dict) -> list[tuple[int, float]] | None:
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
            continue  # an embedding lookup reads a few rows, it is not streamed or computed as a whole
        if kind == "expert":
            entry = layers.get(layer, {})
            prob = _expert_prob(meta, layer, index, entry.get("num_experts", 0), entry.get("top_k", 0))
        else:
            prob = 1.0
        items.append((nbytes, prob))
    return items


def _host_items_estimate(meta: dict, budget: int) -> list[tuple[int, float]]:
    """Without a plan: an ideal placement under ``budget`` -- non-expert weights first, then experts
    (or dense MLP slices) by popularity -- and what stays off the GPU. Embeddings stay on the host."""
    info = meta["bytes"]
    always = info.get("lm_head", 0) + info.get("final_norm", 0)
    optional: list[tuple[int, float]] = []
    for entry in info["layers"]:
        always += entry["attention"] + entry["router"] + entry["norms"]
        if entry.get("num_experts"):
            for expert in range(entry["num_experts"]):
                prob = _expert_prob(meta, entry["layer"], expert, entry["num_experts"], entry["top_k"])
                optional.append((entry["expert_bytes"], prob))
        if entry.get("mlp"):
            slices = 16  # dense rows are needed by every token; slicing only makes the fill finer
            optional.extend([(entry["mlp"] // slices, 1.0)] * slices)
    items: list[tuple[int, float]] = []
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
    """Prefill and decode tok/s bounds for ``prompt`` x ``batch`` under the budget (see module doc).

    From the plan's units when given, else from an ideal placement estimated from the checkpoint's byte
    breakdown. A bound is ``None`` when nothing limits it (every weight on the GPU).
    """
    items = _host_items_from_plan(plan, meta) if plan else None
    source = "plan.units"
    if items is None:
        items = _host_items_estimate(meta, budget_bytes)
        source = "estimate"
    host_bytes = sum(n for n, _ in items)
    step_bytes = sum(n * _read_prob(p, batch) for n, p in items)
    h2d = float(getattr(profile, "h2d_bw", 0) or 0)
    cpu_during = float(getattr(profile, "cpu_gemv_bw_during_copy", 0) or 0)
    h2d_during = float(getattr(profile, "h2d_bw_during_cpu", 0) or 0)
    if not cpu_during and hasattr(profile, "cpu_weight_bw"):
        cpu_during = float(profile.cpu_weight_bw(batch))
    decode_bw = cpu_during + (h2d_during or h2d)
    prefill = prompt * batch / (host_bytes / h2d) if host_bytes > 0 and h2d > 0 else None
    decode = batch / (step_bytes / decode_bw) if step_bytes > 0 and decode_bw > 0 else None
    return {
        "prefill_bound_tok_s": prefill,
        "decode_bound_tok_s": decode,
        "host_bytes": host_bytes,
        "decode_host_bytes_per_step": step_bytes,
        "h2d_bw": h2d,
        "decode_bw": decode_bw,
        "source": source,
    }


# --------------------------------------------------------------------------------------------------------
# engines


def _free(model: Any = None) -> None:
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _cuda_index(device: str) -> int:
    dev = torch.device(device)
    return dev.index if dev.index is not None else 0


def _kv_cache_bytes(config: Any, context: int, batch: int) -> int:
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim * context * batch * 2


def routing_stats_of(meta: dict) -> dict[str, float]:
    """The checkpoint's measured routing as hf_hybrid's ``routing_stats``: unit name ->
    probability that one token routes to that expert (``{"layers.0.experts.3": 0.41, ...}``)."""
    routing = meta.get("routing") or {}
    stats: dict[str, float] = {}
    for layer, probs in zip(routing.get("layers") or [], routing.get("expert_probs") or []):
        for expert, prob in enumerate(probs):
            stats[f"layers.{layer}.experts.{expert}"] = float(prob)
    return stats


def _load_hf_hybrid(path: Path, settings: BenchSettings, prompt: int, new_tokens: int) -> tuple[Any, dict]:
    try:
        from hf_hybrid import HybridModelForCausalLM
    except ImportError as exc:
        raise EngineSkipped(f"hf_hybrid.HybridModelForCausalLM is not importable ({exc})") from exc
    kwargs: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    try:  # optional: the plan then predicts exactly the workload measured here
        from hf_hybrid.planner import Workload

        kwargs["workload"] = Workload(prompt_tokens=prompt, new_tokens=new_tokens, batch=settings.batch)
    except (ImportError, TypeError, ValueError):
        pass
    if settings.extra.get("routing_stats"):
        stats = routing_stats_of(read_meta(path))
        if stats:
            kwargs["routing_stats"] = stats
            extra["routing_stats_passed"] = len(stats)
    model = HybridModelForCausalLM.from_pretrained(
        str(path),
        gpu_memory=settings.gpu_memory,
        device=settings.device,
        dtype=torch.bfloat16,
        max_context=prompt + new_tokens,
        max_batch_size=settings.batch,
        **kwargs,
    )
    plan_obj = getattr(model, "hybrid_plan", None)
    to_dict = getattr(plan_obj, "to_dict", None)
    if callable(to_dict):
        try:
            extra["plan"] = to_dict()
        except Exception as exc:  # noqa: BLE001 - a plan we cannot read only loses the prediction
            extra["plan_error"] = f"{type(exc).__name__}: {exc}"
    return model, extra


def _load_accelerate(path: Path, settings: BenchSettings, prompt: int, new_tokens: int) -> tuple[Any, dict]:
    from transformers import AutoModelForCausalLM

    if not settings.device.startswith("cuda") or not torch.cuda.is_available():
        raise EngineSkipped("accelerate offload needs a CUDA device")
    host_need = read_meta(path)["bytes"]["total"] - settings.budget_bytes
    available = meminfo("MemAvailable")
    if available is not None and available < host_need + 2 * _GIB:
        raise EngineSkipped(
            f"needs ~{format_bytes(host_need)} of RAM for offloaded weights, {format_bytes(available)} free"
        )
    model = AutoModelForCausalLM.from_pretrained(
        str(path),
        dtype=torch.bfloat16,
        device_map="auto",
        max_memory={_cuda_index(settings.device): settings.budget_bytes, "cpu": "100GiB"},
    )
    placement: dict[str, int] = {}
    for _, where in (getattr(model, "hf_device_map", None) or {}).items():
        placement[str(where)] = placement.get(str(where), 0) + 1
    return model, {"device_map_counts": placement}


def _load_cpu(path: Path, settings: BenchSettings, prompt: int, new_tokens: int) -> tuple[Any, dict]:
    from transformers import AutoModelForCausalLM

    need = read_meta(path)["bytes"]["total"]
    available = meminfo("MemAvailable")
    if available is not None and available < need * 1.1 + _GIB:
        raise EngineSkipped(f"needs ~{format_bytes(need)} of RAM, {format_bytes(available)} free")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16)
    return model.eval(), {"threads": torch.get_num_threads()}


def _load_gpu(path: Path, settings: BenchSettings, prompt: int, new_tokens: int) -> tuple[Any, dict]:
    from transformers import AutoConfig, AutoModelForCausalLM

    if not settings.device.startswith("cuda") or not torch.cuda.is_available():
        raise EngineSkipped("all-on-GPU needs a CUDA device")
    total = read_meta(path)["bytes"]["total"]
    config = AutoConfig.from_pretrained(str(path))
    need = total + _kv_cache_bytes(config, prompt + new_tokens, settings.batch)
    margin = max(int(1.5 * _GIB), int(0.1 * total))  # activations, logits, allocator slack
    free, _ = torch.cuda.mem_get_info(_cuda_index(settings.device))
    if need + margin > free:
        raise EngineSkipped(
            f"does not fit: needs {format_bytes(need)} + {format_bytes(margin)} margin, {format_bytes(free)} free"
        )
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.bfloat16, device_map={"": _cuda_index(settings.device)}
    )
    return model.eval(), {}


#: Loader of each engine: ``(path, settings, prompt, new_tokens) -> (model, extra)``. Tests patch these.
LOADERS: dict[str, Callable[[Path, BenchSettings, int, int], tuple[Any, dict]]] = {
    "hf_hybrid": _load_hf_hybrid,
    "gpu": _load_gpu,
    "accelerate": _load_accelerate,
    "cpu": _load_cpu,
}


def _input_device(model: Any, engine: str, settings: BenchSettings) -> torch.device:
    if engine == "cpu":
        return torch.device("cpu")
    if engine == "accelerate":
        return torch.device("cuda", _cuda_index(settings.device))
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device) and dev.type != "meta":
        return dev
    return torch.device(settings.device)


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _pad_id(model: Any) -> int:
    config = getattr(model, "config", None)
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def measure_generate(model: Any, input_ids: torch.Tensor, new_tokens: int, repeats: int = 1) -> dict:
    """Time prefill (1 new token) and a full ``new_tokens`` generation after one warm-up call.

    The warm-up runs the full prompt with 2 new tokens, so shape-dependent first-call costs (allocations,
    kernel selection, lazy initialisation) of both the prefill and the decode path are paid before the
    clock starts. With ``repeats`` > 1 the fastest of each timing is kept. Returns seconds and rates;
    ``decode_tok_s`` is ``None`` when ``new_tokens`` is 1 or the decode time is below the timer's resolution.
    """
    batch, prompt = input_ids.shape
    pad = _pad_id(model)

    def generate(ids: torch.Tensor, count: int) -> tuple[float, torch.Tensor]:
        mask = torch.ones_like(ids)
        _sync()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=count,
                min_new_tokens=count,
                do_sample=False,
                pad_token_id=pad,
            )
        _sync()
        return time.perf_counter() - start, out

    generate(input_ids, min(2, new_tokens))  # warm-up
    t_prefill = t_full = math.inf
    out = None
    for _ in range(max(1, repeats)):
        t_prefill = min(t_prefill, generate(input_ids, 1)[0])
        if new_tokens > 1:
            elapsed, out = generate(input_ids, new_tokens)
            t_full = min(t_full, elapsed)
    if new_tokens <= 1:
        t_full = t_prefill
    produced = int(out.shape[1] - prompt) if out is not None else 1
    decode_time = t_full - t_prefill
    decode = batch * (new_tokens - 1) / decode_time if new_tokens > 1 and decode_time > 1e-6 else None
    return {
        "prefill_s": t_prefill,
        "full_s": t_full,
        "prefill_tok_s": prompt * batch / t_prefill if t_prefill > 0 else None,
        "decode_tok_s": decode,
        "decode_step_s": decode_time / (new_tokens - 1) if new_tokens > 1 else None,
        "e2e_s": t_full,
        "generated_tokens": produced,
    }


def _random_prompt(vocab: int, batch: int, length: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 12345)
    return torch.randint(0, vocab, (batch, length), generator=gen)


def _plan_summary(plan: dict | None) -> dict | None:
    if not isinstance(plan, dict) or not plan.get("units"):
        return None
    homes: dict[str, dict[str, int]] = {}
    for unit in plan["units"]:
        if not isinstance(unit, dict):
            continue
        home = str(unit.get("home", "?"))
        slot = homes.setdefault(home, {"units": 0, "bytes": 0})
        slot["units"] += 1
        slot["bytes"] += int(unit.get("bytes", unit.get("nbytes", 0)) or 0)
    return homes


def _reset_peak(index: int) -> None:
    """Reset the peak-memory counter; the allocator must exist first (else "Invalid device argument")."""
    try:
        torch.empty(1, device=torch.device("cuda", index))
        torch.cuda.reset_peak_memory_stats(index)
    except RuntimeError as exc:  # the peak is a nice-to-have: never fail an engine over it
        _log(f"cannot reset the GPU peak-memory counter: {exc}")


def run_engine(engine: str, path: Path, settings: BenchSettings, ids: torch.Tensor) -> dict:
    """Load, measure and free one engine; failures become a row with ``status`` error/skipped."""
    prompt, new_tokens = settings.counts(engine)
    row: dict[str, Any] = {
        "engine": engine,
        "status": "ok",
        "batch": settings.batch,
        "prompt": prompt,
        "new_tokens": new_tokens,
    }
    cuda = settings.device.startswith("cuda") and torch.cuda.is_available()
    model = None
    try:
        if cuda:
            _reset_peak(_cuda_index(settings.device))
        _log(f"{engine}: loading (prompt {prompt}, {new_tokens} new, batch {settings.batch})")
        start = time.perf_counter()
        model, extra = LOADERS[engine](path, settings, prompt, new_tokens)
        row["load_s"] = time.perf_counter() - start
        row.update(extra)
        _log(f"{engine}: loaded in {row['load_s']:.1f} s; measuring")
        device = _input_device(model, engine, settings)
        if engine == "hf_hybrid":
            model.hybrid.executor.stats.reset()  # count the measurement, not the load
        # every engine measures with cuDNN SDPA off, as hf_hybrid's forward runs: cuDNN builds a graph per
        # key length, i.e. every decode step (40-60 ms each on the H100 machine; the all-on-GPU row decoded at
        # 13 tok/s instead of ~60 with it), a cost that has nothing to do with offloading
        with cudnn_attention_off() if cuda else contextlib.nullcontext():
            row.update(measure_generate(model, ids[:, :prompt].to(device), new_tokens, settings.repeats))
        if row.get("generated_tokens") != new_tokens:
            row["warning"] = f"generated {row.get('generated_tokens')} tokens instead of {new_tokens}"
        if cuda and engine != "cpu":
            row["gpu_peak_bytes"] = torch.cuda.max_memory_allocated(_cuda_index(settings.device))
        plan = row.get("plan")
        if isinstance(plan, dict) and isinstance(plan.get("predicted"), dict):
            row["predicted"] = plan["predicted"]
        if engine == "hf_hybrid":
            row["lanes"] = _lane_stats(model)
            row["variant_rows"] = _measure_variants(model, ids[:, :prompt].to(device), row, settings)
    except EngineSkipped as exc:
        row.update(status="skipped", reason=str(exc))
        _log(f"{engine}: skipped: {exc}")
    except Exception as exc:  # noqa: BLE001 - one failing engine must never abort the whole run
        row.update(
            status="error", error=f"{type(exc).__name__}: {exc}"[:500], traceback=traceback.format_exc()
        )
        _log(f"{engine}: failed: {type(exc).__name__}: {exc}")
    finally:
        if model is not None:
            hybrid = getattr(model, "hybrid", None)
            close = getattr(hybrid, "close", None)
            if callable(close):
                try:
                    close()
                except Exception as exc:  # noqa: BLE001 - keep the measurement, report the close failure
                    row["close_error"] = f"{type(exc).__name__}: {exc}"
        model = None
        _free()
    return row


#: What ``--variants`` may name: token-assignment modes measured on the already loaded hf_hybrid model,
#: and "calibrated" (``model.calibrate`` on random prompts, then measured again).
VARIANTS = ("stream", "static", "cpu", "adaptive", "split", "calibrated")


def _lane_stats(model: Any) -> dict | None:
    """The executor's counters summed over the measurement calls, with the CPU lane's achieved weight rate."""
    executor = getattr(getattr(model, "hybrid", None), "executor", None)
    stats = getattr(executor, "stats", None)
    if stats is None:
        return None
    out = {name: getattr(stats, name) for name in stats.__dataclass_fields__}
    out["cpu_lane_GBps"] = stats.cpu_bytes / stats.cpu_lane_s / 1e9 if stats.cpu_lane_s else None
    out["cpu_scale"] = getattr(executor, "cpu_scale", None)
    out["cpu_scales"] = dict(getattr(executor, "cpu_scales", {}))
    return out


def _measure_variants(model: Any, ids: torch.Tensor, base: dict, settings: BenchSettings) -> list[dict]:
    """Rows for each ``--variants`` entry, measured on the loaded model (no reload: a few seconds each)."""
    rows = []
    executor = model.hybrid.executor
    default_mode = executor.token_assignment
    for variant in settings.extra.get("variants") or ():
        row = {key: base[key] for key in ("batch", "prompt", "new_tokens")}
        row.update(engine=f"hf_hybrid[{variant}]", status="ok")
        try:
            if variant == "calibrated":
                executor.token_assignment = default_mode
                texts = [_random_prompt(model.config.vocab_size, 1, min(256, ids.shape[1]), 1000 + i)[0]
                         for i in range(8)]  # fmt: skip
                model.calibrate(texts)
                row["plan"] = model.hybrid_plan.to_dict()
                row["predicted"] = row["plan"]["predicted"]
            else:
                executor.token_assignment = variant
            executor.stats.reset()
            row.update(measure_generate(model, ids, base["new_tokens"], settings.repeats))
            row["lanes"] = _lane_stats(model)
        except Exception as exc:  # noqa: BLE001 - a failing variant is a row, not an aborted run
            row.update(status="error", error=f"{type(exc).__name__}: {exc}"[:500])
        finally:
            executor.token_assignment = default_mode
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------------
# table and record


def _projected_e2e(row: dict, settings: BenchSettings) -> float | None:
    """End-to-end seconds of the headline workload (see module doc for the projection)."""
    if row.get("status") != "ok":
        return None
    if row["prompt"] == settings.prompt and row["new_tokens"] == settings.new_tokens:
        return row.get("e2e_s")
    step = row.get("decode_step_s")
    if settings.new_tokens > 1 and step is None:
        return None
    return row["prefill_s"] + (settings.new_tokens - 1) * (step or 0.0)


def _finite(value: Any) -> float | None:
    """``value`` as a float when it is a finite positive number, else None."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def _fmt_rate(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 1:
        return f"{value:.1f}"
    return f"{value:.3f}"


def _fmt_pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}%"


def _fmt_s(value: float | None) -> str:
    return "-" if value is None else (f"{value:.2f}" if value < 100 else f"{value:,.0f}")


def _row_note(row: dict, settings: BenchSettings) -> str:
    parts: list[str] = []
    if row["status"] == "skipped":
        return f"skipped: {row.get('reason', '')}"
    if row["status"] == "error":
        return f"error: {row.get('error', '')}"
    if (row["prompt"], row["new_tokens"]) != (settings.prompt, settings.new_tokens):
        parts.append(
            f"shorter workload; e2e projected to {settings.prompt}+{settings.new_tokens} for the speedup "
            "(measured prefill time, not scaled up: favours this baseline)"
        )
    predicted = row.get("predicted") or {}
    if predicted:
        pieces = [
            f"{label} {_fmt_rate(_finite(predicted.get(key)))}"
            for key, label in (("prefill_tok_s", "prefill"), ("decode_tok_s", "decode"))
            if _finite(predicted.get(key)) is not None
        ]
        if pieces:
            parts.append("plan predicts " + ", ".join(pieces) + " tok/s")
    summary = _plan_summary(row.get("plan"))
    if summary:
        parts.append(
            "plan: "
            + ", ".join(
                f"{home} {format_bytes(v['bytes'])} ({v['units']})" for home, v in sorted(summary.items())
            )
        )
    if row.get("routing_stats_passed"):
        parts.append("given the measured routing (--routing-stats)")
    if row.get("plan_error"):
        parts.append(f"plan unreadable: {row['plan_error']}")
    if row.get("gpu_peak_bytes"):
        parts.append(f"GPU peak {format_bytes(row['gpu_peak_bytes'])}")
    if row.get("load_s") is not None:
        parts.append(f"load {row['load_s']:.1f} s")
    if row.get("warning"):
        parts.append(row["warning"])
    if row.get("close_error"):
        parts.append(f"close failed: {row['close_error']}")
    return "; ".join(parts)


def render_table(rows: list[dict], settings: BenchSettings, header: str) -> str:
    """The markdown table (one line of header text, then the table)."""
    lines = [header, "", "| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for row in rows:
        ok = row["status"] == "ok"
        speed = row.get("speedup_vs_accelerate")
        cells = [
            row["engine"],
            str(row["prompt"]),
            str(row["new_tokens"]),
            _fmt_rate(row.get("prefill_tok_s")) if ok else "-",
            _fmt_rate(row.get("decode_tok_s")) if ok else "-",
            _fmt_s(row.get("e2e_s")) if ok else "-",
            _fmt_pct(row.get("prefill_pct_of_bound")),
            _fmt_pct(row.get("decode_pct_of_bound")),
            "-" if speed is None else f"{speed:.2f}x",
            row.get("note", ""),
        ]
        lines.append("| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines)


def _bounds_for(
    row: dict,
    meta: dict,
    profile: Any,
    settings: BenchSettings,
    plan: dict | None,
    hybrid_counts: tuple | None,
) -> dict | None:
    if not (row["engine"].startswith("hf_hybrid") or row["engine"] == "accelerate"):
        return None  # all-on-GPU and all-on-CPU are not limited by moving weights off the GPU
    bounds = compute_bounds(meta, profile, settings.budget_bytes, row["prompt"], settings.batch, plan)
    predicted = (plan or {}).get("predicted") if isinstance(plan, dict) else None
    if isinstance(predicted, dict) and (row["prompt"], row["new_tokens"]) == hybrid_counts:
        for key in ("prefill_bound_tok_s", "decode_bound_tok_s"):
            value = _finite(predicted.get(key))
            if value:
                bounds[key] = value
                bounds["source"] = "plan.predicted"
            elif predicted.get(key) is not None:
                bounds[key] = None  # the plan says nothing limits it (inf): no percentage to show
                bounds["source"] = "plan.predicted"
    return bounds


def _finish_rows(rows: list[dict], meta: dict, profile: Any, settings: BenchSettings) -> None:
    hybrid = next((r for r in rows if r["engine"] == "hf_hybrid" and r["status"] == "ok"), None)
    plan = hybrid.get("plan") if hybrid else None
    hybrid_counts = (hybrid["prompt"], hybrid["new_tokens"]) if hybrid else None
    for row in rows:
        row["e2e_projected_s"] = _projected_e2e(row, settings)
        bounds = (
            _bounds_for(row, meta, profile, settings, row.get("plan") or plan, hybrid_counts)
            if row["status"] == "ok"
            else None
        )
        row["bounds"] = bounds
        for kind in ("prefill", "decode"):
            bound = (bounds or {}).get(f"{kind}_bound_tok_s")
            measured = row.get(f"{kind}_tok_s")
            row[f"{kind}_bound_tok_s"] = bound
            row[f"{kind}_pct_of_bound"] = 100.0 * measured / bound if bound and measured else None
    reference = next((r for r in rows if r["engine"] == "accelerate" and r.get("e2e_projected_s")), None)
    for row in rows:
        mine = row.get("e2e_projected_s")
        row["speedup_vs_accelerate"] = reference["e2e_projected_s"] / mine if reference and mine else None
        row["note"] = _row_note(row, settings)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "to_dict"):
        return _jsonable(value.to_dict())
    return str(value)


def run_bench(scenario: str, **options: Any) -> dict:
    """Build (or reuse) ``scenario``'s checkpoint, measure every engine, print the table, write JSON.

    Options (all optional; defaults come from the scenario): ``skew`` (None/"zipf"/"zipf:S"), ``batch``,
    ``prompt``, ``new_tokens``, ``baseline_prompt`` and ``baseline_new_tokens`` (workload of the slow
    baselines accelerate and cpu), ``gpu_memory`` (budget, e.g. "6GiB"), ``device`` (default cuda if
    available else cpu), ``engines`` ("hf_hybrid,gpu,accelerate,cpu" or a list; default all that apply),
    ``cache_dir``, ``json_path`` (default ``<cache_dir>/results/<key>-<time>.json``), ``seed``, ``cleanup``
    (delete the checkpoint afterwards), ``profile`` (hardware profile of the bounds: "auto" = the one hf_hybrid's
    plan used, "quick"/"full" = ``load_or_measure``, "default" = ``default_profile``),
    ``repeats`` (time each call this many times, keep the fastest; default 1), ``command`` (shown in the
    header), ``routing_stats`` (bool: hand hf_hybrid the checkpoint's measured
    routing as ``routing_stats``, as a deployment that profiled its traffic would), ``progress`` and
    ``print_table`` (bool).

    Returns the record that is written as JSON: ``header``, ``rows`` (one per engine), ``table`` (markdown),
    ``machine``, ``scenario``, ``settings``, ``checkpoint``, ``profile``, ``json_path``.
    """
    settings = resolve_settings(scenario, **options)
    sc = settings.scenario
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    build_start = time.perf_counter()
    path = build_checkpoint(sc, settings.cache_dir, options_skew_text(settings.skew), settings.seed,
                            progress=settings.extra["progress"])  # fmt: skip
    build_s = time.perf_counter() - build_start
    meta = read_meta(path)
    vocab = int(json.loads((path / "config.json").read_text())["vocab_size"])
    longest = max(settings.prompt, settings.baseline_prompt)
    ids = _random_prompt(vocab, settings.batch, longest, settings.seed)

    rows = []
    for engine in settings.engines:
        row = run_engine(engine, path, settings, ids)
        if engine == "hf_hybrid":
            row["gpu_memory"] = settings.gpu_memory
        rows.append(row)
        rows.extend(row.pop("variant_rows", None) or [])
    # the budget sweep: hf_hybrid again under each extra budget (a reload each), for throughput vs budget
    for budget in settings.extra.get("budgets") or ():
        swept = dataclasses.replace(
            settings,
            gpu_memory=budget,
            budget_bytes=parse_bytes(budget, "budgets"),
            extra=dict(settings.extra),
        )
        swept.extra["variants"] = []
        row = run_engine("hf_hybrid", path, swept, ids)
        row.pop("variant_rows", None)
        row.update(engine=f"hf_hybrid@{budget}", gpu_memory=budget)
        rows.append(row)
    hybrid = next((r for r in rows if r["engine"] == "hf_hybrid" and r["status"] == "ok"), None)
    profile, profile_source = load_profile(settings.device, settings.profile, (hybrid or {}).get("plan"))
    _finish_rows(rows, meta, profile, settings)

    dev_name = device_name(settings.device)
    header = (
        f"**hf-hybrid bench** scenario {sc.name} ({sc.description}, skew {skew_label(settings.skew)}, seed "
        f"{settings.seed}) | device {settings.device}: {dev_name} | {started} | GPU budget {settings.gpu_memory} | "
        f"batch {settings.batch}, prompt {settings.prompt}, {settings.new_tokens} new | command: `{settings.command}`"
    )
    table = render_table(rows, settings, header)
    json_path = settings.json_path or (
        settings.cache_dir
        / "results"
        / f"{checkpoint_key(sc, settings.skew, settings.seed)}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    record = {
        "header": {
            "scenario": sc.name,
            "description": sc.description,
            "skew": options_skew_text(settings.skew),
            "device": settings.device,
            "device_name": dev_name,
            "date": started,
            "gpu_memory": settings.gpu_memory,
            "gpu_budget_bytes": settings.budget_bytes,
            "batch": settings.batch,
            "prompt": settings.prompt,
            "new_tokens": settings.new_tokens,
            "baseline_prompt": settings.baseline_prompt,
            "baseline_new_tokens": settings.baseline_new_tokens,
            "command": settings.command,
            "text": header,
        },
        "columns": list(TABLE_COLUMNS),
        "rows": rows,
        "table": table,
        "machine": machine_info(settings.device),
        "scenario": {**asdict(sc), "is_moe": sc.is_moe},
        "settings": {k: v for k, v in asdict(settings).items() if k not in ("scenario", "extra")},
        "checkpoint": {
            "path": str(path),
            "bytes": meta["bytes"]["total"],
            "build_or_reuse_s": build_s,
            "build": {
                k: meta.get(k) for k in ("key", "build_device", "build_s", "timings", "created", "skew")
            },
            "routing": {k: v for k, v in (meta.get("routing") or {}).items() if k != "expert_probs"},
            "cleaned_up": False,
        },
        "profile": profile.to_dict() if hasattr(profile, "to_dict") else _jsonable(profile),
        "profile_source": profile_source,
        "json_path": str(json_path),
    }
    if settings.cleanup:
        shutil.rmtree(path, ignore_errors=True)
        record["checkpoint"]["cleaned_up"] = True
    record = _jsonable(record)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(record, indent=1))
    if settings.extra["print_table"]:
        print(table, flush=True)
        print(f"\nJSON: {json_path}", flush=True)
    return record
