"""``HybridModelForCausalLM``: load, plan, place and run a causal LM across GPU, CPU and PCIe.

``from_pretrained`` returns the genuine transformers model (``isinstance(model, MixtralForCausalLM)``
holds), its class swapped for a same-named subclass that guards ``generate`` and exposes
``hybrid_plan``; everything else -- config, generation_config, pipelines, streamers -- is stock.
"""

from __future__ import annotations

import os
import warnings

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.utils import logging

from . import families
from .checkpoint import CheckpointReader
from .decode_graphs import DecodeGraphs, graphable_layers
from .decode_lookahead import DecodeLookahead
from .devices import default_device_name, resolve_device
from .errors import BudgetError, WeightsNotFoundError
from .executor import Executor
from .hooks import attach, register_experts_implementation
from .hub import looks_like_path, resolve_checkpoint
from .loading import LoadedModel, check_layers, load_weights
from .memory import kv_cache_bytes, workspace_bytes
from .options import HybridOptions
from .planner import HybridPlan, Workload, plan
from .profile import HardwareProfile, default_profile
from .runtime import HybridRuntime, experts_per_token, hybrid_class
from .units import GPU, describe_units, dtype_size, format_bytes, parse_bytes

logger = logging.get_logger(__name__)

#: Device memory left outside the default budget for the CUDA context, allocator slack and other users.
DEFAULT_MARGIN = 1536 * 1024**2


def resolve_dtype(dtype, config) -> torch.dtype:
    """``dtype`` as a torch dtype; ``None``/``"auto"`` takes the checkpoint's own."""
    given, source = dtype, "dtype"
    if dtype is None or dtype == "auto":
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        given, source = dtype, "the checkpoint's config.json dtype (dtype='auto')"
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(
            f"{source} must be torch.bfloat16, torch.float16 or torch.float32 (got {given!r}); "
            "pass dtype=torch.bfloat16 to load in bf16"
        )
    return dtype


def default_budget(device: torch.device) -> int:
    """Free device memory minus a margin; on the CPU standing in: unlimited (everything 'resident')."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(0, free - DEFAULT_MARGIN)
    return 1 << 62


def _load_profile(profile, device: torch.device, dtype: torch.dtype) -> HardwareProfile:
    if isinstance(profile, HardwareProfile):
        return profile
    if profile in (None, "auto"):
        if device.type == "cuda":
            from .measure import load_or_measure

            return load_or_measure(str(device), dtype)
        return default_profile("cpu")
    if profile == "measure":
        from .measure import load_or_measure

        return load_or_measure(str(device), dtype, refresh=True)
    if profile == "default":
        return default_profile(str(device))
    raise ValueError("profile must be a HardwareProfile, 'auto', 'measure' or 'default'")


def build_skeleton(
    config, dtype: torch.dtype, trust_remote_code: bool = False, attn_implementation: str | None = None
):
    """The model with parameters on the meta device (buffers such as rotary tables stay real)."""
    from accelerate import init_empty_weights

    register_experts_implementation()
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    # tie on the skeleton so a tied lm_head is one unit with the embeddings, as it will be once loaded
    model.tie_weights()
    return model


# --------------------------------------------------------------------------------------- public
class HybridModelForCausalLM:
    """Factory, like ``AutoModelForCausalLM``: returns a transformers model that runs across GPU and CPU.

    Example::

        model = HybridModelForCausalLM.from_pretrained("mistralai/Mixtral-8x7B-v0.1", gpu_memory="22GiB",
                                                       dtype=torch.bfloat16)
        out = model.generate(input_ids, max_new_tokens=128)
        print(model.hybrid_plan)
    """

    def __init__(self, *args, **kwargs):
        raise TypeError("use HybridModelForCausalLM.from_pretrained(...)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> PreTrainedModel:
        """Load ``pretrained_model_name_or_path`` (hub id or directory of safetensors) across GPU and CPU.

        Keyword arguments are the options of :class:`~hf_hybrid.options.HybridOptions` (``gpu_memory``,
        ``device``, ``dtype``/``torch_dtype``, ``max_context``, ``max_batch_size``, ``workload``,
        ``placement``, ``token_assignment``, ``profile``, ``routing_stats``, ``mlp_slices``,
        ``cpu_threads``, ``cpu_kernels``, ``revision``, ``token``, ``trust_remote_code``...; see there).
        Config attributes (``output_router_logits=True``...) override the config before the model is
        built; transformers' placement options (``device_map``, ``max_memory``...) are ignored with a
        warning; anything else raises ``TypeError``. Every option is checked before any work starts.
        """
        options, overrides = HybridOptions.from_kwargs(kwargs)
        dev = resolve_device(options.device, options.allow_cpu_fallback)
        _check_openmp_policy(dev)
        directory = resolve_checkpoint(
            pretrained_model_name_or_path,
            revision=options.revision,
            token=options.token,
            cache_dir=options.cache_dir,
            local_files_only=options.local_files_only,
            allow_pickle=options.allow_pickle,
        )
        config = AutoConfig.from_pretrained(directory, trust_remote_code=options.trust_remote_code)
        _apply_config_overrides(config, overrides)
        adapter = families.for_config(config)
        check_layers(directory, config, adapter, allow_pickle=options.allow_pickle)
        torch_dt = resolve_dtype(options.dtype, config)
        hybrid_plan, model = plan_model(config, dev, torch_dt, options)
        reader = CheckpointReader(directory, allow_pickle=options.allow_pickle)
        loaded = load_weights(model, reader, adapter, hybrid_plan, dev, torch_dt, progress=options.progress)
        rings = {r.name: (r.slot_bytes, r.slots) for r in hybrid_plan.staging}
        executor = Executor(
            dev,
            hybrid_plan.profile,
            expert_slots=rings.get("experts"),
            module_slots=rings.get("modules"),
            token_assignment=hybrid_plan.token_assignment,
            cpu_threads=options.cpu_threads,
            cpu_methods=_cpu_methods(options.cpu_kernels, hybrid_plan, loaded),
            cpu_backend=options.cpu_backend,
            predict_next_layer=options.predict_next_layer,
        )
        executor.graph_experts = options.expert_graphs
        executor.prefill_splits = options.prefill_splits
        executor.prepare_cpu_kernels(loaded.groups.values(), progress=options.progress)
        decode_graphs = _decode_graphs(options, model, adapter, loaded, executor, dev)
        handles = attach(model, executor, loaded, adapter, decode_graphs)
        _load_generation_config(model, directory)
        model.generation_config.disable_compile = True  # CPU lanes and data-dependent routing do not compile
        model.eval()
        model.__class__ = hybrid_class(type(model))
        model.hybrid = HybridRuntime(
            hybrid_plan,
            executor,
            loaded,
            handles,
            options.max_context,
            options.max_batch_size,
            str(directory),
            decode_graphs=decode_graphs,
        )
        model.name_or_path = str(pretrained_model_name_or_path)
        model.config._name_or_path = str(pretrained_model_name_or_path)
        _log_summary(hybrid_plan, dev)
        return model

    @classmethod
    def plan(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> HybridPlan:
        """The plan ``from_pretrained`` would make, from the config alone (no weights are read).

        Takes the same options as :meth:`from_pretrained`.
        """
        options, overrides = HybridOptions.from_kwargs(kwargs)
        if os.path.isdir(pretrained_model_name_or_path):
            config = AutoConfig.from_pretrained(
                pretrained_model_name_or_path, trust_remote_code=options.trust_remote_code
            )
        elif looks_like_path(str(pretrained_model_name_or_path)):
            raise WeightsNotFoundError(
                f"no such directory: {pretrained_model_name_or_path}. Pass a checkpoint directory (config.json is "
                f"enough for a plan) or a Hugging Face hub id."
            )
        else:
            config = AutoConfig.from_pretrained(
                pretrained_model_name_or_path,
                trust_remote_code=options.trust_remote_code,
                revision=options.revision,
                token=options.token,
                cache_dir=options.cache_dir,
                local_files_only=options.local_files_only,
            )
        _apply_config_overrides(config, overrides)
        families.for_config(config)
        dev = torch.device(options.device if options.device is not None else default_device_name())
        torch_dt = resolve_dtype(options.dtype, config)
        result, _ = plan_model(config, dev, torch_dt, options)
        return result


#: transformers loading options that hf_hybrid's own loader replaces: accepted and ignored, with a warning
IGNORED_LOADING_KWARGS = (
    "device_map",
    "max_memory",
    "low_cpu_mem_usage",
    "offload_folder",
    "offload_state_dict",
    "offload_buffers",
    "use_safetensors",
    "weights_only",
    "key_mapping",
    "experts_implementation",
    "tqdm_class",
)


def _decode_graphs(
    options: HybridOptions, model, adapter, loaded: LoadedModel, executor: Executor, device: torch.device
) -> DecodeGraphs | None:
    """The decode-step graphs (static KV cache, attention halves as CUDA graphs) when the options ask for
    them: ``"auto"`` on CUDA; ``True`` also on the CPU standing in, where the same path runs uncaptured."""
    choice = options.decode_graphs
    if choice == "auto":
        choice = device.type == "cuda"
    if not choice:
        return None
    layers = adapter.layers(model)
    graphs = DecodeGraphs(
        config=model.config,
        layers=list(layers),
        graphable=graphable_layers(layers, [s.module for s in loaded.streamed]),
        max_context=options.max_context,
        lanes=executor.lanes,
        capture=device.type == "cuda",
    )
    graphs.lookahead = DecodeLookahead(
        graphs, executor, adapter.embeddings(model), adapter.rotary(model), layer=0
    )
    graphs.lookahead.enabled = options.decode_lookahead
    return graphs


def _apply_config_overrides(config, kwargs: dict) -> None:
    """What transformers does with extra ``from_pretrained`` kwargs: config attributes override the config.

    Loading options that hf_hybrid's placement replaces are ignored with a warning; anything else is an
    error rather than a silently dropped typo.
    """
    for key in list(kwargs):
        if key in IGNORED_LOADING_KWARGS:
            logger.warning(
                "hf_hybrid: ignoring %s=%r: hf_hybrid places the weights itself", key, kwargs.pop(key)
            )
        elif hasattr(config, key):
            setattr(config, key, kwargs.pop(key))
    if kwargs:
        raise TypeError(
            f"HybridModelForCausalLM.from_pretrained() got unexpected keyword argument(s) "
            f"{', '.join(sorted(kwargs))}: they are neither hf_hybrid options nor attributes of "
            f"{type(config).__name__}"
        )


def _cpu_methods(choice, hybrid_plan: HybridPlan, loaded: LoadedModel) -> str | dict[int, str]:
    """Resolve ``cpu_kernels="auto"``: packed copies only where measured faster and host memory allows."""
    if choice != "auto":
        return choice
    profile = hybrid_plan.profile
    if not profile.measured:
        return "linear"
    from .loading import host_memory_available

    cpu_bytes = sum(u.nbytes for u in hybrid_plan.units_in("cpu"))
    available = host_memory_available()
    if (
        "onednn_packed" in set(profile.cpu_kernel.values())
        and available is not None
        and cpu_bytes > 0.8 * available
    ):
        logger.warning(
            "hf_hybrid: not packing CPU expert weights (needs %s more host memory, %s available); using plain kernels",
            format_bytes(cpu_bytes),
            format_bytes(available),
        )
        from .cpu_kernels import plain_methods

        return plain_methods(profile)
    return dict(profile.cpu_kernel)


def _check_openmp_policy(device: torch.device) -> None:
    if device.type == "cuda" and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        logger.warning_once(
            "hf_hybrid: OMP_WAIT_POLICY is not PASSIVE (torch was imported before hf_hybrid): spinning OpenMP "
            "threads can halve the CPU lane. Set OMP_WAIT_POLICY=PASSIVE in the environment, or import hf_hybrid "
            "before torch."
        )


def _load_generation_config(model, directory) -> None:
    from transformers import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(directory)
    except OSError:
        model.generation_config = GenerationConfig.from_model_config(model.config)


def plan_model(
    config, device: torch.device, dtype: torch.dtype, options: HybridOptions | None = None
) -> tuple[HybridPlan, torch.nn.Module]:
    """Build the meta skeleton of ``config`` and plan it under ``options``; returns (plan, skeleton)."""
    options = options or HybridOptions()
    model = build_skeleton(config, dtype, options.trust_remote_code, options.attn_implementation)
    units = describe_units(model, families.for_config(config), dtype, options.mlp_slices)
    try:
        budget = (
            default_budget(device)
            if options.gpu_memory is None
            else parse_bytes(options.gpu_memory, "gpu_memory")
        )
    except ValueError as exc:
        raise BudgetError(f"{exc}; pass e.g. gpu_memory='6GiB'") from exc
    if budget <= 0:
        raise BudgetError(
            f"gpu_memory must be positive (got {options.gpu_memory!r}); pass e.g. gpu_memory='6GiB'"
        )
    ctx, batch = options.max_context, options.max_batch_size
    workload = options.workload or Workload(prompt_tokens=min(512, ctx), new_tokens=128, batch=batch)
    # the device workspace holds one prefill forward of this many tokens; generate cuts longer prompts
    chunk = min(options.prefill_chunk or workload.prompt_tokens, ctx)
    hw = _load_profile(options.profile, device, dtype)
    result = plan(
        units,
        hw,
        budget,
        kv_cache_bytes=kv_cache_bytes(config, ctx, batch, dtype_size(dtype)),
        workspace_bytes=workspace_bytes(
            config, units, ctx, batch, chunk, experts_per_token(config) if options.prefill_splits else 0
        ),
        workload=workload,
        top_k=experts_per_token(config),
        forced=options.placement,
        routing=options.routing_stats,
        token_assignment=options.token_assignment,
        prefill_chunk=chunk,
        prefill_splits=options.prefill_splits,
    )
    result.kv_cache_bytes_per_1k = kv_cache_bytes(config, 1024, batch, dtype_size(dtype))
    return result, model


def _log_summary(p: HybridPlan, device: torch.device) -> None:
    homes = ", ".join(f"{h}: {len(p.units_in(h))}" for h in ("gpu", "cpu", "stream"))
    pred = p.predicted
    logger.info(
        "hf_hybrid: %s budget %s used %s (weights %s); units %s; predicted prefill %.0f tok/s (%.0f%% of bound), "
        "decode %.2f tok/s (%.0f%% of bound)",
        device,
        format_bytes(p.budget_bytes) if p.budget_bytes < 1 << 61 else "unlimited",
        format_bytes(p.device_bytes),
        format_bytes(p.resident_bytes),
        homes,
        pred.get("prefill_tok_s", 0.0),
        100 * pred.get("prefill_fraction_of_bound", 0.0),
        pred.get("decode_tok_s", 0.0),
        100 * pred.get("decode_fraction_of_bound", 0.0),
    )
    if not any(p.homes[u.name] != GPU for u in p.units):
        warnings.warn("hf_hybrid: the whole model fits in gpu_memory; nothing is offloaded", stacklevel=3)
