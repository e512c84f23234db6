"""The engines a bench compares: how each is loaded, measured and freed, one row per engine.

* ``hf_hybrid``: :class:`hf_hybrid.HybridModelForCausalLM` under the scenario's GPU budget;
* ``gpu``: plain transformers with every weight on the GPU -- only when the checkpoint fits in free GPU
  memory (the reference for what the budget costs);
* ``accelerate``: ``device_map="auto"`` with ``max_memory={0: budget, "cpu": ...}`` (offload hooks that
  copy CPU weights to the GPU layer by layer) -- CUDA only;
* ``cpu``: plain transformers on the CPU.

``--variants`` rows are measured on the loaded hf_hybrid model after its own row: each mode is switched
with ``model.set_token_assignment`` (the plan follows, so each row's plan describes what ran), and
"calibrated" calls ``model.calibrate`` last.
"""

from __future__ import annotations

import contextlib
import gc
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..hooks import cudnn_attention_off
from ..memory import kv_cache_bytes
from ..system import meminfo
from ..units import format_bytes
from .checkpoint import read_meta
from .settings import SWITCH_VARIANTS, BenchSettings, log
from .timing import lane_stats, measure_generate, random_prompt

#: The dtype every engine loads the checkpoint with.
LOAD_DTYPE = torch.bfloat16
_GIB = 1024**3


class EngineSkipped(Exception):
    """Raised by an engine loader when the engine does not apply here (the row says why)."""


def _free(model: Any = None) -> None:
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _cuda_index(device: str) -> int:
    dev = torch.device(device)
    return dev.index if dev.index is not None else 0


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
    for name in ("token_assignment", "placement", "prefill_chunk"):
        if settings.extra.get(name):
            kwargs[name] = settings.extra[name]
    model = HybridModelForCausalLM.from_pretrained(
        str(path),
        gpu_memory=settings.gpu_memory,
        device=settings.device,
        dtype=LOAD_DTYPE,
        max_context=prompt + new_tokens,
        max_batch_size=settings.batch,
        **kwargs,
    )
    return model, extra


def _plan_record(model: Any) -> dict:
    """``{"plan": ...}`` from the loaded hf_hybrid model, or ``{"plan_error": ...}`` when unreadable."""
    to_dict = getattr(getattr(model, "hybrid_plan", None), "to_dict", None)
    if not callable(to_dict):
        return {}
    try:
        return {"plan": to_dict()}
    except Exception as exc:  # noqa: BLE001 - a plan we cannot read only loses the prediction
        return {"plan_error": f"{type(exc).__name__}: {exc}"}


def _calibrate(model: Any, prompt: int) -> None:
    """``model.calibrate`` on 8 random prompts (it re-plans the experts for the routing it saw)."""
    vocab = model.config.vocab_size
    texts = [random_prompt(vocab, 1, min(256, prompt), 1000 + i)[0] for i in range(8)]
    model.calibrate(texts)


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
        dtype=LOAD_DTYPE,
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
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=LOAD_DTYPE)
    return model.eval(), {"threads": torch.get_num_threads()}


def _load_gpu(path: Path, settings: BenchSettings, prompt: int, new_tokens: int) -> tuple[Any, dict]:
    from transformers import AutoConfig, AutoModelForCausalLM

    if not settings.device.startswith("cuda") or not torch.cuda.is_available():
        raise EngineSkipped("all-on-GPU needs a CUDA device")
    total = read_meta(path)["bytes"]["total"]
    config = AutoConfig.from_pretrained(str(path))
    need = total + kv_cache_bytes(config, prompt + new_tokens, settings.batch, LOAD_DTYPE.itemsize)
    margin = max(int(1.5 * _GIB), int(0.1 * total))  # activations, logits, allocator slack
    free, _ = torch.cuda.mem_get_info(_cuda_index(settings.device))
    if need + margin > free:
        raise EngineSkipped(
            f"does not fit: needs {format_bytes(need)} + {format_bytes(margin)} margin, {format_bytes(free)} free"
        )
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=LOAD_DTYPE, device_map={"": _cuda_index(settings.device)}
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


def _reset_peak(index: int) -> None:
    """Reset the peak-memory counter; the allocator must exist first (else "Invalid device argument")."""
    try:
        torch.empty(1, device=torch.device("cuda", index))
        torch.cuda.reset_peak_memory_stats(index)
    except RuntimeError as exc:  # the peak is a nice-to-have: never fail an engine over it
        log(f"cannot reset the GPU peak-memory counter: {exc}")


def _close(model: Any, row: dict) -> None:
    """Close hf_hybrid's runtime (lanes, pinned memory); a failure is noted in the row."""
    close = getattr(getattr(model, "hybrid", None), "close", None)
    if callable(close):
        try:
            close()
        except Exception as exc:  # noqa: BLE001 - keep the measurement, report the close failure
            row["close_error"] = f"{type(exc).__name__}: {exc}"


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
        log(f"{engine}: loading (prompt {prompt}, {new_tokens} new, batch {settings.batch})")
        start = time.perf_counter()
        model, extra = LOADERS[engine](path, settings, prompt, new_tokens)
        row["load_s"] = time.perf_counter() - start
        row.update(extra)
        if engine == "hf_hybrid":
            row.update(_plan_record(model))
        log(f"{engine}: loaded in {row['load_s']:.1f} s; measuring")
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
            row["lanes"] = lane_stats(model)
            with cudnn_attention_off() if cuda else contextlib.nullcontext():
                row["variant_rows"] = measure_variants(model, settings, ids[:, :prompt].to(device), row)
    except EngineSkipped as exc:
        row.update(status="skipped", reason=str(exc))
        log(f"{engine}: skipped: {exc}")
    except Exception as exc:  # noqa: BLE001 - one failing engine must never abort the whole run
        row.update(
            status="error", error=f"{type(exc).__name__}: {exc}"[:500], traceback=traceback.format_exc()
        )
        log(f"{engine}: failed: {type(exc).__name__}: {exc}")
    finally:
        if model is not None:
            _close(model, row)
        model = None
        _free()
    return row


#: the "spin" variant: the native pool's threads spin this long after a call before sleeping (a decode
#: step's next call comes within ~1-2 ms), and the feeding thread this long in its wait for the CPU lane
SPIN_IDLE_US = 3000
SPIN_WAIT_US = 20000


@contextlib.contextmanager
def _switched(model: Any, variant: str):
    """Inside the block the loaded model runs as ``variant`` asks: "eager" on transformers' dynamic cache
    with eager attention (as ``decode_graphs=False``), "unfused" with attention graphs but routers run by
    their MoE blocks, "rebuilt_masks" with every decode step's attention mask built by transformers (not
    updated), "predict" with ``predict_next_layer=True``, "lookahead" with the decode lookahead
    (:mod:`hf_hybrid.decode_lookahead`; built for every model with decode graphs, switched on here),
    "balanced_splits" with divided experts' split moved by which lane finished first
    (``Executor.balance_splits``, off by default), "lane_thread" with every native CPU job run by the CPU
    lane's Python thread (``Executor.direct_native_start`` off), "spin" with the native pool's threads
    and the feeding thread's wait spinning before they sleep, "wait_spin" with only the feeding thread's
    wait spinning (its core is idle then anyway), "eager_experts" with one-token steps' GPU-lane experts
    issued kernel by kernel rather than replayed as CUDA graphs (``Executor.graph_experts`` off),
    "prefill_splits" with prefill steps' large host experts divided between the CPU lane and the copy lane
    (``Executor.prefill_splits``), "separate_parts" with each part of a divided expert weighted on its own
    (``Executor.combine_divided`` off); anything else unchanged."""
    runtime = model.hybrid
    graphs, executor = runtime.decode_graphs, runtime.executor
    fuse = graphs.fuse_routers if graphs is not None else None
    masks_on = graphs.masks.enabled if graphs is not None else None
    predict = executor.predict_next_layer
    lookahead = graphs.lookahead if graphs is not None else None
    looking = lookahead.enabled if lookahead is not None else None
    balancing = executor.balance_splits
    direct = executor.direct_native_start
    graph_experts = executor.graph_experts
    prefill_splits = executor.prefill_splits
    combine_divided = executor.combine_divided
    native_lane = executor.cpu_kernels.native_lane
    if variant == "eager":
        runtime.decode_graphs = None
    elif variant == "unfused" and graphs is not None:
        graphs.fuse_routers = False
    elif variant == "rebuilt_masks" and graphs is not None:
        graphs.masks.enabled = False
    elif variant == "predict":
        executor.predict_next_layer = True
    elif variant == "lookahead" and lookahead is not None:
        lookahead.enabled = True
    elif variant == "balanced_splits":
        executor.balance_splits = True
    elif variant == "lane_thread":
        executor.direct_native_start = False
    elif variant == "eager_experts":
        executor.graph_experts = False
    elif variant == "prefill_splits":
        executor.prefill_splits = True
    elif variant == "separate_parts":
        executor.combine_divided = False
    elif variant == "spin" and native_lane is not None:
        native_lane.configure(idle_spin_us=SPIN_IDLE_US, wait_spin_us=SPIN_WAIT_US)
    elif variant == "wait_spin" and native_lane is not None:
        native_lane.configure(wait_spin_us=SPIN_WAIT_US)
    try:
        yield
    finally:
        runtime.decode_graphs = graphs
        if graphs is not None:
            graphs.fuse_routers = fuse
            graphs.masks.enabled = masks_on
        executor.predict_next_layer = predict
        executor.balance_splits = balancing
        executor.direct_native_start = direct
        executor.graph_experts = graph_experts
        executor.prefill_splits = prefill_splits
        executor.combine_divided = combine_divided
        if variant in ("spin", "wait_spin") and native_lane is not None:
            native_lane.configure(idle_spin_us=0, wait_spin_us=0)
        if lookahead is not None:
            lookahead.enabled = looking


def measure_variants(model: Any, settings: BenchSettings, ids: torch.Tensor, base: dict) -> list[dict]:
    """Rows ``hf_hybrid[<variant>]`` for each ``--variants`` entry, measured on the loaded base model.

    A token-assignment mode is switched with ``model.set_token_assignment`` (the plan's mode and
    predictions follow, so each row's plan describes what ran; homes stay as loaded); "calibrated" calls
    ``model.calibrate`` (which re-places experts), so it runs last. Empty when no variant was asked for.
    """
    variants = list(settings.extra.get("variants") or ())
    if not variants:
        return []
    base_mode = model.hybrid_plan.token_assignment
    rows = []
    for variant in sorted(variants, key=lambda v: v == "calibrated"):
        row: dict[str, Any] = {
            "engine": f"hf_hybrid[{variant}]",
            "status": "ok",
            "batch": base["batch"],
            "prompt": base["prompt"],
            "new_tokens": base["new_tokens"],
        }
        try:
            if variant == "calibrated":
                model.set_token_assignment(base_mode)
                _calibrate(model, base["prompt"])
            elif variant in SWITCH_VARIANTS:
                model.set_token_assignment(base_mode)
            else:
                model.set_token_assignment(variant)
            row.update(_plan_record(model))
            model.hybrid.executor.stats.reset()
            with _switched(model, variant):
                row.update(measure_generate(model, ids, base["new_tokens"], settings.repeats))
            plan = row.get("plan")
            if isinstance(plan, dict) and isinstance(plan.get("predicted"), dict):
                row["predicted"] = plan["predicted"]
            row["lanes"] = lane_stats(model)
        except Exception as exc:  # noqa: BLE001 - one failing variant must not lose the others
            row.update(status="error", error=f"{type(exc).__name__}: {exc}"[:500])
            log(f"hf_hybrid[{variant}]: failed: {type(exc).__name__}: {exc}")
        rows.append(row)
    return rows
