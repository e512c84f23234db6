"""``HybridModelForCausalLM``: load, plan, place and run a causal LM across GPU, CPU and PCIe.

``from_pretrained`` returns the genuine transformers model (``isinstance(model, MixtralForCausalLM)``
holds), its class swapped for a same-named subclass that guards ``generate`` and exposes
``hybrid_plan``; everything else -- config, generation_config, pipelines, streamers -- is stock.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.utils import logging

from . import families
from .errors import BudgetError, ContextLengthError, DeviceUnavailableError, WeightsNotFoundError
from .executor import Executor
from .hooks import attach, detach, register_experts_implementation
from .loading import CheckpointReader, LoadedModel, _looks_like_path, load_weights, resolve_checkpoint
from .planner import HybridPlan, Workload, plan
from .profile import HardwareProfile, default_profile
from .units import GPU, describe_units, dtype_size, format_bytes, parse_bytes

logger = logging.get_logger(__name__)

#: Device memory left outside the default budget for the CUDA context, allocator slack and other users.
DEFAULT_MARGIN = 1536 * 1024**2


@dataclass
class HybridRuntime:
    """Everything hf_hybrid attaches to a model: plan, executor, loaded groups and hook handles."""

    plan: HybridPlan
    executor: Executor
    loaded: LoadedModel
    handles: list
    max_context: int
    max_batch_size: int
    source: str
    lock: threading.RLock = field(default_factory=threading.RLock)

    def close(self) -> None:
        """Stop the CPU worker, remove hooks and release staging and pinned buffers."""
        detach(self.handles)
        self.handles = []
        self.executor.close()


class HybridGenerationMixin:
    """Mixed into the model's own class: a guarded ``generate`` and the hybrid accessors."""

    hybrid: HybridRuntime

    @property
    def hybrid_plan(self) -> HybridPlan:
        """The placement this model runs with (``print`` it for a table)."""
        return self.hybrid.plan

    @property
    def device(self) -> torch.device:
        """The accelerator the model computes on (inputs go here), whatever the first parameter's home."""
        return self.hybrid.executor.device

    def generate(self, *args, **kwargs):
        """transformers ``generate``, checked against ``max_context`` and serialised per model.

        A failed or interrupted call (an exception in a lane, CUDA OOM, Ctrl-C) resets the executor's
        lanes before the error propagates, so the model stays usable.
        """
        self._check_context(args, kwargs)
        with self.hybrid.lock:
            starts: list[float] = []  # host time at the start of each forward: prefill, then decode steps
            handle = self.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter()))
            try:
                out = super().generate(*args, **kwargs)
            except BaseException:
                self.hybrid.executor.recover()
                raise
            finally:
                handle.remove()
            self._record_throughput(args, kwargs, starts, time.perf_counter())
            return out

    def _record_throughput(self, args, kwargs, starts: list[float], finished: float) -> None:
        """Put what this generate call measured beside the plan's predictions (``hybrid_plan.measured``).

        generate waits for each step's token on the host, so the start of forward k + 1 marks the end of
        forward k: prefill = second start - first start, decode = the rest, without extra device syncs.
        """
        input_ids = self._input_ids(args, kwargs)
        if input_ids is None or input_ids.dim() != 2 or not starts:
            return
        batch, prompt = input_ids.shape
        prefill_s = (starts[1] if len(starts) > 1 else finished) - starts[0]
        measured = {
            "prompt_tokens": prompt,
            "batch": batch,
            "prefill_tok_s": batch * prompt / max(prefill_s, 1e-9),
        }
        steps = len(starts) - 1
        if steps > 0:
            measured["decode_steps"] = steps
            measured["decode_tok_s"] = batch * steps / max(finished - starts[1], 1e-9)
        self.hybrid.plan.measured = measured

    @staticmethod
    def _input_ids(args, kwargs):
        """The prompt tensor of a ``generate(*args, **kwargs)`` call (``None`` when it is not a tensor)."""
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            input_ids = kwargs.get("inputs")
        return input_ids if isinstance(input_ids, torch.Tensor) else None

    def _check_context(self, args, kwargs) -> None:
        input_ids = self._input_ids(args, kwargs)
        if input_ids is None:
            return
        prompt = input_ids.shape[-1]
        rows = input_ids.shape[0] if input_ids.dim() > 1 else 1
        gen_config = kwargs.get("generation_config") or self.generation_config

        def setting(name: str, default):
            value = kwargs.get(name, getattr(gen_config, name, None))
            return default if value is None else value

        new, max_length = setting("max_new_tokens", None), setting("max_length", None)
        if new is not None:
            total = prompt + new
        elif max_length is not None:
            total = max_length
        else:
            # transformers generates 20 new tokens when neither limit is given
            total = prompt + 20
            positions = getattr(self.config, "max_position_embeddings", None)
            total = min(total, positions) if positions else total
        # beams and returned sequences each hold their own KV cache rows
        batch = rows * max(setting("num_beams", 1), setting("num_return_sequences", 1))
        rt = self.hybrid
        if total > rt.max_context:
            raise ContextLengthError(
                f"this call needs {total} positions (prompt {prompt} + new tokens) but the KV cache was reserved "
                f"for max_context={rt.max_context}. Lower max_new_tokens, or reload with a larger max_context."
            )
        if batch > rt.max_batch_size:
            raise ContextLengthError(
                f"batch of {batch} sequences exceeds max_batch_size={rt.max_batch_size} the KV cache was "
                f"reserved for; reload with max_batch_size={batch}."
            )

    def calibrate(
        self,
        texts,
        tokenizer=None,
        *,
        max_length: int = 512,
        replan: bool = True,
    ) -> dict[str, float]:
        """Record how often each expert is routed to on ``texts`` and re-plan placement with it.

        ``texts`` are strings (tokenised with ``tokenizer``, by default the checkpoint's own) or token-id
        tensors. Returns ``{"layers.3.experts.5": frequency}`` where a frequency is the share of tokens
        routed to that expert (each layer's frequencies sum to top-k). With ``replan`` the experts are
        moved to the homes a plan with these frequencies gives (hot experts onto the GPU); attention and
        other modules keep their homes. Pass the returned dict as ``routing_stats=`` to a later
        ``from_pretrained`` to plan with it from the start.
        """
        rt = self.hybrid
        if not any(g.routed for g in rt.loaded.groups.values()):
            raise ValueError("calibrate() needs a mixture-of-experts model: this one has no routed experts")
        if isinstance(texts, (str, torch.Tensor)):
            texts = [texts]
        if any(isinstance(t, str) for t in texts) and tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(rt.source)
        ex = rt.executor
        with rt.lock:
            ex.routed_counts.clear()
            ex.routed_tokens.clear()
            ex.record_routing = True
            try:
                with torch.no_grad():
                    for text in texts:
                        if isinstance(text, str):
                            encoded = tokenizer(
                                text, return_tensors="pt", truncation=True, max_length=max_length
                            )
                            ids = encoded["input_ids"]
                        else:
                            ids = text if text.dim() == 2 else text.unsqueeze(0)
                        ids = ids[:, : min(max_length, rt.max_context)]
                        self(ids.to(self.device), use_cache=False)
            except BaseException:
                ex.recover()
                raise
            finally:
                ex.record_routing = False
            stats = {}
            for group in rt.loaded.groups.values():
                if group.routed:
                    seen = max(1, ex.routed_tokens.get(group.layer, 0))
                    for i, u in enumerate(group.units):
                        stats[u.name] = ex.routed_counts.get((group.layer, i), 0) / seen
            if replan:
                self._replan_experts(stats)
        return stats

    def _replan_experts(self, routing: dict[str, float]) -> None:
        """Re-plan with ``routing`` keeping every non-expert unit's home, then move the experts."""
        rt = self.hybrid
        old = rt.plan
        keep = {u.name: old.homes[u.name] for u in old.units if u.kind != "expert" and len(u.homes) > 1}
        new = plan(
            old.units,
            old.profile,
            old.budget_bytes,
            kv_cache_bytes=old.kv_cache_bytes,
            workspace_bytes=old.workspace_bytes,
            workload=old.workload,
            top_k=_top_k(self.config),
            forced=keep,
            routing=routing,
            token_assignment=old.token_assignment,
        )
        ex = rt.executor
        moves = [(g, i, new.homes[u.name]) for g in rt.loaded.groups.values() for i, u in enumerate(g.units)]
        # free device memory before taking more: units leaving the GPU move first
        for group, i, home in sorted(moves, key=lambda m: m[2] == GPU):
            ex.rehome(group, i, home)
        ex.prepare_cpu_kernels(rt.loaded.groups.values(), progress=False)
        rt.plan = new
        logger.info("hf_hybrid: re-planned with calibrated routing: %s", new.predicted)

    def trace(
        self, path, input_ids: torch.Tensor | None = None, *, max_new_tokens: int = 8, **generate_kwargs
    ):
        """Run one prefill and ``max_new_tokens - 1`` decode steps and save a Chrome/Perfetto timeline.

        The trace has one row per lane -- the feeding thread ("host"), the CPU lane, PCIe copies and GPU
        compute -- so you can see which lane bounds each layer. Open it at https://ui.perfetto.dev.
        ``input_ids`` defaults to a random prompt of the planned workload's length. Returns the path.
        """
        from .trace import Tracer

        rt = self.hybrid
        if input_ids is None:
            length = min(rt.plan.workload.prompt_tokens, rt.max_context - max_new_tokens)
            generator = torch.Generator().manual_seed(0)
            input_ids = torch.randint(0, self.config.vocab_size, (1, max(1, length)), generator=generator)
        input_ids = input_ids.to(self.device)
        tracer = Tracer(self.device)
        lanes = rt.executor.lanes
        lanes.tracer = tracer
        steps = {"n": 0}

        # one span per forward (the prefill, then each decode step) on the host row
        def step_start(module, args, kwargs):
            steps["n"] += 1
            steps["t"] = time.perf_counter()

        def step_end(module, args, kwargs, output):
            tracer.host_spans.append(("host", f"forward {steps['n']}", steps["t"], time.perf_counter()))

        handles = [
            self.register_forward_pre_hook(step_start, with_kwargs=True),
            self.register_forward_hook(step_end, with_kwargs=True),
        ]
        try:
            self.generate(
                input_ids,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                do_sample=False,
                **generate_kwargs,
            )
        finally:
            lanes.tracer = None
            for handle in handles:
                handle.remove()
        return tracer.save(path)

    def save_pretrained(self, *args, **kwargs):
        """Not supported: the weights live in the executor's homes, not in the module tree."""
        raise NotImplementedError(
            "a hybrid model keeps expert/MLP weights outside the module tree; save the original checkpoint "
            f"directory instead ({self.hybrid.source})"
        )

    def to(self, *args, **kwargs):
        """Moving a hybrid model would break its placement; reload with another device/dtype instead."""
        raise RuntimeError(
            "a hybrid model is placed across GPU, CPU and staging buffers; call "
            "HybridModelForCausalLM.from_pretrained(..., device=..., dtype=...) again instead of .to()"
        )

    def cuda(self, *args, **kwargs):
        """See :meth:`to`."""
        return self.to()

    def cpu(self, *args, **kwargs):
        """See :meth:`to`."""
        return self.to()


_SUBCLASSES: dict[type, type] = {}


def _hybrid_class(base: type) -> type:
    cls = _SUBCLASSES.get(base)
    if cls is None:
        cls = type(base.__name__, (HybridGenerationMixin, base), {"__module__": base.__module__})
        _SUBCLASSES[base] = cls
    return cls


# -------------------------------------------------------------------------------------- helpers
def resolve_device(device: str | torch.device | None, allow_cpu_fallback: bool = False) -> torch.device:
    """The accelerator to use; ``"cpu"`` makes the CPU stand in for it (same code path)."""
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        logger.warning_once(
            "hf_hybrid: no CUDA device: running with the CPU standing in for the accelerator. Pass "
            "device='cpu' to silence this, or gpu_memory= to keep testing a small budget."
        )
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            if allow_cpu_fallback:
                logger.warning(
                    "hf_hybrid: device=%r but CUDA is not available: the CPU stands in for it", device
                )
                return torch.device("cpu")
            raise DeviceUnavailableError(
                f"device={device!r} but this torch build sees no CUDA device "
                f"(torch {torch.__version__}, cuda={torch.version.cuda}). Install a CUDA build of torch, or pass "
                f"device='cpu' (or allow_cpu_fallback=True) to let the CPU stand in for the accelerator."
            )
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise DeviceUnavailableError(
                f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s)"
            )
    elif dev.type != "cpu":
        raise DeviceUnavailableError(f"device={device!r} is not supported: use 'cuda', 'cuda:N' or 'cpu'")
    return dev


def resolve_dtype(dtype, config) -> torch.dtype:
    """``dtype`` as a torch dtype; ``None``/``"auto"`` takes the checkpoint's own."""
    if dtype is None or dtype == "auto":
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"dtype must be torch.bfloat16, torch.float16 or torch.float32 (got {dtype!r})")
    return dtype


def default_budget(device: torch.device) -> int:
    """Free device memory minus a margin; on the CPU standing in: unlimited (everything 'resident')."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(0, free - DEFAULT_MARGIN)
    return 1 << 62


def kv_cache_bytes(config, max_context: int, max_batch_size: int, dtype: torch.dtype) -> int:
    """Bytes of a full KV cache for ``max_context`` x ``max_batch_size`` on every layer."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return (
        2 * config.num_hidden_layers * max_batch_size * max_context * kv_heads * head_dim * dtype_size(dtype)
    )


def workspace_bytes(config, units, max_context: int, max_batch_size: int, prefill_tokens: int) -> int:
    """Device activations of one prefill step (hidden states, expert intermediates, attention, logits)."""
    tokens = max_batch_size * min(prefill_tokens, max_context)
    hidden = config.hidden_size
    widest = max((u.tensors[0].shape[0] for u in units if u.tensors), default=4 * hidden)
    per_token = 4 * (8 * hidden + 2 * widest)  # fp32 accumulators, residual, norms, gate/up outputs
    logits = 4 * max_batch_size * config.vocab_size * 2
    attention = 2 * max_batch_size * config.num_attention_heads * min(prefill_tokens, max_context) * 128
    return 16 * 1024**2 + tokens * per_token + logits + attention


def _load_profile(profile, device: torch.device, dtype: torch.dtype) -> HardwareProfile:
    if isinstance(profile, HardwareProfile):
        return profile
    if profile in (None, "auto"):
        if device.type == "cuda":
            from .profile import load_or_measure

            return load_or_measure(str(device), dtype)
        return default_profile("cpu")
    if profile == "measure":
        from .profile import load_or_measure

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


def _top_k(config) -> int:
    return int(getattr(config, "num_experts_per_tok", 0) or 2)


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
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        gpu_memory: int | str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        max_context: int = 4096,
        max_batch_size: int = 1,
        workload: Workload | None = None,
        placement: dict[str, str] | None = None,
        token_assignment: str = "adaptive",
        profile: HardwareProfile | str | None = "auto",
        routing_stats: dict[str, float] | None = None,
        mlp_slices: int | None = None,
        allow_cpu_fallback: bool = False,
        allow_pickle: bool = False,
        progress: bool = True,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        trust_remote_code: bool = False,
        attn_implementation: str | None = "sdpa",
        cpu_threads: int | None = None,
        cpu_kernels: str | dict[int, str] = "auto",
        **kwargs,
    ) -> PreTrainedModel:
        """Load ``pretrained_model_name_or_path`` (hub id or directory of safetensors) across GPU and CPU.

        Args:
            gpu_memory: device budget (bytes or ``"6GiB"``); KV cache, workspace and staging count inside it.
                Default: free device memory minus 1.5 GiB.
            device: ``"cuda"``, ``"cuda:1"``, or ``"cpu"`` to let the CPU stand in for the accelerator.
            dtype: ``torch.bfloat16`` etc.; default the checkpoint's dtype (``torch_dtype`` is an alias).
            max_context, max_batch_size: the KV cache reserved inside ``gpu_memory``.
            workload: the prompt length / new tokens / batch the plan optimises for.
            placement: force homes, ``{"layers.*.experts.0": "gpu", "layers.1.attention": "stream"}``.
            token_assignment: ``"adaptive"`` (cost model per layer step), ``"static"`` (by home),
                ``"cpu"`` or ``"stream"`` (all host units one way), ``"split"`` (adaptive, and in decode
                steps each host expert's rows are divided between the CPU lane and the copy lane so both
                finish together; not yet measured on a GPU, hence not the default).
            profile: a :class:`HardwareProfile`, ``"auto"`` (cached measurement on CUDA), ``"measure"``,
                ``"default"``.
            routing_stats: per-expert routing frequencies (``{"layers.0.experts.3": 0.4}``) to weight placement.
            mlp_slices: row slices per dense MLP (default: ~64 MiB each, at least 4).
            cpu_kernels: CPU expert kernel per token count: ``"auto"`` (the profile's measured choice when
                it was measured and host memory holds the packed copies, else ``"linear"``), a method name
                (``"linear"``, ``"matmul_t"``, ``"onednn_packed"``) or ``{tokens: method}``.
            Other keyword arguments (``revision``, ``token``, ``trust_remote_code``...) mean what they mean
            in transformers; config attributes (``output_router_logits=True``...) override the config before
            the model is built; transformers' placement options (``device_map``, ``max_memory``...) are
            ignored with a warning; anything else raises ``TypeError``.
        """
        if torch_dtype is not None and dtype is None:
            dtype = torch_dtype
        for name in ("max_context", "max_batch_size"):
            value = locals()[name]
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int (got {value!r})")
        dev = resolve_device(device, allow_cpu_fallback)
        _check_openmp_policy(dev)
        directory = resolve_checkpoint(
            pretrained_model_name_or_path,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            allow_pickle=allow_pickle,
        )
        config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
        _apply_config_overrides(config, kwargs)
        adapter = families.for_config(config)
        torch_dt = resolve_dtype(dtype, config)
        hybrid_plan, model = plan_model(
            config,
            dev,
            torch_dt,
            gpu_memory=gpu_memory,
            max_context=max_context,
            max_batch_size=max_batch_size,
            workload=workload,
            placement=placement,
            profile=profile,
            routing_stats=routing_stats,
            mlp_slices=mlp_slices,
            trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation,
            token_assignment=token_assignment,
        )
        reader = CheckpointReader(directory, allow_pickle=allow_pickle)
        loaded = load_weights(model, reader, adapter, hybrid_plan, dev, torch_dt, progress=progress)
        rings = {r.name: (r.slot_bytes, r.slots) for r in hybrid_plan.staging}
        executor = Executor(
            dev,
            hybrid_plan.profile,
            expert_slots=rings.get("experts"),
            module_slots=rings.get("modules"),
            token_assignment=token_assignment,
            cpu_threads=cpu_threads,
            cpu_methods=_cpu_methods(cpu_kernels, hybrid_plan, loaded),
        )
        executor.prepare_cpu_kernels(loaded.groups.values(), progress=progress)
        handles = attach(model, executor, loaded)
        _load_generation_config(model, directory)
        model.generation_config.disable_compile = True  # CPU lanes and data-dependent routing do not compile
        model.eval()
        model.__class__ = _hybrid_class(type(model))
        model.hybrid = HybridRuntime(
            hybrid_plan, executor, loaded, handles, max_context, max_batch_size, str(directory)
        )
        model.name_or_path = str(pretrained_model_name_or_path)
        model.config._name_or_path = str(pretrained_model_name_or_path)
        _log_summary(hybrid_plan, dev)
        return model

    @classmethod
    def plan(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        gpu_memory: int | str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        trust_remote_code: bool = False,
        **options,
    ) -> HybridPlan:
        """The plan ``from_pretrained`` would make, from the config alone (no weights are read)."""
        if os.path.isdir(pretrained_model_name_or_path):
            config = AutoConfig.from_pretrained(
                pretrained_model_name_or_path, trust_remote_code=trust_remote_code
            )
        elif _looks_like_path(str(pretrained_model_name_or_path)):
            raise WeightsNotFoundError(
                f"no such directory: {pretrained_model_name_or_path}. Pass a checkpoint directory (config.json is "
                f"enough for a plan) or a Hugging Face hub id."
            )
        else:
            config = AutoConfig.from_pretrained(
                pretrained_model_name_or_path,
                trust_remote_code=trust_remote_code,
                revision=options.pop("revision", None),
                token=options.pop("token", None),
            )
        families.for_config(config)
        dev = (
            torch.device(device)
            if device is not None
            else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        )
        torch_dt = resolve_dtype(dtype, config)
        result, _ = plan_model(
            config, dev, torch_dt, gpu_memory=gpu_memory, trust_remote_code=trust_remote_code, **options
        )
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
        from .executor import plain_methods

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
    config,
    device: torch.device,
    dtype: torch.dtype,
    *,
    gpu_memory=None,
    max_context: int = 4096,
    max_batch_size: int = 1,
    workload: Workload | None = None,
    placement: dict[str, str] | None = None,
    profile="auto",
    routing_stats: dict[str, float] | None = None,
    mlp_slices: int | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = "sdpa",
    token_assignment: str = "adaptive",
) -> tuple[HybridPlan, torch.nn.Module]:
    """Build the meta skeleton of ``config`` and plan it; returns (plan, skeleton)."""
    model = build_skeleton(config, dtype, trust_remote_code, attn_implementation)
    units = describe_units(model, dtype, mlp_slices)
    try:
        budget = default_budget(device) if gpu_memory is None else parse_bytes(gpu_memory, "gpu_memory")
    except ValueError as exc:
        raise BudgetError(f"{exc}; pass e.g. gpu_memory='6GiB'") from exc
    if budget <= 0:
        raise BudgetError(f"gpu_memory must be positive (got {gpu_memory!r}); pass e.g. gpu_memory='6GiB'")
    workload = workload or Workload(prompt_tokens=min(512, max_context), new_tokens=128, batch=max_batch_size)
    hw = _load_profile(profile, device, dtype)
    result = plan(
        units,
        hw,
        budget,
        kv_cache_bytes=kv_cache_bytes(config, max_context, max_batch_size, dtype),
        workspace_bytes=workspace_bytes(config, units, max_context, max_batch_size, workload.prompt_tokens),
        workload=workload,
        top_k=_top_k(config),
        forced=placement,
        routing=routing_stats,
        token_assignment=token_assignment,
    )
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
