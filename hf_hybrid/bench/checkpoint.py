"""Build (once) the synthetic checkpoint of a scenario into a cache directory.

The checkpoint is an ordinary transformers checkpoint (``config.json`` + safetensors shards) with random
weights at the default ``initializer_range``, plus ``hf_hybrid_bench.json`` that records what was built:
byte breakdown per layer, the routing that was measured on it, and how the skew was made.

Zipf skew, and how it is made
-----------------------------
Random routers on random hidden states route uniformly. Real routers are not uniform, and a router is a
linear map, so a fixed per-expert bias needs a component of its input that is the same sign for every
token. Real LLMs have such "massive activation" channels; the built model gets one on purpose:

1. residual channel ``j = 0`` is set to a constant ``C = initializer_range * sqrt(hidden)`` in every
   embedding row (so it carries as much energy as all other channels of an embedding row together);
2. nothing writes to channel ``j`` afterwards: row ``j`` of every ``o_proj`` and of every expert's
   ``down_proj`` is zeroed, so the residual stream keeps ``h[j] = C`` in every layer and the router's
   normalised input ``x[j] = C * g[j] / rms(h)`` is positive for every token;
3. for each layer, router column ``j`` is set to ``b_e / mean(x[j])``, so expert ``e``'s logit gets a bias
   of about ``b_e`` (times ``x[j] / mean(x[j])``, which stays near 1) on top of the random part.

The biases ``b_e`` are fitted per layer on the router inputs of a forward pass over random tokens (layers
are fitted in order inside that one pass, so each layer sees the hidden states the already-skewed layers
before it produce), by a few hundred multiplicative updates until the fraction of tokens that select
the expert of popularity rank ``r`` matches ``t_r = min(1, c / r**s)``, with ``c`` such that the ``t_r``
add up to ``top_k`` (a token can pick an expert once, so no expert is selected by more than all tokens).
For top-1 routing that is exactly P(rank r) ~ 1/r**s; with top-k it is "selected by a share ~ 1/r**s of
tokens". Which expert gets which rank is a random permutation per layer, as in real models where hot
experts differ between layers. A second forward pass over fresh random tokens then measures the routing
that was achieved; it is stored in ``hf_hybrid_bench.json`` (``routing.expert_probs``) for every build,
skewed or not, and the bench uses it for its decode bounds.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from ..families import FamilyAdapter, for_config
from ..loading import host_memory_available
from ..units import format_bytes
from .scenarios import Scenario, default_cache_dir, get_scenario, make_config, parse_skew, skew_label

#: Name of the bench's own record inside a built checkpoint; its presence marks a complete build.
META_NAME = "hf_hybrid_bench.json"
#: The residual channel that carries the constant the router bias acts on.
SKEW_CHANNEL = 0
_GIB = 1024**3


class CheckpointBuildError(RuntimeError):
    """The checkpoint cannot be built here (not enough disk or memory)."""


def _tqdm(**kwargs: Any):
    from transformers.utils.logging import tqdm

    return tqdm(**kwargs)


def checkpoint_key(
    scenario: str | Scenario, skew: str | tuple[str, float] | None = None, seed: int = 0
) -> str:
    """Cache key of a build: scenario + skew + seed, e.g. ``S1-zipf1-seed0``."""
    sc = get_scenario(scenario)
    parsed = skew if isinstance(skew, tuple) or skew is None else parse_skew(skew)
    return f"{sc.name}-{skew_label(parsed)}-seed{int(seed)}"


def is_complete(path: Path) -> bool:
    """A build is complete when its directory holds the config and the bench record (written last)."""
    return (path / META_NAME).is_file() and (path / "config.json").is_file()


def read_meta(path: str | Path) -> dict:
    """The bench record of a built checkpoint (``hf_hybrid_bench.json``)."""
    return json.loads((Path(path) / META_NAME).read_text())


def _instantiate(config: Any, device: str, seed: int) -> Any:
    """Random-init the model directly on ``device`` in bf16 (no meta device, no CPU round trip)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)  # seeds every CUDA device too
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def _meta_model(config: Any) -> Any:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def _adapter(model: Any) -> FamilyAdapter:
    return for_config(model.config)


def _layers(model: Any) -> list:
    return _adapter(model).layers(model)


def _router_of(model: Any, layer: Any) -> Any | None:
    """The router module of an MoE layer of ``model`` (None for a dense layer), as its family adapter says."""
    return _adapter(model).router(layer)


def byte_breakdown(model: Any, config: Any) -> dict:
    """Bytes of the model's weights by kind: embeddings, lm_head, and per layer attention / router /
    experts (with bytes of one expert) / dense MLP / norms. Works on a meta-device model too."""
    top_k = int(getattr(config, "num_experts_per_tok", 0) or 0)
    layers = []
    for index, layer in enumerate(_layers(model)):
        entry = {"layer": index, "attention": 0, "router": 0, "experts": 0, "mlp": 0, "norms": 0}
        router = _router_of(model, layer)
        num_experts = int(router.weight.shape[0]) if router is not None else 0
        for name, param in layer.named_parameters():
            nbytes = param.numel() * param.element_size()
            if name.startswith("self_attn."):
                entry["attention"] += nbytes
            elif ".experts." in f".{name}" or ".shared_expert" in name:
                entry["experts"] += nbytes
            elif router is not None and param is router.weight:
                entry["router"] += nbytes
            elif name.startswith("mlp."):
                entry["mlp"] += nbytes
            else:
                entry["norms"] += nbytes
        if num_experts:
            entry["num_experts"] = num_experts
            entry["top_k"] = top_k
            entry["expert_bytes"] = entry["experts"] // num_experts
        layers.append(entry)
    embed = sum(p.numel() * p.element_size() for p in model.get_input_embeddings().parameters())
    head = model.get_output_embeddings()
    lm_head = sum(p.numel() * p.element_size() for p in head.parameters()) if head is not None else 0
    if getattr(config, "tie_word_embeddings", False):
        lm_head = 0
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "total": total,
        "embed": embed,
        "lm_head": lm_head,
        "final_norm": total
        - embed
        - lm_head
        - sum(sum(v for k, v in e.items() if k in _SUMMED) for e in layers),
        "layers": layers,
    }


_SUMMED = ("attention", "router", "experts", "mlp", "norms")


def _choose_build_device(device: str | None, nbytes: int) -> str:
    """CUDA when it is there and the model fits in its free memory (fast init, fast save); else the CPU."""
    if device is not None:
        return device
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        if free > nbytes * 1.1 + 2 * _GIB:
            return "cuda"
    return "cpu"


def _check_resources(root: Path, nbytes: int, device: str) -> None:
    free_disk = shutil.disk_usage(root).free
    need_disk = int(nbytes * 1.02) + 256 * 1024**2  # safetensors headers, config, slack
    if free_disk < need_disk:
        raise CheckpointBuildError(
            f"not enough free disk under {root}: the checkpoint needs about {need_disk / _GIB:.1f} GiB, "
            f"{free_disk / _GIB:.1f} GiB are free. Free some space, pass --cache-dir on a larger disk, "
            "or delete old builds (--cleanup deletes the checkpoint after the run)."
        )
    if device == "cpu":
        available = host_memory_available()
        # the model, plus one 5 GB shard that safetensors serialises in memory
        need_ram = nbytes + min(nbytes, 5 * 10**9) + _GIB
        if available is not None and available < need_ram:
            raise CheckpointBuildError(
                f"building on the CPU needs about {need_ram / _GIB:.1f} GiB of RAM, {available / _GIB:.1f} GiB "
                "are available: build on a CUDA machine (the build runs there when one is present)."
            )


def _remove_stale_tmp(root: Path, key: str) -> None:
    """Remove temp dirs of builds of ``key`` whose process is gone (a killed build), to reclaim disk."""
    for tmp in root.glob(f".{key}.tmp-*"):
        try:
            pid = int(tmp.name.split(".tmp-")[1].split("-")[0])
        except (IndexError, ValueError):
            continue
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:
            pass  # alive, someone else's


def _write_back() -> None:
    """Flush dirty pages to disk (``os.sync``; a no-op where the platform has none)."""
    sync = getattr(os, "sync", None)
    if sync is not None:
        sync()


def _zipf_targets(num_experts: int, top_k: int, exponent: float) -> torch.Tensor:
    """Per-rank selection probability ``min(1, c / r**s)`` with ``c`` chosen so they add up to ``top_k``."""
    ranks = torch.arange(1, num_experts + 1, dtype=torch.float64)
    weights = ranks.pow(-exponent)
    lo, hi = 0.0, float(top_k) * float(num_experts) ** exponent
    for _ in range(200):
        mid = (lo + hi) / 2
        if torch.clamp(mid * weights, max=1.0).sum().item() < top_k:
            lo = mid
        else:
            hi = mid
    return torch.clamp(hi * weights, max=1.0).float()


def _selection_probs(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Fraction of tokens whose top-k includes each expert."""
    picks = logits.topk(top_k, dim=-1).indices.flatten()
    return torch.bincount(picks, minlength=logits.shape[-1]).float() / logits.shape[0]


def _fit_biases(
    base: torch.Tensor, scale: torch.Tensor, target: torch.Tensor, top_k: int, iters: int = 400
) -> torch.Tensor:
    """Fit per-expert logit biases ``b`` so that top-k of ``base + scale[:, None] * b`` selects each
    expert with probability ``target`` (fixed-point updates in log space; the best iterate is kept)."""
    tokens = base.shape[0]
    sigma = float(base.std()) or 1.0
    eps = 0.5 / tokens
    order = torch.argsort(target, descending=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(1, len(order) + 1, device=order.device)
    bias = -torch.log(ranks.float()) * sigma  # a good start: log-popularity in units of the logit spread
    best, best_err = bias.clone(), float("inf")
    for step in range(iters):
        probs = _selection_probs(base + scale[:, None] * bias, top_k)
        err = float((probs - target).abs().sum())
        if err < best_err:
            best, best_err = bias.clone(), err
        rate = 0.5 if step < iters // 2 else 0.15
        bias = bias + rate * sigma * (torch.log(target + eps) - torch.log(probs + eps))
        bias = bias - bias.mean()  # a shift common to all experts changes no token's top-k
    return best


def _random_ids(vocab: int, batch: int, length: int, seed: int, device: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=gen).to(device)


def _calib_shape(scenario: Scenario, device: str) -> tuple[int, int]:
    if scenario.tiny:
        return 4, 64
    return (4, 256) if device.startswith("cuda") else (2, 128)


@torch.no_grad()
def _apply_zipf_skew(model: Any, config: Any, exponent: float, seed: int, ids: torch.Tensor) -> list[dict]:
    """Make routing follow a Zipf law (see the module docstring); returns per-layer fit details."""
    hidden = int(config.hidden_size)
    j = SKEW_CHANNEL
    const = float(getattr(config, "initializer_range", 0.02)) * math.sqrt(hidden)
    model.get_input_embeddings().weight[:, j] = const
    adapter = _adapter(model)
    routers = []
    for layer in _layers(model):
        attn_out = adapter.attention(layer).o_proj
        attn_out.weight[j, :] = 0
        if getattr(attn_out, "bias", None) is not None:
            attn_out.bias[j] = 0
        experts = adapter.experts(layer)
        for name, param in experts.named_parameters():
            if "down" in name and param.dim() == 3:
                param[:, j, :] = 0  # [experts, hidden, intermediate]: output row j
            elif "down" in name and param.dim() == 2 and name.endswith("bias"):
                param[:, j] = 0
        for name, module in adapter.mlp(layer).named_modules():
            # shared experts (other families) write into the residual stream as well
            if isinstance(module, torch.nn.Linear) and name.endswith("down_proj"):
                module.weight[j, :] = 0
        router = _router_of(model, layer)
        router.weight[:, j] = 0
        routers.append(router)

    top_k = int(config.num_experts_per_tok)
    fits: list[dict] = []

    def make_hook(index: int):
        def hook(module, args):
            x = args[0].reshape(-1, hidden).float()
            weight = module.weight
            base = x @ weight.float().t()
            anchor = x[:, j]
            mean_anchor = float(anchor.mean())
            if mean_anchor <= 0:
                raise RuntimeError(f"layer {index}: the skew channel is not positive (mean {mean_anchor})")
            gen = torch.Generator().manual_seed(seed * 1000 + index)
            num_experts = weight.shape[0]
            perm = torch.randperm(num_experts, generator=gen)
            target = torch.empty(num_experts)
            target[perm] = _zipf_targets(num_experts, top_k, exponent)
            target = target.to(x.device)
            bias = _fit_biases(base, anchor / mean_anchor, target, top_k)
            weight[:, j] = (bias / mean_anchor).to(weight.dtype)
            # what the router now does with these inputs (bf16 weights, as saved)
            probs = _selection_probs(x @ weight.float().t(), top_k)
            fits.append(
                {
                    "layer": index,
                    "anchor_mean": mean_anchor,
                    "anchor_cv": float(anchor.std() / anchor.mean()),
                    "l1_error": float((probs - target).abs().sum()),
                    "hot_experts": perm[:4].tolist(),
                }
            )

        return hook

    handles = [r.register_forward_pre_hook(make_hook(i)) for i, r in enumerate(routers)]
    try:
        _adapter(model).decoder(model)(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return fits


@torch.no_grad()
def measure_routing(model: Any, ids: torch.Tensor) -> dict:
    """Per layer, the fraction of tokens whose top-k includes each expert, over a forward of ``ids``.

    Empty for dense models. ``top_share`` is the most popular expert's share of all selections
    (uniform routing gives ``1 / num_experts``).
    """
    config = model.config
    top_k = int(getattr(config, "num_experts_per_tok", 0) or 0)
    routers = [_router_of(model, layer) for layer in _layers(model)]
    if not top_k or not any(r is not None for r in routers):
        return {}
    probs: dict[int, torch.Tensor] = {}

    def make_hook(index: int):
        def hook(module, args, output):
            logits = output[0] if isinstance(output, tuple) else output
            logits = logits.reshape(-1, logits.shape[-1]).float()
            probs[index] = _selection_probs(logits, top_k).cpu()

        return hook

    handles = [r.register_forward_hook(make_hook(i)) for i, r in enumerate(routers) if r is not None]
    try:
        _adapter(model).decoder(model)(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    layers = sorted(probs)
    shares = [float(probs[i].max()) / top_k for i in layers]
    return {
        "tokens": int(ids.numel()),
        "top_k": top_k,
        "layers": layers,
        "expert_probs": [[round(float(v), 5) for v in probs[i]] for i in layers],
        "top_share": shares,
        "top_share_mean": sum(shares) / len(shares),
        "uniform_share": 1.0 / len(probs[layers[0]]),
    }


def build_checkpoint(
    scenario: str | Scenario,
    cache_dir: str | Path | None = None,
    skew: str | None = None,
    seed: int = 0,
    *,
    device: str | None = None,
    progress: bool = True,
) -> Path:
    """Build the synthetic checkpoint of ``scenario`` once and return its directory.

    ``cache_dir`` defaults to :func:`~hf_hybrid.bench.scenarios.default_cache_dir`; the build lands in
    ``cache_dir/<scenario>-<skew>-seed<seed>`` and is reused when complete. It is written to a temp dir
    that is renamed into place at the very end, so a killed build never leaves a checkpoint that a later
    run would reuse. ``skew`` is ``None``/``"zipf"``/``"zipf:S"`` (MoE scenarios only). ``device`` is where
    the random init runs (default: CUDA when present and the model fits, else the CPU).

    Raises :class:`CheckpointBuildError` when disk (or, on the CPU, RAM) is short.
    """
    sc = get_scenario(scenario)
    parsed = parse_skew(skew)
    if parsed is not None and not sc.is_moe:
        raise ValueError(f"scenario {sc.name} is dense: a routing skew applies to MoE scenarios only")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = checkpoint_key(sc, parsed, seed)
    final = root / key
    if is_complete(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(root, key)
    if final.exists():
        shutil.rmtree(final)  # incomplete leftovers from an older layout; never reused

    config = make_config(sc)
    planned = byte_breakdown(_meta_model(config), config)
    nbytes = planned["total"]
    build_device = _choose_build_device(device, nbytes)
    _check_resources(root, nbytes, build_device)

    tmp = root / f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    started = time.perf_counter()
    timings: dict[str, float] = {}
    stages = ["init"] + (["skew"] if parsed else []) + (["routing"] if sc.is_moe else []) + ["save"]
    bar = _tqdm(total=len(stages), desc=f"building {key} ({format_bytes(nbytes)})", disable=not progress)
    model = None
    try:
        tick = time.perf_counter()
        model = _instantiate(config, build_device, seed)
        timings["init_s"] = time.perf_counter() - tick
        bar.update(1)
        batch, length = _calib_shape(sc, build_device)
        fits: list[dict] = []
        if parsed is not None:
            tick = time.perf_counter()
            ids = _random_ids(config.vocab_size, batch, length, seed + 1, build_device)
            fits = _apply_zipf_skew(model, config, parsed[1], seed, ids)
            timings["skew_s"] = time.perf_counter() - tick
            bar.update(1)
        routing: dict = {}
        if sc.is_moe:
            tick = time.perf_counter()
            routing = measure_routing(
                model, _random_ids(config.vocab_size, batch, length, seed + 2, build_device)
            )
            timings["routing_s"] = time.perf_counter() - tick
            bar.update(1)
        tick = time.perf_counter()
        model.save_pretrained(tmp, max_shard_size="5GB")
        timings["save_s"] = time.perf_counter() - tick
        # the written shards sit dirty in the page cache and the kernel writes them back while the first
        # measurements run (tens of GiB at disk speed), competing with the lanes for DRAM bandwidth and cores:
        # write them back now, before anything is timed
        tick = time.perf_counter()
        _write_back()
        timings["sync_s"] = time.perf_counter() - tick
        bar.update(1)
        breakdown = byte_breakdown(model, config)
        meta = {
            "scenario": sc.name,
            "family": sc.family,
            "description": sc.description,
            "key": key,
            "skew": None if parsed is None else {"kind": parsed[0], "exponent": parsed[1]},
            "skew_method": None
            if parsed is None
            else {
                "channel": SKEW_CHANNEL,
                "constant": float(getattr(config, "initializer_range", 0.02)) * math.sqrt(config.hidden_size),
                "fits": fits,
                "how": "constant residual channel + fitted router column; see hf_hybrid.bench.checkpoint",
            },
            "seed": seed,
            "dtype": "bfloat16",
            "bytes": breakdown,
            "routing": routing,
            "build_device": build_device,
            "build_s": time.perf_counter() - started,
            "timings": timings,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "transformers": __import__("transformers").__version__,
            "torch": torch.__version__,
        }
        # The record is written last: its presence is what marks a build complete.
        (tmp / META_NAME).write_text(json.dumps(meta, indent=1))
        del model
        model = None
        try:
            os.rename(tmp, final)
        except OSError:
            if not is_complete(final):  # not a concurrent build that finished first
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return final
